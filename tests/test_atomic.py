"""
The atomic file write: concurrent writers to one path, and the IMAP
subscriptions file written by two first logins of one user at once.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer, threads
from twisted.mail import imap4
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.atomic import fsync_dir, write_atomic
from mailsrv.auth.realm import MailRealm
from mailsrv.imap.server import IMAPServerFactory, account_factory
from mailsrv.store.mbox import MboxMailStore
from tests.test_imap_harness import make_config


def test_write_atomic_replaces_whole_file_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write_atomic(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_atomic(path, lambda f: f.write(b"written by a function"), 0o640)
    assert path.read_bytes() == b"written by a function"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["f"]  # no temporary file left
    fsync_dir(tmp_path)


def test_write_atomic_without_replace_keeps_existing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", replace=False)
    assert path.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_write_atomic_failure_leaves_no_temporary(tmp_path: Path) -> None:
    def broken(f) -> None:
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "f", broken)
    assert os.listdir(tmp_path) == []


def test_concurrent_writers_never_fail(tmp_path: Path) -> None:
    """Threads writing one path at once: every write succeeds, one whole file remains."""
    path = tmp_path / "subs"
    contents = [(b"writer %02d\n" % i) * 2000 for i in range(16)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(contents))

    def writer(data: bytes) -> None:
        start.wait()
        try:
            for _ in range(5):
                write_atomic(path, data)
        except BaseException as e:  # noqa: BLE001 - the test reports any of them
            errors.append(e)

    workers = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    assert path.read_bytes() in contents
    assert os.listdir(tmp_path) == ["subs"]


class SimultaneousFirstLoginTest(unittest.TestCase):
    """Two first IMAP logins of one user at once over loopback both succeed."""

    timeout = 60
    USERS = [f"user{i}@example.test" for i in range(6)]

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="atomictest-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pool = ThreadPool(minthreads=4, maxthreads=8, name="atomic-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.config = make_config(self.tmp)
        store = MboxMailStore(self.config.mail_dir, self.config.index_dir, reactor, self.pool)

        def run(f, *a, **kw):
            return threads.deferToThreadPool(reactor, self.pool, f, *a, **kw)

        realm = MailRealm()
        realm.register(imap4.IAccount, account_factory(self.config, store, run))
        checker = InMemoryUsernamePasswordDatabaseDontUse(**{u: b"pw" for u in self.USERS})
        factory = IMAPServerFactory(
            config=self.config,
            store=store,
            portal=Portal(realm, [checker]),
            reactor=reactor,
            run=run,
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_two_first_logins_at_once(self):
        port = self.port.getHost().port

        def clients() -> list[str]:
            results: list[str] = []
            lock = threading.Lock()

            def login(user: str, barrier: threading.Barrier) -> None:
                m = imaplib.IMAP4("127.0.0.1", port)
                try:
                    barrier.wait()
                    typ, _ = m.login(user, "pw")
                    outcome = typ
                except imaplib.IMAP4.error as e:
                    outcome = f"{user}: {e}"
                finally:
                    m.logout()
                with lock:
                    results.append(outcome)

            workers = []
            for user in self.USERS:
                barrier = threading.Barrier(2)
                workers += [threading.Thread(target=login, args=(user, barrier)) for _ in (1, 2)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            return results

        results = yield threads.deferToThread(clients)
        self.assertEqual(results, ["OK"] * 2 * len(self.USERS))
        for user in self.USERS:
            local, _, domain = user.partition("@")
            subs = self.tmp / "imap" / domain / f"{local}.subscriptions"
            self.assertIn(b"INBOX\n", subs.read_bytes())
        self.assertEqual(
            [n for n in os.listdir(self.tmp / "imap" / "example.test") if n.endswith(".tmp")], []
        )
