"""
The delivery target contract: one suite run against every L{IDeliveryTarget}
(the mail store's and the outbound queue's), on their real disk layouts.

Disk work waits in a L{HeldThreadPool} until the test runs it, so a test can
see that commit fires only after the disk work (with its fsync) is done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailsrv.interfaces import IDelivery, IDeliveryTarget
from mailsrv.replies import ReplyError
from mailsrv.spool import BytesSource

SENDER = "carol@remote.test"
MESSAGE = b"From: carol@remote.test\nSubject: hello\n\nThe body.\nFrom the start\n"


class HeldThreadPool:
    """A thread pool whose work waits until the test runs it (in the test's thread)."""

    def __init__(self) -> None:
        self.held: list[tuple[Any, Any, tuple, dict]] = []

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        self.held.append((on_result, func, args, kwargs))

    def run_all(self) -> int:
        """Run the waiting work, and any it leads to; return how many jobs ran."""
        ran = 0
        while self.held:
            on_result, func, args, kwargs = self.held.pop(0)
            ran += 1
            try:
                result = func(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)
        return ran


class ThreadedClock(task.Clock):
    """A clock that also runs what the thread pool hands back."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class SyncRecorder:
    """Records the paths of the files and folders fsynced (or fdatasynced), calling the real ones."""

    def __init__(self, case: Any) -> None:
        self.paths: list[str] = []
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)
            case.patch(os, name, self._wrap(real))

    def _wrap(self, real: Any) -> Any:
        def synced(fd: int) -> None:
            try:
                self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                self.paths.append("?")
            real(fd)

        return synced


class DeliveryTargetContract:
    """
    Mixin for a SynchronousTestCase. Subclasses set C{self.root} (everything
    the target writes lives under it) and define:

      make_target(pool, clock)  the target, its disk work in C{pool}
      recipient(n)              the n-th recipient the target takes (n >= 0)
      address(n)                the address it is delivered to
      refused_recipient()       one the target refuses
      delivered()               [(address, message as LF text)], read afresh from disk
    """

    root: Path

    def make_target(self, pool: Any, clock: Any) -> Any:
        raise NotImplementedError

    def recipient(self, n: int) -> Any:
        raise NotImplementedError

    def address(self, n: int) -> str:
        raise NotImplementedError

    def refused_recipient(self) -> Any:
        raise NotImplementedError

    def delivered(self) -> list[tuple[str, bytes]]:
        raise NotImplementedError

    def setUp(self):
        self.pool = HeldThreadPool()
        self.clock = ThreadedClock()
        self.clock.advance(1_700_000_000)
        self.target = self.make_target(self.pool, self.clock)

    def files(self) -> list[str]:
        return sorted(
            str(Path(d, f).relative_to(self.root))
            for d, _, names in os.walk(self.root)
            for f in names
        )

    def commit(self, delivery: Any) -> Any:
        d = delivery.commit()
        self.pool.run_all()
        return self.successResultOf(d)

    # tests

    def test_interfaces(self):
        verifyObject(IDeliveryTarget, self.target)
        verifyObject(IDelivery, self.target.start(SENDER))

    def test_commit_delivers_each_recipient_once(self):
        delivery = self.target.start(SENDER)
        for n in (0, 1, 0):  # a recipient added twice counts once
            delivery.add_recipient(self.recipient(n))
        delivery.body(BytesSource(MESSAGE))
        self.commit(delivery)
        got = self.delivered()
        self.assertEqual(sorted(a for a, _ in got), sorted([self.address(0), self.address(1)]))
        for _, data in got:
            self.assertTrue(data.endswith(MESSAGE), data)

    def test_commit_fires_once_the_copies_are_durable(self):
        synced = SyncRecorder(self)
        delivery = self.target.start(SENDER)
        delivery.add_recipient(self.recipient(0))
        delivery.body(BytesSource(MESSAGE))
        d = delivery.commit()
        self.assertNoResult(d)  # nothing is written yet
        self.assertEqual(self.delivered(), [])
        self.assertGreater(self.pool.run_all(), 0)
        self.successResultOf(d)
        self.assertTrue([p for p in synced.paths if p.startswith(str(self.root))], synced.paths)
        self.assertEqual([a for a, _ in self.delivered()], [self.address(0)])

    def test_abort_leaves_nothing_behind(self):
        delivery = self.target.start(SENDER)
        delivery.add_recipient(self.recipient(0))
        delivery.add_recipient(self.recipient(1))
        delivery.body(BytesSource(MESSAGE))
        delivery.abort()
        self.pool.run_all()
        self.assertEqual(self.files(), [])
        self.assertEqual(self.delivered(), [])
        self.assertRaises(RuntimeError, delivery.commit)

    def test_a_refused_recipient_leaves_the_others(self):
        delivery = self.target.start(SENDER)
        delivery.add_recipient(self.recipient(0))
        with self.assertRaises(ReplyError) as e:
            delivery.add_recipient(self.refused_recipient())
        self.assertTrue(e.exception.reply.permanent)
        self.assertTrue(e.exception.cause)  # what is logged, apart from the reply
        delivery.body(BytesSource(MESSAGE))
        self.commit(delivery)
        self.assertEqual([a for a, _ in self.delivered()], [self.address(0)])

    def test_commit_without_recipients_delivers_nothing(self):
        delivery = self.target.start(SENDER)
        delivery.body(BytesSource(MESSAGE))
        self.assertIsNone(self.commit(delivery))
        self.assertEqual(self.files(), [])

    def test_deliveries_are_independent(self):
        first = self.target.start(SENDER)
        second = self.target.start("")
        first.add_recipient(self.recipient(0))
        second.add_recipient(self.recipient(1))
        first.body(BytesSource(MESSAGE))
        second.body(BytesSource(MESSAGE))
        second.abort()
        self.commit(first)
        self.assertEqual([a for a, _ in self.delivered()], [self.address(0)])
