"""The group-commit helper: batching, bounds, lazy items and per-item outcomes, on a fake clock."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from mailsrv.groupcommit import LAZY_DELAY, GroupCommit


class HeldRun:
    """A C{run} whose batches take their items at once and wait until the test finishes them."""

    def __init__(self, take_now: bool = True) -> None:
        self.take_now = take_now
        self.batches: list[tuple[list, defer.Deferred]] = []
        self.started: list = []  # the take() of batches that have not taken yet

    def __call__(self, take):
        d: defer.Deferred = defer.Deferred()
        if self.take_now:
            self.batches.append((take(), d))
        else:
            self.started.append((take, d))
        return d

    def take(self, i: int = 0) -> list:
        take, d = self.started.pop(i)
        items = take()
        self.batches.append((items, d))
        return items

    def finish(self, i: int = 0, outcome=None) -> None:
        items, d = self.batches.pop(i)
        d.callback(outcome if outcome is not None else [(True, x * 10) for x in items])


class GroupCommitTests(unittest.TestCase):
    def test_items_submitted_while_a_batch_runs_share_the_next(self):
        run = HeldRun()
        gc = GroupCommit(run, max_batches=1)
        ds = [gc.submit(i) for i in range(4)]
        self.assertEqual([b for b, _ in run.batches], [[0]])
        self.assertEqual(gc.waiting, 3)
        run.finish()
        self.assertEqual(self.successResultOf(ds[0]), 0)
        self.assertEqual([b for b, _ in run.batches], [[1, 2, 3]])
        self.assertNoResult(ds[1])
        run.finish()
        self.assertEqual([self.successResultOf(d) for d in ds[1:]], [10, 20, 30])
        self.assertEqual((gc.waiting, gc.in_flight), (0, 0))

    def test_batches_in_flight_are_bounded(self):
        run = HeldRun()
        gc = GroupCommit(run, max_batches=2)
        ds = [gc.submit(i) for i in range(5)]
        self.assertEqual([b for b, _ in run.batches], [[0], [1]])
        self.assertEqual(gc.in_flight, 2)
        run.finish(1)
        self.assertEqual([b for b, _ in run.batches], [[0], [2, 3, 4]])
        run.finish()
        run.finish()
        self.assertEqual([self.successResultOf(d) for d in ds], [0, 10, 20, 30, 40])

    def test_no_bound(self):
        run = HeldRun()
        gc = GroupCommit(run, max_batches=None)
        for i in range(3):
            gc.submit(i)
        self.assertEqual([b for b, _ in run.batches], [[0], [1], [2]])

    def test_a_batch_takes_its_items_when_it_starts(self):
        # as a job that waits in a queue: what arrives before it starts joins it
        run = HeldRun(take_now=False)
        gc = GroupCommit(run, max_batches=None)
        ds = [gc.submit(i) for i in range(3)]
        self.assertEqual(len(run.started), 1)  # one open batch, whatever the bound
        self.assertEqual(run.take(), [0, 1, 2])
        late = gc.submit(3)
        self.assertEqual(len(run.started), 1)  # the next batch opens at once
        run.finish()
        self.assertEqual([self.successResultOf(d) for d in ds], [0, 10, 20])
        self.assertEqual(run.take(), [3])
        run.finish()
        self.assertEqual(self.successResultOf(late), 30)

    def test_each_item_gets_its_own_outcome(self):
        run = HeldRun()
        gc = GroupCommit(run, max_batches=1)
        first = gc.submit("x")
        a, b = gc.submit("a"), gc.submit("b")
        run.finish()
        run.finish(outcome=[(False, ValueError("bad a")), (True, "ok b")])
        self.successResultOf(first)
        self.assertEqual(str(self.failureResultOf(a, ValueError).value), "bad a")
        self.assertEqual(self.successResultOf(b), "ok b")

    def test_a_failed_batch_fails_all_its_items(self):
        run = HeldRun()
        gc = GroupCommit(run, max_batches=2)
        first = gc.submit(0)
        ds = [gc.submit(i) for i in range(1, 3)]
        self.assertEqual([b for b, _ in run.batches], [[0], [1]])
        run.finish()
        self.assertEqual([b for b, _ in run.batches], [[1], [2]])
        items, d = run.batches.pop(1)
        d.errback(OSError("EIO"))
        self.failureResultOf(ds[1], OSError)
        self.assertNoResult(ds[0])
        run.finish()
        self.assertEqual(self.successResultOf(first), 0)
        self.assertEqual(self.successResultOf(ds[0]), 10)

    def test_a_run_that_raises_fails_its_items_and_the_helper_goes_on(self):
        calls = []

        def run(take):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("cannot start")
            return defer.succeed([(True, x) for x in take()])

        gc = GroupCommit(run, max_batches=1)
        self.failureResultOf(gc.submit(1), RuntimeError)
        self.assertEqual(self.successResultOf(gc.submit(2)), 2)

    def test_a_wrong_number_of_results_fails_the_batch(self):
        gc = GroupCommit(lambda take: defer.succeed([(True, 1)] * (len(take()) + 1)))
        self.failureResultOf(gc.submit(0), RuntimeError)

    def test_lazy_items_wait_for_company(self):
        clock = task.Clock()
        run = HeldRun()
        gc = GroupCommit(run, max_batches=1, clock=clock)
        ds = [gc.submit(i, lazy=True) for i in range(3)]
        self.assertEqual(run.batches, [])
        clock.advance(LAZY_DELAY)
        self.assertEqual([b for b, _ in run.batches], [[0, 1, 2]])
        run.finish()
        self.assertEqual([self.successResultOf(d) for d in ds], [0, 10, 20])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_waiting_item_takes_the_lazy_ones_along(self):
        clock = task.Clock()
        run = HeldRun()
        gc = GroupCommit(run, max_batches=1, clock=clock)
        lazy = gc.submit("l", lazy=True)
        gc.submit("w")
        self.assertEqual([b for b, _ in run.batches], [["l", "w"]])
        run.finish(outcome=[(True, 1), (True, 2)])
        self.assertEqual(self.successResultOf(lazy), 1)
        clock.advance(LAZY_DELAY)  # the timer finds nothing left to do
        self.assertEqual(run.batches, [])

    def test_flush_lazy_starts_them_now(self):
        clock = task.Clock()
        run = HeldRun()
        gc = GroupCommit(run, max_batches=1, clock=clock)
        d = gc.submit(1, lazy=True)
        gc.flush_lazy()
        self.assertEqual([b for b, _ in run.batches], [[1]])
        self.assertEqual(clock.getDelayedCalls(), [])
        run.finish()
        self.assertEqual(self.successResultOf(d), 10)
        gc.flush_lazy()  # nothing waiting: nothing happens
        self.assertEqual(run.batches, [])

    def test_a_lazy_item_waits_for_a_free_batch(self):
        clock = task.Clock()
        run = HeldRun()
        gc = GroupCommit(run, max_batches=1, clock=clock)
        gc.submit(0)
        lazy = gc.submit(1, lazy=True)
        clock.advance(LAZY_DELAY)
        self.assertEqual(len(run.batches), 1)  # the bound holds
        run.finish()
        self.assertEqual([b for b, _ in run.batches], [[1]])
        run.finish()
        self.assertEqual(self.successResultOf(lazy), 10)

    def test_a_callback_may_submit_again(self):
        run = HeldRun()
        gc = GroupCommit(run, max_batches=1)
        again = []
        gc.submit(1).addCallback(lambda _: again.append(gc.submit(2)))
        run.finish()
        self.assertEqual([b for b, _ in run.batches], [[2]])
        run.finish()
        self.assertEqual(self.successResultOf(again[0]), 20)
