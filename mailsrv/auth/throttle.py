"""Refuse logins from an address that failed too often recently."""

from __future__ import annotations

from collections import deque


class LoginThrottle:
    """
    Count failed logins per client address over a sliding window. A pure
    function of the clock's time, so tests advance a task.Clock.
    """

    def __init__(self, clock, max_failures: int, window: float) -> None:
        self._clock = clock
        self._max = max_failures
        self._window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, host: str) -> deque[float]:
        q = self._failures.get(host)
        if q is None:
            return deque()
        cutoff = self._clock.seconds() - self._window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._failures[host]
        return q

    def blocked(self, host: str) -> bool:
        """Whether C{host} must be refused without checking its password."""
        return len(self._recent(host)) >= self._max

    def failed(self, host: str) -> None:
        self._recent(host)
        self._failures.setdefault(host, deque()).append(self._clock.seconds())
        if len(self._failures) > 100_000:  # bound memory under a spray of addresses
            for h in list(self._failures)[:50_000]:
                del self._failures[h]

    def succeeded(self, host: str) -> None:
        self._failures.pop(host, None)
