"""
Group commit: callers submit items one by one and each gets a Deferred; the
items submitted while a batch is waiting to start or running are committed
together, in one call (one lock, one fsync for all of them), and each item's
Deferred fires with its own result or failure.

    commits = GroupCommit(run, max_batches=2, clock=reactor)
    d = commits.submit(item)            # fires when the batch holding it is done
    d = commits.submit(item, lazy=True) # nobody waits: may wait LAZY_DELAY for company

C{run(take)} starts one batch and returns a Deferred. It calls C{take()} when
the batch really starts (say, when the job reaches the head of a queue):
that returns the items gathered so far, and items submitted after it go into
the next batch. The Deferred fires with one C{(ok, value)} per item taken, in
order (as L{defer.DeferredList} gives them): C{(True, result)} or
C{(False, exception or Failure)}; if it fails, every item of the batch fails
with it. At most C{max_batches} batches are started and not yet done (None:
no bound; a batch that has not taken its items yet counts, and there is only
ever one such batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")

LAZY_DELAY = 0.01  # seconds a lazy item waits for others to share its batch

Outcome = tuple[bool, Any]  # (True, result) or (False, exception or Failure)


class GroupCommit(Generic[T]):
    """Gathers submitted items into batches and commits each batch in one call of C{run}."""

    def __init__(
        self,
        run: Callable[[Callable[[], list[T]]], defer.Deferred],
        max_batches: int | None = 1,
        clock: Any = None,
        lazy_delay: float = LAZY_DELAY,
    ) -> None:
        """C{clock} (an L{IReactorTime}) is needed only for lazy items."""
        self._run = run
        self.max_batches = max_batches
        self._clock = clock
        self._lazy_delay = lazy_delay
        self._items: list[T] = []
        self._waiters: list[defer.Deferred] = []
        self._in_flight = 0
        self._open = False  # a batch is started and has not taken its items yet
        self._lazy_call: Any = None

    @property
    def waiting(self) -> int:
        """How many items are submitted and not yet taken by a batch."""
        return len(self._items)

    @property
    def in_flight(self) -> int:
        """How many batches are started and not yet done."""
        return self._in_flight

    def submit(self, item: T, lazy: bool = False) -> defer.Deferred:
        """
        Commit C{item} in the next batch; fires with its result. A C{lazy} item
        waits up to the lazy delay for others to share its batch (for work
        nobody waits for), unless a batch starts before.
        """
        d: defer.Deferred = defer.Deferred()
        self._items.append(item)
        self._waiters.append(d)
        if lazy:
            if self._lazy_call is None:
                self._lazy_call = self._clock.callLater(self._lazy_delay, self._run_lazy)
        else:
            self._maybe_start()
        return d

    def flush_lazy(self) -> None:
        """Start the waiting lazy items now (when stopping)."""
        if self._lazy_call is not None:
            self._lazy_call.cancel()
            self._run_lazy()

    def _run_lazy(self) -> None:
        self._lazy_call = None
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self._open or not self._items:
            return
        if self.max_batches is not None and self._in_flight >= self.max_batches:
            return
        self._in_flight += 1
        self._open = True
        taken: list[list[defer.Deferred]] = []

        def take() -> list[T]:
            if taken:
                raise RuntimeError("a batch takes its items once")
            items, self._items = self._items, []
            waiters, self._waiters = self._waiters, []
            taken.append(waiters)
            self._open = False
            return items

        try:
            d = self._run(take)
        except BaseException:
            d = defer.fail()
        d.addBoth(self._done, taken, take)

    def _done(self, results: Any, taken: list[list[defer.Deferred]], take: Callable) -> None:
        if not taken:  # the batch failed before it took its items: they fail with it
            take()
        waiters = taken[0]
        self._in_flight -= 1
        if isinstance(results, Failure):
            results = [(False, results)] * len(waiters)
        elif len(results) != len(waiters):
            f = Failure(RuntimeError(f"{len(results)} results for a batch of {len(waiters)}"))
            results = [(False, f)] * len(waiters)
        for d, (ok, value) in zip(waiters, results, strict=True):
            if ok:
                d.callback(value)
            else:
                d.errback(value if isinstance(value, Failure) else Failure(value))
        self._maybe_start()
