"""
What delivery attempts found out, recorded: one log line per recipient and
attempt, and the envelope written back durably, one write at a time per
message. Local and remote delivery record here; the relayer saves and
removes here after a round.

While the relayer runs, disk work goes to the thread pool and writes to the
queue's batches; once it stops (the thread pool stops beside it) the last
results are written in line, blocking the reactor briefly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mailsrv.logsafe import SafeLogger
from mailsrv.outbound.client import RemoteReply
from mailsrv.outbound.envelope import FAILED, PENDING, SENT, Envelope, Recipient
from mailsrv.outbound.queue import OutboundQueue

# Every part of the relayer logs under the namespace its lines have always
# had, which administrators grep for ("[mailsrv.outbound.relayer.Relayer#info]").
LOG_NAMESPACE = "mailsrv.outbound.relayer.Relayer"


def relayer_logger(source: object) -> SafeLogger:
    """A logger for a part of the relayer, under L{LOG_NAMESPACE}."""
    return SafeLogger(namespace=LOG_NAMESPACE, source=source)


class Results:
    """Records the results of delivery attempts; see the module docstring."""

    def __init__(self, queue: OutboundQueue, reactor: Any, threadpool: Any) -> None:
        """C{threadpool} None runs the disk work in line (tests on a fake clock)."""
        self.queue = queue
        self.reactor = reactor
        self.pool = threadpool
        self.running = False  # set by the relayer: started and not stopping
        self._locks: dict[str, defer.DeferredLock] = {}
        self.log = relayer_logger(self)

    def in_pool(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run blocking C{f} in the thread pool while running, else in line."""
        if self.pool is None or not self.running:
            # A fake clock in tests; or shutting down, when the thread pool
            # stops beside us: the results of the last sessions are still
            # written, blocking the reactor briefly.
            return defer.maybeDeferred(f, *args)
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def record(
        self, env: Envelope, r: Recipient, reply: RemoteReply, remote: str, relay: str
    ) -> None:
        """Note C{reply} as recipient C{r}'s result (in memory) and log its line."""
        now = self.reactor.seconds()
        r.attempts += 1
        r.last_attempt = now
        r.reply = reply_text = str(reply)
        r.remote = remote
        r.status = reply.status
        if reply.accepted:
            r.state, result = SENT, "sent"
        elif reply.permanent:
            r.state, result = FAILED, "bounced"
        else:
            result = "deferred"
        if not reply.accepted:
            env.last_error = r.reply
        delay = now - env.created
        # One line per recipient and attempt, built with an f-string: far cheaper
        # than twisted.logger's per-field formatting in the text observer; the
        # named fields stay in the event.
        self.log.info(
            "{text}",
            text=f"{env.id}: to=<{r.address}>, relay={relay}, delay={delay:.2f}, "
            f"dsn={r.status}, status={result} ({reply_text})",
            queue_id=env.id,
            rcpt=r.address,
            relay=relay,
            delay=delay,
            status=r.status,
            result=result,
            reply=reply_text,
        )

    def _lock(self, env: Envelope) -> defer.DeferredLock:
        return self._locks.setdefault(env.id, defer.DeferredLock())

    def save(self, env: Envelope) -> defer.Deferred:
        """Rewrite the envelope durably, one write at a time per message."""
        return self._lock(env).run(self._queue_save, env)

    def remove(self, env: Envelope) -> defer.Deferred:
        """Remove the delivered message (not synced), after the writes before it."""
        return self._lock(env).run(self._queue_remove, env.id)

    def forget(self, queue_id: str) -> None:
        """The message is gone: drop what was kept for it."""
        self._locks.pop(queue_id, None)

    def checkpoint(self, env: Envelope, rcpts: Sequence[Recipient]) -> defer.Deferred:
        """
        After one session: if some of its recipients are now done while others
        of the message are still pending, record it durably, so that a restart
        never sends to them again. Otherwise the end of the round (a rewrite,
        or the DSN then the removal) is the record.
        """
        if env.pending() and any(r.state != PENDING for r in rcpts):
            return self.save(env)
        return defer.succeed(None)

    def _queue_save(self, env: Envelope) -> defer.Deferred:
        """A save, in the queue's next batch (or in line when stopping)."""
        if self.pool is None or not self.running:
            return defer.maybeDeferred(self.queue.save_in_line, env)
        return self.queue.save(env)

    def _queue_remove(self, queue_id: str) -> defer.Deferred:
        """A removal of delivered mail (not synced), in the queue's next batch (or in line)."""
        if self.pool is None or not self.running:
            return defer.maybeDeferred(self.queue.remove_in_line, queue_id, False)
        return self.queue.remove(queue_id, False)
