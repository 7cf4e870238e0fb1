"""
The messages due and the sessions at once per destination, on a Clock:
each message starts when due, never twice at once, a failed attempt waits
for the back-off, and a destination's limit holds.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.trial import unittest

from mailsrv.outbound.queue import Envelope, Recipient
from mailsrv.outbound.schedule import DestinationLimits, DueMessages, RetrySchedule


def _env(queue_id: str, when: float) -> Envelope:
    return Envelope(queue_id, "a@example.test", [Recipient("b@remote.test")], when, when)


class DueMessagesTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.started: list[tuple[str, float]] = []
        self.attempts: dict[str, defer.Deferred] = {}
        self.due = DueMessages(
            self.clock, self._attempt, RetrySchedule(retry_min=300, retry_max=3600), Logger()
        )

    def _attempt(self, env: Envelope) -> defer.Deferred:
        self.started.append((env.id, self.clock.seconds()))
        d: defer.Deferred = defer.Deferred()
        self.attempts[env.id] = d
        return d

    def test_each_message_starts_when_due_and_not_before_start(self):
        self.assertTrue(self.due.add(_env("A", 1000)))
        self.assertTrue(self.due.add(_env("B", 1030)))
        self.due.wake()
        self.assertEqual(self.started, [])  # not started yet
        self.due.start()
        self.due.wake()
        self.assertEqual(self.started, [("A", 1000)])
        self.clock.advance(30)
        self.assertEqual(self.started, [("A", 1000), ("B", 1030)])
        self.assertEqual(set(self.due.active), {"A", "B"})

    def test_never_two_attempts_of_one_message_and_done_ones_stay_done(self):
        self.due.start()
        env = _env("A", 1000)
        self.due.add(env)
        self.due.wake()
        self.assertFalse(self.due.add(_env("A", 1000)))  # known: not added twice
        self.due.flush()  # under way: keeps its turn
        self.assertEqual(len(self.started), 1)
        env.next_attempt = 1100
        self.attempts["A"].callback(None)
        self.assertEqual(self.due.active, {})
        self.clock.advance(100)
        self.assertEqual(self.started, [("A", 1000), ("A", 1100)])
        self.due.finished("A")
        self.attempts["A"].callback(None)
        self.assertFalse(self.due.add(_env("A", 1200)))  # a late notice of a message done
        self.assertTrue(self.due.known("A"))
        self.clock.advance(1000)
        self.assertEqual(len(self.started), 2)

    def test_flush_makes_everything_due_now(self):
        self.due.start()
        self.due.add(_env("A", 5000))
        self.due.add(_env("B", 9000))
        self.due.wake()
        self.assertEqual(self.started, [])
        self.due.flush()
        self.assertEqual(self.started, [("A", 1000), ("B", 1000)])

    def test_a_failed_attempt_waits_for_the_back_off(self):
        self.due.start()
        env = _env("A", 1000)
        self.due.add(env)
        self.due.wake()
        self.attempts["A"].errback(RuntimeError("boom"))
        self.assertEqual(env.next_attempt, 1300)  # never again at once
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(299)
        self.assertEqual(len(self.started), 1)
        self.clock.advance(1)
        self.assertEqual(self.started[-1], ("A", 1300))

    def test_dropped_and_stopped(self):
        self.due.start()
        self.due.add(_env("A", 1500))
        self.due.wake()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.due.dropped("A")
        self.assertEqual(self.due.entries, {})
        self.due.add(_env("B", 1500))
        self.due.wake()
        self.due.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.due.wake()
        self.assertEqual(self.started, [])


class DestinationLimitsTests(unittest.TestCase):
    def test_at_most_the_limit_per_destination_and_nothing_kept_when_idle(self):
        limits = DestinationLimits(2)
        a1, a2, a3 = (limits.acquire("a.test") for _ in range(3))
        b1 = limits.acquire("b.test")
        self.successResultOf(a1)
        self.successResultOf(a2)
        self.assertNoResult(a3)  # the third session to a.test waits
        self.successResultOf(b1)  # another destination does not
        limits.release("a.test")
        self.successResultOf(a3)
        limits.release("a.test")
        limits.release("a.test")
        limits.release("b.test")
        self.assertEqual(limits._semaphores, {})
