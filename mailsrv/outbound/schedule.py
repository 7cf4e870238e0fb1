"""
When the relayer tries what: the retry schedule (when to try a deferred
message again, when to warn the sender that it is delayed, when to give up:
pure functions of the attempt count, the arrival time and ``now``), the
messages due (L{DueMessages}, which starts each attempt when it is due and
never two of one message at once) and the limit of sessions at once per
destination (L{DestinationLimits}).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.config import RelayConfig
from mailsrv.outbound.envelope import Envelope

FINISHED_KEPT = 10_000  # ids of removed messages remembered


@dataclass(frozen=True)
class RetrySchedule:
    """
    Back-off like Postfix's: C{retry_min} after the first failure, doubling
    up to C{retry_max}; no attempt after C{created + max_lifetime}, but one
    last attempt at that moment so a message is never given up early.
    """

    retry_min: float = 300
    retry_max: float = 3600
    max_lifetime: float = 5 * 86400
    delay_warning: float = 4 * 3600  # 0: never warn

    @classmethod
    def from_config(cls, relay: RelayConfig) -> RetrySchedule:
        return cls(relay.retry_min, relay.retry_max, relay.max_lifetime, relay.delay_warning)

    def delay(self, attempts: int) -> float:
        """The wait after the C{attempts}-th failed attempt (attempts >= 1)."""
        if attempts <= 0:
            return 0.0
        # Doubling, capped; the exponent is bounded so huge counts do not overflow.
        return float(min(self.retry_min * 2 ** min(attempts - 1, 62), self.retry_max))

    def expired(self, created: float, now: float) -> bool:
        """Whether a message that arrived at C{created} is past its lifetime."""
        return now >= created + self.max_lifetime

    def next_attempt(self, attempts: int, created: float, now: float) -> float | None:
        """
        The time of the next attempt after C{attempts} failed ones, or None
        when the message has expired and must be bounced.
        """
        if self.expired(created, now):
            return None
        return min(now + self.delay(attempts), created + self.max_lifetime)

    def should_warn(self, created: float, now: float, warned: bool) -> bool:
        """Whether to send the one "delayed" DSN now (RFC 3464 Action: delayed)."""
        return (
            not warned
            and self.delay_warning > 0
            and self.delay_warning < self.max_lifetime
            and now >= created + self.delay_warning
        )


class DueMessages:
    """
    The queued messages the relayer knows of: starts C{attempt(envelope)}
    for each when its C{next_attempt} comes (never two attempts of one
    message at once), and wakes up for the next one on C{reactor}'s clock.
    """

    def __init__(
        self,
        reactor: Any,
        attempt: Callable[[Envelope], defer.Deferred],
        schedule: RetrySchedule,
        log: Logger,
    ) -> None:
        self.reactor = reactor
        self.attempt = attempt
        self.schedule = schedule
        self.log = log
        self.running = False
        self.entries: dict[str, Envelope] = {}
        self.active: dict[str, defer.Deferred] = {}  # the attempts under way
        self._timer: Any = None
        self._due: list[tuple[float, int, str]] = []  # heap of (next attempt, seq, id)
        self._seq = itertools.count()
        # Ids of messages done and removed lately: a late notice of one of them
        # (the relay process hears of a message it may have found on disk first)
        # must not start it again.
        self._finished: dict[str, None] = {}
        # On hold (mailsrv.outbound.marks): known, never started until released.
        self.held: set[str] = set()
        self._requeued: set[str] = set()  # asked while under way: requeued after it

    def start(self) -> None:
        """From the next L{wake} on, start each message when it is due."""
        self.running = True

    def stop(self) -> None:
        """Start nothing more (the attempts under way, in L{active}, go on)."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def known(self, queue_id: str) -> bool:
        """Whether the message is queued here, under way, or done lately."""
        return queue_id in self.entries or queue_id in self._finished or queue_id in self.active

    def add(self, env: Envelope) -> bool:
        """
        A message to deliver, not started yet (False: it is known already, or
        done). Call L{wake} to start it if due.
        """
        if env.id in self.entries or env.id in self._finished:
            return False
        self.entries[env.id] = env
        self._push(env)
        return True

    def flush(self) -> None:
        """Make every queued message due now (those under way or on hold keep their turn)."""
        now = self.reactor.seconds()
        for env in self.entries.values():
            if env.id not in self.active and env.id not in self.held and env.next_attempt > now:
                env.next_attempt = now
                self._push(env)
        self.wake()

    def dropped(self, queue_id: str) -> None:
        """The message was removed from the queue by someone else: forget it."""
        del self.entries[queue_id]
        self.held.discard(queue_id)

    def hold(self, queue_id: str) -> None:
        """The message is on hold: start no attempt of it (one under way goes on)."""
        self.held.add(queue_id)

    def release(self, queue_id: str) -> None:
        """The hold is off: the message is due again at its C{next_attempt}."""
        self.held.discard(queue_id)
        env = self.entries.get(queue_id)
        if env is not None and queue_id not in self.active:
            self._push(env)
            self.wake()

    def requeue(self, queue_id: str) -> None:
        """
        The next attempt now (unless on hold), with the back-off from the
        start; a message under way is requeued when its attempt is over.
        """
        env = self.entries.get(queue_id)
        if env is None:
            return
        if queue_id in self.active:
            self._requeued.add(queue_id)
            return
        env.attempts = 0
        env.next_attempt = self.reactor.seconds()
        self._push(env)
        self.wake()

    def finished(self, queue_id: str) -> None:
        """The message is done and removed: forget it, but remember it was here."""
        self.entries.pop(queue_id, None)
        self.held.discard(queue_id)
        self._requeued.discard(queue_id)
        self._finished[queue_id] = None
        if len(self._finished) > FINISHED_KEPT:
            del self._finished[next(iter(self._finished))]

    def _push(self, env: Envelope) -> None:
        heapq.heappush(self._due, (env.next_attempt, next(self._seq), env.id))

    def wake(self) -> None:
        """Start every message that is due; wake up when the next one is."""
        if not self.running:
            return
        now = self.reactor.seconds()
        while self._due and self._due[0][0] <= now:
            when, _, queue_id = heapq.heappop(self._due)
            env = self.entries.get(queue_id)
            # Entries left behind by a reschedule or a removal are skipped,
            # and so are messages on hold (a release pushes them again).
            if (
                env is None
                or queue_id in self.active
                or queue_id in self.held
                or env.next_attempt != when
            ):
                continue
            self._start(env)
        if not self._due:
            return
        wake = self._due[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= wake:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, wake - now), self.wake)

    def _start(self, env: Envelope) -> None:
        d = self.attempt(env)
        self.active[env.id] = d

        def failed(f: Failure) -> None:
            self.log.failure("{queue_id}: delivery attempt failed", f, queue_id=env.id)
            # Whatever went wrong, the message waits for the back-off before
            # its next try: never a loop that starts it again at once.
            now = self.reactor.seconds()
            if env.next_attempt <= now:
                env.next_attempt = now + self.schedule.delay(max(env.attempts, 1))

        def done(_: Any) -> None:
            self.active.pop(env.id, None)
            if env.id in self._requeued:
                self._requeued.discard(env.id)
                self.requeue(env.id)
            elif env.id in self.entries:
                self._push(env)
            self.wake()

        d.addErrback(failed)
        d.addBoth(done)


class DestinationLimits:
    """
    At most C{limit} sessions at once per destination (a domain, or the
    smarthost); a destination's semaphore is kept only while it is in use.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphores: dict[str, defer.DeferredSemaphore] = {}

    def acquire(self, destination: str) -> defer.Deferred:
        """Fires when a session to C{destination} may start; then call L{release}."""
        sem = self._semaphores.setdefault(destination, defer.DeferredSemaphore(self.limit))
        return sem.acquire()

    def release(self, destination: str) -> None:
        """A session to C{destination} is over."""
        sem = self._semaphores[destination]
        sem.release()
        if sem.tokens == sem.limit and not sem.waiting:
            self._semaphores.pop(destination, None)  # idle: not one per domain ever seen
