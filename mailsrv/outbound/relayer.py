"""
The relayer: takes due messages from the queue, groups their pending
recipients by destination, runs one SMTP session per group (at most
C{per_destination_concurrency} at a time per destination), records each
recipient's result durably, schedules retries and sends DSNs.
"""

from __future__ import annotations

import heapq
import io
import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, ssl, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from mailsrv.config import Config
from mailsrv.interfaces import IPasswordDatabase, PasswordDatabaseError
from mailsrv.logsafe import SafeLogger
from mailsrv.outbound import dsn
from mailsrv.outbound.client import ConnectionCache, RemoteReply, Session, SessionResult
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.mx import Hop, MXResolver
from mailsrv.outbound.queue import (
    FAILED,
    PENDING,
    SENT,
    Envelope,
    OutboundQueue,
    Recipient,
)
from mailsrv.outbound.schedule import RetrySchedule
from mailsrv.spool import BytesSource

RECIPIENTS_PER_SESSION = 50  # like Postfix's smtp_destination_recipient_limit
SMARTHOST = "[smarthost]"
STOP_GRACE = 5.0  # seconds stopService waits for attempts under way
FINISHED_KEPT = 10_000  # ids of removed messages remembered
CONNECTION_CACHE_TIME = 2.0  # seconds an idle connection is kept for the next message


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower()


class Relayer:
    """Delivers the queue; see the module docstring."""

    log = SafeLogger()

    def __init__(
        self,
        *,
        config: Config,
        queue: OutboundQueue,
        reactor: Any,
        threadpool: Any,
        resolver: MXResolver,
        store: Any = None,
        passwords: IPasswordDatabase | None = None,
        schedule: RetrySchedule | None = None,
        scan_interval: float = 5.0,
        trust_root: Any = None,
    ) -> None:
        self.config = config
        self.queue = queue
        self.reactor = reactor
        self.pool = threadpool
        self.resolver = resolver
        self.store = store
        self.passwords = passwords
        self.schedule = schedule or RetrySchedule.from_config(config.relay)
        self.scan_interval = scan_interval
        self.trust_root = trust_root
        self.entries: dict[str, Envelope] = {}
        self._active: dict[str, defer.Deferred] = {}
        self._locks: dict[str, defer.DeferredLock] = {}
        self._semaphores: dict[str, defer.DeferredSemaphore] = {}
        self._sessions: set[Session] = set()
        self._timer: Any = None
        self._due: list[tuple[float, int, str]] = []  # heap of (next attempt, seq, id)
        self._seq = itertools.count()
        # Ids of messages done and removed lately: a late notice of one of them
        # (the relay process hears of a message it may have found on disk first)
        # must not start it again.
        self._finished: dict[str, None] = {}
        self._unreadable: set[str] = set()  # logged once, then left to the administrator
        self._poller: task.LoopingCall | None = None
        self._running = False
        self._may_context = ssl.CertificateOptions(verify=False)
        self._connections = ConnectionCache(
            CONNECTION_CACHE_TIME, config.relay.per_destination_concurrency
        )

    # --- life cycle -------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """Load every envelope on disk and resume delivery."""
        self._running = True
        envelopes, bad = yield self.queue.scan()
        for queue_id in bad:
            self._unreadable.add(queue_id)
            self.log.error("{queue_id}: unreadable envelope left in the queue", queue_id=queue_id)
        for env in envelopes:
            if env.id not in self.entries:
                self.entries[env.id] = env
                self._push(env)
        self.log.info("relayer started with {n} queued message(s)", n=len(self.entries))
        self.queue.add_listener(self.queued)
        self._poller = task.LoopingCall(self._poll)
        self._poller.clock = self.reactor
        self._poller.start(self.scan_interval, now=False).addErrback(
            lambda f: self.log.failure("queue poll stopped", f)
        )
        self._schedule()

    def stop(self) -> defer.Deferred:
        """Stop starting deliveries, abort open sessions, wait for their results to be saved."""
        self._running = False
        self.queue.remove_listener(self.queued)
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._connections.close_all()
        self.queue.flush_lazy()
        for s in list(self._sessions):
            p = s.protocol_instance
            abort = getattr(getattr(p, "transport", None), "abortConnection", None)
            if abort is not None:  # TCP and TLS transports; a test's may lack it
                abort()
        # Wait for the attempts under way to record their results, but not for
        # a DNS query to time out: those recipients simply stay pending.
        done: defer.Deferred = defer.Deferred()

        def fire(_: Any = None) -> None:
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(STOP_GRACE, fire)
        defer.DeferredList(list(self._active.values()), consumeErrors=True).addBoth(fire)
        return done.addBoth(lambda _: timer.cancel() if timer.active() else None)

    # --- scheduling -------------------------------------------------------

    def _push(self, env: Envelope) -> None:
        heapq.heappush(self._due, (env.next_attempt, next(self._seq), env.id))

    def queued(self, env: Envelope) -> bool:
        """A message was queued: deliver it (False: it is known already, or done)."""
        if env.id in self.entries or env.id in self._finished:
            return False
        self.entries[env.id] = env
        self._push(env)
        self._schedule()
        return True

    def flush(self) -> None:
        """Retry every queued message now."""
        now = self.reactor.seconds()
        for env in self.entries.values():
            if env.id not in self._active and env.next_attempt > now:
                env.next_attempt = now
                self._push(env)
        self._schedule()

    def _poll(self) -> defer.Deferred:
        """
        Notice ``queue flush`` and ``queue delete`` done by the admin command,
        and messages on disk nobody told us of (a notice from the server lost
        or held back: they are an optimisation, the queue folder is the truth).
        """
        d = self.queue.poll()

        def polled(result: tuple[list[str], bool]) -> Any:
            ids, flush = result
            on_disk = set(ids)
            unknown = [
                i
                for i in ids
                if i not in self.entries
                and i not in self._finished
                and i not in self._active
                and i not in self._unreadable
            ]
            for queue_id in list(self.entries):
                if queue_id not in on_disk and queue_id not in self._active:
                    self.log.info(
                        "{queue_id}: removed from the queue by the administrator", queue_id=queue_id
                    )
                    del self.entries[queue_id]
                    self._locks.pop(queue_id, None)
                    self.queue.take_recent(queue_id)
            if flush:
                self.log.info("queue flush requested")
                self.flush()
            if unknown:
                return self._in_pool(self._load, unknown).addCallback(self._found)
            return None

        return d.addCallback(polled).addErrback(lambda f: self.log.failure("queue poll failed", f))

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

    def _found(self, result: tuple[list[Envelope], list[str]]) -> None:
        found, bad = result
        for queue_id in bad:
            self._unreadable.add(queue_id)
            self.log.error("{queue_id}: unreadable envelope left in the queue", queue_id=queue_id)
        for env in found:
            if self.queued(env):
                self.log.info("{queue_id}: found in the queue folder", queue_id=env.id)

    def _schedule(self) -> None:
        """Start every message that is due; wake up when the next one is."""
        if not self._running:
            return
        now = self.reactor.seconds()
        while self._due and self._due[0][0] <= now:
            when, _, queue_id = heapq.heappop(self._due)
            env = self.entries.get(queue_id)
            # Entries left behind by a reschedule or a removal are skipped.
            if env is None or queue_id in self._active or env.next_attempt != when:
                continue
            self._start(env)
        if not self._due:
            return
        wake = self._due[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= wake:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, wake - now), self._schedule)

    def _start(self, env: Envelope) -> None:
        d = self._attempt(env)
        self._active[env.id] = d

        def failed(f: Failure) -> None:
            self.log.failure("{queue_id}: delivery attempt failed", f, queue_id=env.id)
            # Whatever went wrong, the message waits for the back-off before
            # its next try: never a loop that starts it again at once.
            now = self.reactor.seconds()
            if env.next_attempt <= now:
                env.next_attempt = now + self.schedule.delay(max(env.attempts, 1))

        def done(_: Any) -> None:
            self._active.pop(env.id, None)
            if env.id in self.entries:
                self._push(env)
            self._schedule()

        d.addErrback(failed)
        d.addBoth(done)

    # --- one delivery attempt of one message -------------------------------

    @defer.inlineCallbacks
    def _attempt(self, env: Envelope):
        groups: dict[str, list[Recipient]] = defaultdict(list)
        local: list[Recipient] = []
        for r in env.pending():
            domain = recipient_domain(r.address)
            if self.config.is_local_domain(domain) and self.store is not None:
                local.append(r)
            elif self.config.relay.smarthost:
                groups[SMARTHOST].append(r)
            else:
                groups[domain].append(r)
        jobs = []
        if local:
            jobs.append(self._deliver_local(env, local))
        for domain, rcpts in groups.items():
            for i in range(0, len(rcpts), RECIPIENTS_PER_SESSION):
                jobs.append(
                    self._deliver_remote(env, domain, rcpts[i : i + RECIPIENTS_PER_SESSION])
                )
        results = yield defer.DeferredList(jobs, consumeErrors=True)
        for ok, value in results:
            if not ok:
                self.log.failure("{queue_id}: delivery job failed", value, queue_id=env.id)
        yield self._finish_round(env)

    def _lock(self, env: Envelope) -> defer.DeferredLock:
        return self._locks.setdefault(env.id, defer.DeferredLock())

    def _save(self, env: Envelope) -> defer.Deferred:
        """Rewrite the envelope durably, one write at a time per message."""
        return self._lock(env).run(self._queue_save, env)

    def _queue_save(self, env: Envelope) -> defer.Deferred:
        """A save, in the queue's next batch (or in line when stopping)."""
        if self.pool is None or not self._running:
            return defer.maybeDeferred(self.queue.save_in_line, env)
        return self.queue.save(env)

    def _queue_remove(self, queue_id: str) -> defer.Deferred:
        """A removal of delivered mail (not synced), in the queue's next batch (or in line)."""
        if self.pool is None or not self._running:
            return defer.maybeDeferred(self.queue.remove_in_line, queue_id, False)
        return self.queue.remove(queue_id, False)

    def _in_pool(self, f: Any, *args: Any) -> defer.Deferred:
        if self.pool is None or not self._running:
            # A fake clock in tests; or shutting down, when the thread pool
            # stops beside us: the results of the last sessions are still
            # written, blocking the reactor briefly.
            return defer.maybeDeferred(f, *args)
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def _record(
        self, env: Envelope, r: Recipient, reply: RemoteReply, remote: str, relay: str
    ) -> None:
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

    @defer.inlineCallbacks
    def _deliver_local(self, env: Envelope, rcpts: Sequence[Recipient]):
        source = self.queue.message_source(env)
        for r in rcpts:
            try:
                mailbox = self._local_user(r.address)
            except PasswordDatabaseError:
                # A local problem (logged by the user database): try again later.
                reply = RemoteReply(451, "4.3.0 local user database unavailable")
                self._record(env, r, reply, "", "local")
                continue
            if mailbox is None:
                reply = RemoteReply(550, "5.1.1 User unknown in local recipient table")
                self._record(env, r, reply, "", "local")
                continue
            try:
                yield self.store.deliver(mailbox, source, env.sender)
            except Exception as e:
                self._record(
                    env, r, RemoteReply(451, f"4.3.0 local delivery failed: {e}"), "", "local"
                )
            else:
                self._record(env, r, RemoteReply(250, "2.0.0 delivered to mailbox"), "", "local")
                # Recorded before the next mailbox: a crash in between must not
                # deliver this copy again.
                yield self._checkpoint(env, [r])
        yield self._checkpoint(env, rcpts)

    def _local_user(self, address: str) -> str | None:
        """
        The stored spelling of local user C{address}, which names the mailbox
        (whatever the case it was queued in), or None if there is no such user.
        L{PasswordDatabaseError} if the users cannot be read.
        """
        if self.passwords is None:
            return address
        return self.passwords.lookup(address)

    def _tls_for(self, domain: str, hop: Hop) -> tuple[Any, bool]:
        """The STARTTLS context and whether TLS is required, by policy."""
        if domain == SMARTHOST:
            policy = self.config.relay.smarthost_tls
        else:
            policy = self.config.relay.tls_policy.get(domain, "may")
        if policy == "none":
            return None, False
        if policy == "verify":
            trust = self.trust_root if self.trust_root is not None else ssl.platformTrust()
            return ssl.optionsForClientTLS(hop.host, trustRoot=trust), True
        return self._may_context, policy == "encrypt"

    def _hops(self, domain: str) -> defer.Deferred:
        if domain == SMARTHOST:
            host, port = _split_hostport(self.config.relay.smarthost or "", 25)
            return self.resolver.host_hops(host, port)
        return self.resolver.resolve(domain)

    @defer.inlineCallbacks
    def _deliver_remote(self, env: Envelope, domain: str, rcpts: Sequence[Recipient]):
        sem = self._semaphores.setdefault(
            domain, defer.DeferredSemaphore(self.config.relay.per_destination_concurrency)
        )
        yield sem.acquire()
        try:
            if not self._running:
                return
            try:
                hops = yield self._hops(domain)
            except DeliveryError as e:
                code = 550 if e.permanent else 450
                reply = RemoteReply(code, f"{e.status} {e.text}")
                for r in rcpts:
                    self._record(env, r, reply, "", "none")
                    r.reply = e.text
                yield self._checkpoint(env, rcpts)
                return
            result = yield self._try_hops(env, domain, hops, [r.address for r in rcpts])
            by_addr = {r.address: r for r in rcpts}
            for addr, r in by_addr.items():
                reply = result.replies.get(addr) or RemoteReply(0, "4.4.2 no reply")
                remote = result.hop.host if reply.code else ""
                self._record(env, r, reply, remote, str(result.hop))
        finally:
            sem.release()
            if sem.tokens == sem.limit and not sem.waiting:
                self._semaphores.pop(domain, None)  # idle: do not keep one per domain ever seen
        yield self._checkpoint(env, rcpts)

    def _checkpoint(self, env: Envelope, rcpts: Sequence[Recipient]) -> defer.Deferred:
        """
        After one session: if some of its recipients are now done while others
        of the message are still pending, record it durably, so that a restart
        never sends to them again. Otherwise the end of the round (a rewrite,
        or the DSN then the removal) is the record.
        """
        if env.pending() and any(r.state != PENDING for r in rcpts):
            return self._save(env)
        return defer.succeed(None)

    @defer.inlineCallbacks
    def _try_hops(self, env: Envelope, domain: str, hops: Sequence[Hop], addrs: list[str]):
        """Run a session with each hop in turn until one gets as far as MAIL FROM."""
        data = self.queue.take_recent(env.id)
        if data is not None:  # queued just now: the bytes are still in memory
            f: Any = io.BytesIO(data)
            pool = None
        else:
            f = yield self._in_pool(self.queue.open_message, env)
            pool = self.pool
        result: SessionResult | None = None
        start = 0 if data is not None else env.offset

        def rewind() -> Any:
            return f.seek(start) if pool is None else self._in_pool(f.seek, start)

        try:
            for hop in hops:
                context, required = self._tls_for(domain, hop)
                for ctx in (context, None):
                    if result is not None:
                        yield rewind()
                    result = yield self._session(
                        env, hop, addrs, f, ctx, required, domain, pool=pool
                    )
                    if result.stale_connection:
                        yield rewind()
                        result = yield self._session(
                            env, hop, addrs, f, ctx, required, domain, reuse=False, pool=pool
                        )
                    # Opportunistic TLS whose handshake failed: try once more in plain text.
                    if not (result.tls_failed and ctx is not None and not required):
                        break
                if not self._running or (result is not None and not result.before_transaction):
                    break
        finally:
            f.close()  # a read-only file: nothing to flush, does not block
        assert result is not None
        return result

    def _session(
        self,
        env: Envelope,
        hop: Hop,
        addrs: list[str],
        f: Any,
        context: Any,
        required: bool,
        domain: str,
        reuse: bool = True,
        pool: Any = None,
    ) -> defer.Deferred:
        """One session; C{pool} reads C{f} (None: C{f} is in memory, read in line)."""
        relay = self.config.relay
        smarthost = domain == SMARTHOST
        # Sessions are interchangeable when they go to the same address for the
        # same destination under the same TLS requirement.
        key = (domain, hop.host, hop.address, hop.port, context is None, required)
        kept = self._connections.take(key) if reuse else None
        s = Session(
            reactor=self.reactor,
            pool=pool,
            hop=hop,
            helo=self.config.server.hostname,
            sender=env.sender,
            recipients=addrs,
            message=f,
            tls_context=context,
            require_tls=required,
            username=relay.smarthost_username if smarthost else None,
            password=relay.smarthost_password if smarthost else None,
            cache=self._connections,
            cache_key=key,
        )
        self._sessions.add(s)
        d = s.run_on(kept) if kept is not None else s.connect(relay.connect_timeout)

        def done(result: SessionResult) -> SessionResult:
            self._sessions.discard(s)
            return result

        return d.addBoth(done)

    # --- after a round: retries, expiry, DSNs -----------------------------

    @defer.inlineCallbacks
    def _finish_round(self, env: Envelope):
        self.queue.take_recent(env.id)  # the bytes served the first attempt only
        now = self.reactor.seconds()
        env.attempts += 1
        pending = env.pending()
        if pending and self._running:
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
                yield self._save(env)
                return
            for r in failed:
                r.notified = True
        if pending:
            yield self._save(env)
        else:
            yield self._lock(env).run(self._queue_remove, env.id)
            self.entries.pop(env.id, None)
            self._locks.pop(env.id, None)
            self._finished[env.id] = None
            if len(self._finished) > FINISHED_KEPT:
                del self._finished[next(iter(self._finished))]
            self.log.info("{queue_id}: removed", queue_id=env.id)

    @defer.inlineCallbacks
    def _notify(
        self, env: Envelope, rcpts: Sequence[Recipient], action: str, retry_until: float | None
    ):
        """Send a DSN to the envelope sender; never for mail from <> (no bounce of a bounce)."""
        who = ", ".join(r.address for r in rcpts)
        if not env.sender:
            self.log.info(
                "{queue_id}: not sending a {action} DSN for <{rcpts}>: the sender "
                "is <> (a bounce is never bounced); dropped",
                queue_id=env.id,
                action=action,
                rcpts=who,
            )
            return

        def headers() -> bytes:
            with self.queue.open_message(env) as f:
                return dsn.read_headers(f)

        original = yield self._in_pool(headers)
        report = dsn.build_dsn(
            hostname=self.config.server.hostname,
            envelope=env,
            recipients=rcpts,
            action=action,
            original_headers=original,
            now=self.reactor.seconds(),
            retry_until=retry_until,
        )
        source = BytesSource(report)
        sender = env.sender
        try:
            if self.config.is_local_domain(recipient_domain(sender)) and self.store is not None:
                mailbox = self._local_user(sender)
                if mailbox is None:
                    self.log.warn(
                        "{queue_id}: {action} DSN for unknown local sender <{sender}> dropped",
                        queue_id=env.id,
                        action=action,
                        sender=sender,
                    )
                    return
                yield self.store.deliver(mailbox, source, "")
                where = "mailbox"
            else:
                where = yield self.queue.enqueue("", [sender], source)
        except Exception as e:
            self.log.error(
                "{queue_id}: could not send the {action} DSN to <{sender}>: {why}",
                queue_id=env.id,
                action=action,
                sender=sender,
                why=str(e),
            )
            raise
        self.log.info(
            "{queue_id}: sender {action} notification to <{sender}> ({where}) for <{rcpts}>",
            queue_id=env.id,
            action=action,
            sender=sender,
            where=where,
            rcpts=who,
        )


def _split_hostport(value: str, default: int) -> tuple[str, int]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, int(port)
    return value, default
