"""
Message and recipient rate limits, per authenticated user and per client
address ([policy] C{messages_per_hour}, C{recipients_per_hour}).

Postfix's anvil model (smtpd_client_message_rate_limit,
smtpd_client_recipient_rate_limit), counted over a sliding hour rather than
anvil's fixed time unit: each counter keeps its events in slices of
C{window / slices} seconds (five minutes for an hour), and an event is
forgotten once a whole window has passed since the end of its slice. So no
client ever gets more than the limit within any hour, and a refused client
is told when the oldest slice it needs expires (the 451's "try again in").

Counted, per key: a message at each accepted MAIL FROM, a recipient at each
accepted RCPT TO (one per RCPT command: a mailing list or an alias the
client names is one recipient, whatever it expands to; the client sent one
address). The keys are the client address (an IPv6 client by its /64, as
L{mailsrv.auth.throttle} counts it) and, on submission, the logged-in user
too: a user cannot escape the limit by moving, nor many users behind one
address escape the address's.

Memory is bounded: only counted keys are kept, each with at most
C{slices + 1} slices; the least recently counted keys are swept out as
their slices expire, and past C{max_tracked} keys the least recently
counted is evicted (a spray of addresses forgets the oldest of them, it
never grows the table).

A pure function of the clock's time, so tests advance a task.Clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from mailsrv.auth.throttle import account_key, client_key
from mailsrv.replies import Reply, SMTPReplyError

HOUR = 3600.0
SLICES = 12  # an hour in five-minute slices
MAX_TRACKED = 100_000  # keys kept per counter; bounds memory under a spray of addresses
SWEEP_PER_COUNT = 2  # expired keys looked at, at most, per event counted (amortised)


@dataclass(frozen=True)
class RateRefusal:
    """A refusal: the reply for the client, the cause for the log."""

    reply: Reply
    cause: str


class SlidingCounter:
    """Events per key within a sliding window, in slices; None limit = no limit."""

    def __init__(
        self,
        clock: Any,
        limit: int,
        window: float = HOUR,
        slices: int = SLICES,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self._slice = window / slices
        self._slices = slices
        self._max = max_tracked
        # key -> [slice number, count, slice number, count, ...], oldest first;
        # the dict itself in order of last count, least recent first.
        self._keys: OrderedDict[str, list[int]] = OrderedDict()

    def _now_slice(self) -> int:
        return int(self._clock.seconds() // self._slice)

    def _live(self, key: str, now_slice: int) -> list[int] | None:
        """C{key}'s unexpired slices (dropping the expired ones), or None."""
        slots = self._keys.get(key)
        if slots is None:
            return None
        # A slice s is kept while now < (s + 1) * slice + window: s >= now - slices.
        oldest = now_slice - self._slices
        i = 0
        while i < len(slots) and slots[i] < oldest:
            i += 2
        if i:
            del slots[:i]
        if not slots:
            del self._keys[key]
            return None
        return slots

    def count(self, key: str) -> int:
        """How many events C{key} has within the window."""
        slots = self._live(key, self._now_slice())
        return 0 if slots is None else sum(slots[1::2])

    def retry_after(self, key: str) -> float | None:
        """None if C{key} is under the limit; else the seconds until it is."""
        if self.limit <= 0:
            return None
        slots = self._live(key, self._now_slice())
        if slots is None:
            return None
        total = sum(slots[1::2])
        if total < self.limit:
            return None
        for i in range(0, len(slots), 2):
            total -= slots[i + 1]
            if total < self.limit:
                expires = (slots[i] + 1 + self._slices) * self._slice
                return max(expires - self._clock.seconds(), 0.0)
        raise AssertionError("unreachable: the total drops to 0")

    def add(self, key: str) -> None:
        """Count one event for C{key} now."""
        if self.limit <= 0:
            return
        now_slice = self._now_slice()
        slots = self._live(key, now_slice)
        if slots is None:
            self._keys[key] = [now_slice, 1]
        else:
            if slots[-2] == now_slice:
                slots[-1] += 1
            else:
                slots += [now_slice, 1]
            self._keys.move_to_end(key)
        self._sweep(now_slice)
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)

    def _sweep(self, now_slice: int) -> None:
        """Forget a few least recently counted keys whose slices have all expired."""
        oldest = now_slice - self._slices
        for _ in range(SWEEP_PER_COUNT):
            if not self._keys:
                return
            key, slots = next(iter(self._keys.items()))
            if slots[-2] >= oldest:
                return  # the least recent key is live: so are all the others
            del self._keys[key]

    def tracked(self) -> int:
        """How many keys are kept: what bounds the memory used."""
        return len(self._keys)


# 451 (RFC 5321 4.2.2: requested action aborted), 4.7.1 delivery not
# authorized, message refused (RFC 3463 3.8): a temporary policy refusal.
_CODE, _ENHANCED = 451, "4.7.1"


def rate_keys(client: str, user: str | None) -> list[str]:
    """The keys a session counts against: its user (submission), its client address."""
    keys = [] if user is None else ["user:" + account_key(user)]
    keys.append("ip:" + client_key(client))
    return keys


class RateLimits:
    """The message and recipient limits of a server, shared by its SMTP listeners."""

    def __init__(
        self,
        clock: Any,
        messages_per_hour: int,
        recipients_per_hour: int,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.messages = SlidingCounter(clock, messages_per_hour, max_tracked=max_tracked)
        self.recipients = SlidingCounter(clock, recipients_per_hour, max_tracked=max_tracked)

    def message_refusal(self, keys: list[str]) -> RateRefusal | None:
        """Whether another message by a session counted as C{keys} is refused."""
        return _refusal(self.messages, keys, "messages")

    def recipient_refusal(self, keys: list[str]) -> RateRefusal | None:
        """Whether another recipient by a session counted as C{keys} is refused."""
        return _refusal(self.recipients, keys, "recipients")

    def count_message(self, keys: list[str]) -> None:
        """An accepted MAIL FROM."""
        for key in keys:
            self.messages.add(key)

    def count_recipient(self, keys: list[str]) -> None:
        """An accepted RCPT TO."""
        for key in keys:
            self.recipients.add(key)


def _refusal(counter: SlidingCounter, keys: list[str], what: str) -> RateRefusal | None:
    waits = [(w, k) for k in keys if (w := counter.retry_after(k)) is not None]
    if not waits:
        return None
    wait, key = max(waits)
    minutes = max(1, math.ceil(wait / 60))
    who = "your account" if key.startswith("user:") else "your address"
    when = "1 minute" if minutes == 1 else f"{minutes} minutes"
    text = f"Too many {what} from {who} this hour, try again in {when}"
    cause = f"{what}_per_hour {counter.limit} reached by {key}"
    return RateRefusal(Reply(_CODE, _ENHANCED, text), cause)


class SessionRates:
    """
    One SMTP session's side of the limits: MAIL and RCPT pass through it
    to the delivery's own checks (L{mail}, L{rcpt}); it refuses what is
    over a limit with L{SMTPReplyError} (451 4.7.1, the limit in the cause
    for the session's log line) and counts what the delivery accepts.
    """

    def __init__(self, ctx: Any, client: str) -> None:
        self._limits: RateLimits | None = getattr(ctx, "rates", None)
        self._is_local_domain = ctx.config.is_local_domain
        self._client = client
        self._keys: list[str] = []
        self._bounce = False  # this transaction is from <>
        self._hold: RateRefusal | None = None  # a bounce over the message limit

    def mail(self, delivery: Any, helo: Any, sender: str) -> Any:
        """C{delivery.validateFrom(helo, sender)} if the message limit allows."""
        if self._limits is None:
            return delivery.validateFrom(helo, sender)
        self._keys = rate_keys(self._client, getattr(delivery, "user", None))
        self._bounce = not sender
        over = self._limits.message_refusal(self._keys)
        if over is not None and not self._bounce:
            raise SMTPReplyError(over.reply, cause=over.cause)
        # A bounce over the limit may still reach postmaster: held to that at RCPT.
        self._hold = over
        return _then(delivery.validateFrom(helo, sender), self._mail_taken)

    def rcpt(self, delivery: Any, address: str) -> Any:
        """C{delivery.validateTo(address)} if the recipient limit allows."""
        if self._limits is None or self._exempt(address):
            return delivery.validateTo(address)
        over = self._hold or self._limits.recipient_refusal(self._keys)
        if over is not None:
            raise SMTPReplyError(over.reply, cause=over.cause)
        return _then(delivery.validateTo(address), self._rcpt_taken)

    def _exempt(self, address: str) -> bool:
        """RFC 5321 4.5.1: a bounce to our postmaster is never held back by a rate."""
        local, _, domain = address.rpartition("@")
        return self._bounce and local.lower() == "postmaster" and self._is_local_domain(domain)

    def _mail_taken(self) -> None:
        if self._hold is None and self._limits is not None:
            self._limits.count_message(self._keys)

    def _rcpt_taken(self) -> None:
        if self._limits is not None:
            self._limits.count_recipient(self._keys)


def _then(result: Any, taken: Any) -> Any:
    """C{result} (a Deferred or a value), calling C{taken} once it is a success."""
    if isinstance(result, defer.Deferred):

        def counted(value: Any) -> Any:
            taken()
            return value

        return result.addCallback(counted)
    taken()
    return result


__all__ = ["RateLimits", "RateRefusal", "SessionRates", "SlidingCounter", "rate_keys"]
