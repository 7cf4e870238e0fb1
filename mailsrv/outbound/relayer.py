"""
The relayer: takes due messages from the queue, groups their pending
recipients by destination, delivers each group, records each recipient's
result durably, schedules retries and sends DSNs.

Its parts, as mox splits its ``queue/``:

- L{mailsrv.outbound.schedule}: when (the retry schedule, the messages due,
  the sessions at once per destination);
- L{mailsrv.outbound.remote}: remote recipients, MX lookup and SMTP sessions;
- L{mailsrv.routing}: where each recipient goes (a mailbox here, another
  server, or refused), the same routing step as SMTP intake's;
- L{mailsrv.outbound.local}: local recipients, into the server's mailboxes;
- L{mailsrv.outbound.bounces}: DSNs to the sender;
- L{mailsrv.outbound.results}: each result logged and written back.

L{mailsrv.outbound.build.build_relayer} puts them together. This module
holds what ties them: the life cycle, the queue folder watched for work,
one attempt of one message and the end of its round.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, task

from mailsrv import routing
from mailsrv.config import Config
from mailsrv.logsafe import SafeLogger
from mailsrv.outbound import dsn
from mailsrv.outbound.bounces import Bounces
from mailsrv.outbound.client import RemoteReply
from mailsrv.outbound.envelope import FAILED, Envelope, Recipient
from mailsrv.outbound.ipc import DRAIN_GRACE
from mailsrv.outbound.local import LocalRecipients, LocalRoute, recipient_domain
from mailsrv.outbound.queue import FolderState, OutboundQueue
from mailsrv.outbound.remote import SMARTHOST, RemoteDelivery
from mailsrv.outbound.results import Results
from mailsrv.outbound.schedule import DueMessages, RetrySchedule

__all__ = ["SMARTHOST", "Relayer", "recipient_domain"]

RECIPIENTS_PER_SESSION = 50  # like Postfix's smtp_destination_recipient_limit
# Seconds a session sending a message (DATA sent) has to finish when the relayer
# stops: cut after its final dot, it may have been accepted and would be sent
# again. Below the server's wait for the relay process (process.STOP_TIMEOUT).
SENDING_GRACE = 10.0
STOP_GRACE = SENDING_GRACE + 2.0  # seconds stop waits for attempts under way


class Relayer:
    """Delivers the queue; see the module docstring."""

    log = SafeLogger()

    def __init__(
        self,
        *,
        config: Config,
        queue: OutboundQueue,
        reactor: Any,
        results: Results,
        remote: RemoteDelivery,
        local: LocalRecipients | None,
        router: routing.Router,
        bounces: Bounces,
        schedule: RetrySchedule,
        scan_interval: float = 5.0,
    ) -> None:
        """
        C{local} None: no local mailboxes here, every recipient is remote.
        C{router}: the routing step, which says where each queued recipient
        goes (without C{local}, it knows no local domain).
        C{scan_interval}: seconds between looks at the queue folder.
        """
        self.config = config
        self.queue = queue
        self.reactor = reactor
        self.results = results
        self.remote = remote
        self.local = local
        self.router = router
        self.bounces = bounces
        self.schedule = schedule
        self.scan_interval = scan_interval
        self.due = DueMessages(reactor, self._attempt, schedule, self.log)
        self._unreadable: set[str] = set()  # logged once, then left to the administrator
        # Messages just queued (the server's notice), whose first attempt follows
        # at once and is the one that skips the read of the hold mark.
        self._fresh: set[str] = set()
        self._poller: task.LoopingCall | None = None

    @property
    def entries(self) -> dict[str, Envelope]:
        """The queued messages known, by id."""
        return self.due.entries

    # --- life cycle -------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """Load every envelope on disk and resume delivery."""
        self.results.running = True
        self.due.start()
        envelopes, bad = yield self.queue.scan()
        held = yield self.results.in_pool(self.queue.held)
        for queue_id in bad:
            self._unreadable.add(queue_id)
            self.log.error("{queue_id}: unreadable envelope left in the queue", queue_id=queue_id)
        for env in envelopes:
            if env.id in held:
                self.due.hold(env.id)
            self.due.add(env)
        self.log.info("relayer started with {n} queued message(s)", n=len(self.entries))
        self.queue.add_listener(self.queued)
        self._poller = task.LoopingCall(self._poll)
        self._poller.clock = self.reactor
        self._poller.start(self.scan_interval, now=False).addErrback(
            lambda f: self.log.failure("queue poll stopped", f)
        )
        self.due.wake()

    def stop(self, drain: bool = False) -> defer.Deferred:
        """
        Stop starting deliveries, abort the sessions under way but those
        sending a message (which get L{SENDING_GRACE}), and wait for their
        results to be saved. With C{drain} (a reload), the sessions under way
        are aborted only if they have not finished within L{DRAIN_GRACE}: one
        aborted after its final dot was sent is delivered again on a retry.
        """
        self.results.running = False
        self.queue.remove_listener(self.queued)
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self.due.stop()
        self.queue.flush_lazy()
        if not drain:
            self.remote.stop(SENDING_GRACE)
        # Wait for the attempts under way to record their results, but not for
        # a DNS query to time out: those recipients simply stay pending.
        done: defer.Deferred = defer.Deferred()

        def fire(_: Any = None) -> None:
            if drain:
                self.remote.stop()  # the idle connections; the sessions still under way
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(DRAIN_GRACE if drain else STOP_GRACE, fire)
        defer.DeferredList(list(self.due.active.values()), consumeErrors=True).addBoth(fire)
        return done.addBoth(lambda _: timer.cancel() if timer.active() else None)

    # --- work to do ---------------------------------------------------------

    def queued(self, env: Envelope) -> bool:
        """A message was queued: deliver it (False: it is known already, or done)."""
        if not self.due.add(env):
            return False
        self._fresh.add(env.id)
        self.due.wake()
        return True

    def flush(self) -> None:
        """Retry every queued message now."""
        self.due.flush()

    def _poll(self) -> defer.Deferred:
        """
        Notice ``queue flush``, ``delete``, ``hold``, ``release`` and
        ``requeue`` done by the admin command, and messages on disk nobody
        told us of (a notice from the server lost or held back: they are an
        optimisation, the queue folder is the truth).
        """
        d = self.queue.poll()

        def polled(state: FolderState) -> Any:
            ids, flush = state.ids, state.flush
            on_disk = set(ids)
            self._marks(state)
            unknown = [i for i in ids if not self.due.known(i) and i not in self._unreadable]
            for queue_id in list(self.entries):
                if queue_id not in on_disk and queue_id not in self.due.active:
                    self.log.info(
                        "{queue_id}: removed from the queue by the administrator", queue_id=queue_id
                    )
                    self.due.dropped(queue_id)
                    self._fresh.discard(queue_id)
                    self.results.forget(queue_id)
                    self.queue.take_recent(queue_id)
            if flush:
                self.log.info("queue flush requested")
                self.flush()
            if unknown:
                d = self.results.in_pool(self._load, unknown)
                return d.addCallback(self._found, state.held)
            return None

        return d.addCallback(polled).addErrback(lambda f: self.log.failure("queue poll failed", f))

    def _marks(self, state: FolderState) -> None:
        """
        Follow the administrator's marks: holds, then requeues (a message
        held again since keeps only the back-off reset), then releases.
        """
        for queue_id in self.entries:
            if queue_id in state.held and queue_id not in self.due.held:
                self.log.info("{queue_id}: on hold", queue_id=queue_id)
                self.due.hold(queue_id)
                self._fresh.discard(queue_id)
        for queue_id in state.requeue:
            if queue_id in self.entries:
                self.log.info("{queue_id}: requeued", queue_id=queue_id)
                self.due.requeue(queue_id)
        for queue_id in list(self.due.held):
            if queue_id not in state.held:
                self.log.info("{queue_id}: released from hold", queue_id=queue_id)
                self.due.release(queue_id)

    def _load(self, ids: list[str]) -> tuple[list[Envelope], list[str]]:
        """In a thread: the envelopes of C{ids}; the ids that are there but unreadable."""
        found, bad = [], []
        for queue_id in ids:
            try:
                found.append(self.queue.load_envelope(queue_id))
            except FileNotFoundError:
                pass  # delivered and removed meanwhile
            except (OSError, ValueError, TypeError, KeyError):
                bad.append(queue_id)
        return found, bad

    def _found(self, result: tuple[list[Envelope], list[str]], held: set[str]) -> None:
        found, bad = result
        for queue_id in bad:
            self._unreadable.add(queue_id)
            self.log.error("{queue_id}: unreadable envelope left in the queue", queue_id=queue_id)
        for env in found:
            if env.id in held:
                self.due.hold(env.id)
            if self.due.add(env):  # not fresh: its hold mark is read before its attempt
                self.due.wake()
                self.log.info("{queue_id}: found in the queue folder", queue_id=env.id)

    # --- one delivery attempt of one message -------------------------------

    @defer.inlineCallbacks
    def _attempt(self, env: Envelope):
        fresh = env.id in self._fresh
        self._fresh.discard(env.id)
        if not (fresh and env.attempts == 0):
            # Before every other attempt the hold mark is read again: a message
            # put on hold is not attempted, even before the next folder scan
            # (a requeue, which resets the attempts, included). The first
            # attempt of a message just queued follows its queuing at once, as
            # Postfix's does from the incoming queue: no thread hop for it.
            held = yield self.results.in_pool(self.queue.is_held, env.id)
            if held or not self.results.running:
                if held and env.id not in self.due.held:
                    self.log.info("{queue_id}: on hold, not attempted", queue_id=env.id)
                    self.due.hold(env.id)
                return
        groups: dict[str, list[Recipient]] = defaultdict(list)
        local: list[tuple[Recipient, LocalRoute]] = []
        for r in env.pending():
            route = self.router.route_queued(r.address)  # the one routing step
            if not isinstance(route, routing.Relay):
                local.append((r, route))  # a mailbox here, or refused
            elif self.config.relay.smarthost:
                groups[SMARTHOST].append(r)
            else:
                groups[recipient_domain(route.address)].append(r)
        jobs = []
        if local:
            assert self.local is not None  # the router has local domains only with it
            jobs.append(self.local.deliver(env, local))
        for domain, rcpts in groups.items():
            for i in range(0, len(rcpts), RECIPIENTS_PER_SESSION):
                jobs.append(self.remote.deliver(env, domain, rcpts[i : i + RECIPIENTS_PER_SESSION]))
        results = yield defer.DeferredList(jobs, consumeErrors=True)
        for ok, value in results:
            if not ok:
                self.log.failure("{queue_id}: delivery job failed", value, queue_id=env.id)
        yield self._finish_round(env)

    def _record(
        self, env: Envelope, r: Recipient, reply: RemoteReply, remote: str, relay: str
    ) -> None:
        """Note C{reply} as C{r}'s result and log its line (see L{Results.record})."""
        self.results.record(env, r, reply, remote, relay)

    # --- after a round: retries, expiry, DSNs -----------------------------

    @defer.inlineCallbacks
    def _finish_round(self, env: Envelope):
        self.queue.take_recent(env.id)  # the bytes served the first attempt only
        now = self.reactor.seconds()
        env.attempts += 1
        pending = env.pending()
        if pending and self.results.running:
            nxt = self.schedule.next_attempt(env.attempts, env.created, now)
            if nxt is None:
                for r in pending:
                    r.state = FAILED
                    r.status = "5.4.7"  # RFC 3463: delivery time expired
                    r.reply = (
                        f"message expired after {self.schedule.max_lifetime:.0f}s in the "
                        f"queue; last error: {r.reply or 'none'}"
                    )
                    r.remote = ""
                    self.log.info(
                        "{queue_id}: to=<{rcpt}>, status=expired ({reply})",
                        queue_id=env.id,
                        rcpt=r.address,
                        reply=r.reply,
                    )
                pending = []
            else:
                env.next_attempt = nxt
                if self.schedule.should_warn(env.created, now, env.warned):
                    try:
                        yield self._notify(
                            env, pending, dsn.DELAYED, env.created + self.schedule.max_lifetime
                        )
                    except Exception:
                        pass  # logged; the warning is tried again after the next attempt
                    else:
                        env.warned = True
        failed = [r for r in env.recipients if r.state == FAILED and not r.notified]
        if failed:
            try:
                yield self._notify(env, failed, dsn.FAILED, None)
            except Exception as e:
                # Logged. The message stays, and the DSN is tried again after
                # the back-off, not at once (that would spin while, say, the
                # sender's disk is full).
                env.next_attempt = now + self.schedule.delay(env.attempts)
                env.last_error = f"the DSN to <{env.sender}> could not be sent: {e}"
                yield self.results.save(env)
                return
            for r in failed:
                r.notified = True
        if pending:
            yield self.results.save(env)
        else:
            yield self.results.remove(env)
            self.results.forget(env.id)
            self.due.finished(env.id)
            self.log.info("{queue_id}: removed", queue_id=env.id)

    def _notify(
        self, env: Envelope, rcpts: Sequence[Recipient], action: str, retry_until: float | None
    ) -> defer.Deferred:
        """Send a DSN to the envelope sender (see L{Bounces.notify})."""
        return self.bounces.notify(env, rcpts, action, retry_until)
