"""
The retry schedule: when to try a deferred message again, when to warn the
sender that it is delayed, and when to give up. Pure functions of the
attempt count, the arrival time and ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailsrv.config import RelayConfig


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
