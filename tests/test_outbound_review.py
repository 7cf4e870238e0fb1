"""
Failure modes of the relay process and the queue: a bounce that cannot be
sent waits for the back-off before its next try, the disk thread pool
outlives the relay process, and nothing is written into a relay process's
pipe that is already gone.
"""

from __future__ import annotations

from twisted.internet import defer, error, task
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.trial import unittest

from mailsrv.config import parse
from mailsrv.outbound import ipc
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.process import RelayProcessProtocol, ServerSide
from mailsrv.outbound.queue import OutboundQueue
from mailsrv.service import ThreadPoolService, build_service
from mailsrv.spool import BytesSource
from tests.test_outbound_process import _ProcessReactor
from tests.test_outbound_support import temp_dir


class _RefusingResolver:
    """Every domain is refused for good: each recipient fails and the sender gets a bounce."""

    def resolve(self, domain):
        return defer.fail(DeliveryError(True, "5.1.2", f"no such domain {domain}"))


class _Passwords:
    def lookup(self, address):
        return address if address == "alice@example.test" else None

    def has_user(self, address):
        return self.lookup(address) is not None


class _FailingMailboxes:
    """
    The server cannot store mail (disk full): a delivery fails on the next
    turn, the first C{failures} times (a bound, so that the loop under test ends).
    """

    def __init__(self, clock, failures: int = 5) -> None:
        self.clock = clock
        self.calls = 0
        self.failures = failures

    def deliver(self, user, source, sender):
        self.calls += 1
        if self.calls > self.failures:
            return defer.succeed(None)

        def fail():
            raise ipc.LocalDeliveryFailed("No space left on device")

        return task.deferLater(self.clock, 0, fail)


class BounceFailureTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        data = temp_dir(self) / "data"
        self.config = parse(f"""
[server]
hostname = "mail.example.test"
data_dir = "{data}"
[relay]
retry_min = "5m"
retry_max = "1h"
""")
        self.queue = OutboundQueue(self.config.queue_dir, self.clock, None)
        self.mailboxes = _FailingMailboxes(self.clock)
        self.relayer = build_relayer(
            self.config,
            queue=self.queue,
            reactor=self.clock,
            threadpool=None,
            resolver=_RefusingResolver(),
            mailboxes=self.mailboxes,
            passwords=_Passwords(),
        )
        self.successResultOf(self.relayer.start())
        self.addCleanup(self.relayer.stop)
        # Each failed round logs the failure; that is expected here.
        self.addCleanup(self.flushLoggedErrors, ipc.LocalDeliveryFailed)

    def test_a_bounce_that_cannot_be_delivered_waits_before_the_next_try(self):
        self.successResultOf(
            self.queue.enqueue("alice@example.test", ["bob@gone.test"], BytesSource(b"\n"))
        )
        self.assertEqual(self.mailboxes.calls, 1)
        self.clock.advance(0)  # the reactor's next turn; no time passes
        # The next try waits for the retry schedule (minutes), not the next turn.
        self.assertEqual(self.mailboxes.calls, 1)


class ShutdownOrderTests(unittest.TestCase):
    """The whole server as build_service wires it, on a fake reactor."""

    def setUp(self):
        data = temp_dir(self) / "data"
        self.config = parse(f"""
[server]
hostname = "mail.example.test"
data_dir = "{data}"
""")
        self.reactor = _ProcessReactor()
        self.top = build_service(self.config, self.reactor)
        (self.pool_service,) = [s for s in self.top if isinstance(s, ThreadPoolService)]
        self.top.startService()
        self.addCleanup(self._stop_pool)

    def _stop_pool(self) -> None:
        if self.pool_service.pool.started:
            self.pool_service.pool.stop()

    def test_the_disk_pool_outlives_the_relay_process(self):
        (child,) = self.reactor.spawned
        child.answer(b"1")  # Start
        stopped = self.top.stopService()
        self.assertNoResult(stopped)  # waits for the relay process to end
        # Until it ends, it may still ask for local deliveries and DSNs to
        # local senders: the mailbox store needs its thread pool.
        self.assertTrue(self.pool_service.pool.started)
        child.end(error.ProcessDone(0))
        self.successResultOf(stopped)
        self.assertFalse(self.pool_service.pool.started)


class _PipedProcess:
    """Like Twisted's Process: a pipe the child closed is gone from C{pipes}, and writing to it fails."""

    def __init__(self) -> None:
        self.pipes: dict[int, list[bytes]] = {0: [], ipc.CHILD_IN: []}

    def closeStdin(self) -> None:
        self.pipes.pop(0, None)

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.pipes[fd].append(data)  # KeyError once the pipe is gone, as in Twisted

    def closeChildFD(self, fd: int) -> None:
        self.pipes.pop(fd, None)


class _HeldMailboxes:
    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def deliver(self, user, source, sender):
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


class DeadPipeTests(unittest.TestCase):
    def test_an_answer_for_a_relay_process_that_died_is_dropped_quietly(self):
        tmp = temp_dir(self)
        mailboxes = _HeldMailboxes()
        proto = RelayProcessProtocol(ServerSide(mailboxes, tmp / "queue"), MemoryReactorClock())
        process = _PipedProcess()
        proto.makeConnection(process)
        box = amp.AmpBox(
            _command=b"DeliverLocal",
            _ask=b"1",
            recipient=b"bob@example.test",
            sender=b"",
            size=b"2",
            data=b"x\n",
        )
        proto.childDataReceived(ipc.CHILD_OUT, box.serialize())
        self.assertEqual(len(mailboxes.pending), 1)
        # The relay process dies: Twisted sees its command pipe close first.
        del process.pipes[ipc.CHILD_IN]
        proto.childConnectionLost(ipc.CHILD_IN)
        mailboxes.pending[0].callback(None)  # the mailbox write finishes afterwards
        self.assertEqual(self.flushLoggedErrors(KeyError), [])
