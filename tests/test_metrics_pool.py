"""The metrics page answers while every disk thread is busy: scrapes have a thread of their own."""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry
from twisted.application import service
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web import client

from mailsrv.config import parse
from mailsrv.metrics.registry import MailMetrics
from mailsrv.metrics.service import observe_server


class ScrapeWhileTheDiskPoolIsBusy(unittest.TestCase):
    timeout = 10

    @defer.inlineCallbacks
    def test_a_scrape_answers_while_every_disk_thread_is_busy(self):
        disk = ThreadPool(minthreads=1, maxthreads=1, name="test-disk")
        disk.start()
        self.addCleanup(disk.stop)
        release = threading.Event()
        self.addCleanup(release.set)  # before the pool stops (cleanups run last first)
        disk.callInThread(release.wait)  # a slow delivery holds the only disk thread
        base = Path(tempfile.mkdtemp(prefix="metrics-", dir="/tmp"))  # a short socket path
        self.addCleanup(shutil.rmtree, base)
        config = parse('[server]\ndata_dir = "data"\n', base_dir=base)
        # Port 0 (any free one), which the config refuses.
        config = replace(
            config, metrics=replace(config.metrics, listen=["tcp:0:interface=127.0.0.1"])
        )
        config.queue_dir.mkdir(parents=True)
        ctx = SimpleNamespace(
            reactor=reactor,
            threadpool=disk,
            config=config,
            metrics=MailMetrics(CollectorRegistry(), config.queue_dir),
        )
        users = service.MultiService()
        listeners = observe_server(ctx, users)
        users.startService()
        self.addCleanup(users.stopService)
        [address] = [a for name, _, a in listeners.bound if name == "metrics"]
        response = yield client.Agent(reactor).request(b"GET", f"http://{address}/metrics".encode())
        body = yield client.readBody(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"mailsrv_messages_received_total", body)
