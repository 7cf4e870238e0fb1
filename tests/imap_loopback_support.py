"""
Support for IMAP tests over real loopback: the server on the trial reactor
with the mbox store on disk, and a raw line client (a blocking socket, run
in a thread) that sends exactly the bytes a test gives it.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer, task, threads
from twisted.logger import globalLogPublisher
from twisted.mail import imap4
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.auth.realm import MailRealm
from mailsrv.imap.server import IMAPServerFactory, account_factory
from mailsrv.store.mbox import MboxMailStore
from tests.test_imap_harness import PASSWORD, USER, make_config


class RawClient:
    """A blocking IMAP client that sends raw lines and reads until the tagged answer."""

    def __init__(self, port: int, timeout: float = 10.0, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the one tagged C{tag} (or until the server closes)."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return lines
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def cmd(self, tag: bytes, rest: bytes) -> list[bytes]:
        self.send(tag + b" " + rest + b"\r\n")
        return self.read_until(tag)

    def login(self) -> None:
        out = self.cmd(b"L", b'LOGIN %s "%s"' % (USER.encode(), PASSWORD))
        assert out[-1].startswith(b"L OK"), out

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class LoopbackIMAPCase(unittest.TestCase):
    """
    The IMAP server on 127.0.0.1 (trial reactor), mbox store in a temporary folder;
    with C{with_tls}, STARTTLS offered with the config's certificate (C{self.tls}).
    """

    timeout = 60
    with_tls = False

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="imaptest-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="imap-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.config = make_config(self.tmp)
        self.store = MboxMailStore(self.config.mail_dir, self.config.index_dir, reactor, self.pool)

        def run(f, *a, **kw):
            return threads.deferToThreadPool(reactor, self.pool, f, *a, **kw)

        realm = MailRealm()
        realm.register(imap4.IAccount, account_factory(self.config, self.store, run))
        portal = Portal(realm, [InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD})])
        self.tls = None
        if self.with_tls:
            from mailsrv.tls import server_options

            self.tls = server_options(self.config)
        self.factory = IMAPServerFactory(
            config=self.config,
            store=self.store,
            portal=portal,
            reactor=reactor,
            run=run,
            tls=self.tls,
        )
        self.protocols: list = []
        build = self.factory.buildProtocol

        def tracked(addr):
            p = build(addr)
            self.protocols.append(p)
            return p

        self.factory.buildProtocol = tracked
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        # Every failure the server logs, kept for the test to assert on.
        self.failures: list[str] = []

        def observe(event):
            if event.get("log_failure") is not None:
                self.failures.append(event["log_failure"].getTraceback())

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def in_thread(self, f, *args) -> defer.Deferred:
        """Run a blocking client function in a thread (the reactor keeps serving)."""
        return threads.deferToThread(f, *args)

    @property
    def port_number(self) -> int:
        return self.port.getHost().port

    @defer.inlineCallbacks
    def settle(self):
        """Wait until every server connection has seen its client go."""
        for _ in range(400):
            if all(p._lost for p in self.protocols):
                break
            yield task.deferLater(self.reactor, 0.01, lambda: None)
        yield task.deferLater(self.reactor, 0.05, lambda: None)
