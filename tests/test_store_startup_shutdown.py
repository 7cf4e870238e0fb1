"""
Start-up and shutdown of the store, on a task.Clock and a thread pool the
test runs by hand: the listeners are held until the start-up recovery is
done; the shutdown write-back of flags waits a bounded time and logs what
it left.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailsrv.interfaces import FLAGGED
from mailsrv.spool import BytesSource
from mailsrv.startup import RecoveryService, StartGate
from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import MSG1, NOW, USER


class HeldPool:
    """A thread pool whose work runs when the test says (at once while C{run_now})."""

    def __init__(self) -> None:
        self.run_now = True
        self.work: list = []

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        self.work.append((on_result, func, args, kwargs))
        if self.run_now:
            self.run()

    def run(self) -> None:
        while self.work:
            on_result, func, args, kwargs = self.work.pop(0)
            try:
                result = func(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)


class ClockReactor(task.Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


@implementer(IPushProducer)
class ListeningPort:
    """Stands for a listening TCP port: whether it reads (accepts) connections."""

    def __init__(self) -> None:
        self.reading = True

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def stopProducing(self) -> None:
        self.reading = False


class StartShutdownTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = Path(self.mktemp())
        self.pool = HeldPool()
        self.clock = ClockReactor()
        self.store = MboxMailStore(
            root / "mail", root / "index", self.clock, self.pool, clock=lambda: NOW
        )
        self.logged: list[str] = []

        def observe(event) -> None:
            self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_listeners_wait_for_the_start_up_recovery(self):
        gate = StartGate()
        port = ListeningPort()
        gate.hold(port)
        self.assertFalse(port.reading)
        self.pool.run_now = False
        RecoveryService(self.store, gate).startService()
        self.assertFalse(port.reading)  # the recovery is still on the pool
        self.pool.run()
        self.assertTrue(port.reading)
        late = ListeningPort()
        gate.hold(late)
        self.assertTrue(late.reading)

    def test_write_back_is_bounded_and_logs_what_is_left(self):
        self.successResultOf(self.store.deliver(USER, BytesSource(MSG1), "s@x"))
        folder = self.successResultOf(self.store.open_folder(USER, "INBOX"))
        self.successResultOf(folder.set_flags({1: {FLAGGED}}))
        self.pool.run_now = False
        d = self.store.write_back(10.0)
        self.assertNoResult(d)
        self.clock.advance(10)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(
            any("flags of 1 folders not written" in line for line in self.logged), self.logged
        )
        self.assertTrue(any(f"{USER} INBOX" in line for line in self.logged), self.logged)
        self.pool.run()  # the write still finishes, after the deadline
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_write_back_writes_with_the_session_open(self):
        self.successResultOf(self.store.deliver(USER, BytesSource(MSG1), "s@x"))
        folder = self.successResultOf(self.store.open_folder(USER, "INBOX"))
        self.successResultOf(folder.set_flags({1: {FLAGGED}}))
        self.successResultOf(self.store.write_back(10.0))
        self.assertIn(b"X-Status: F\n", folder_file(self.store).read_bytes())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_recovery_removes_a_journal_whose_folder_is_gone(self):
        base = self.store.index_dir / "example.test" / "alice"
        base.mkdir(parents=True)
        (base / "Gone.rewrite").write_bytes(b'{"ino": 1}\n')
        self.assertEqual(self.successResultOf(self.store.recover_pending()), 0)
        self.assertTrue(
            any("cannot finish the interrupted rewrite" in line for line in self.logged),
            self.logged,
        )
        # it would otherwise be met again at every start
        self.assertEqual(sorted(p.name for p in base.iterdir()), [])


def folder_file(store: MboxMailStore) -> Path:
    return store.mail_dir / "example.test" / "alice" / "INBOX"
