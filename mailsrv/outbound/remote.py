"""
Remote delivery: one group of a message's recipients to one destination (a
domain, or the smarthost) per call. It looks up the hops (MX, or the
smarthost's addresses), runs an SMTP session with each in turn until one
gets as far as MAIL FROM, under the destination's TLS policy, reusing an
idle connection when one is kept, and records each recipient's reply.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, ssl

from mailsrv.config import Config
from mailsrv.outbound.client import (
    DATA,
    DOT,
    RelayClient,
    RemoteReply,
    Session,
    SessionResult,
)
from mailsrv.outbound.connections import ConnectionCache
from mailsrv.outbound.envelope import Envelope, Recipient
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.mx import Hop, MXResolver
from mailsrv.outbound.queue import OutboundQueue
from mailsrv.outbound.results import Results
from mailsrv.outbound.schedule import DestinationLimits
from mailsrv.outbound.smtputf8 import header_has_utf8

SMARTHOST = "[smarthost]"  # the destination of every remote recipient when a smarthost is set
CONNECTION_CACHE_TIME = 2.0  # seconds an idle connection is kept for the next message


class RemoteDelivery:
    """Delivers to remote recipients over SMTP; see the module docstring."""

    def __init__(
        self,
        *,
        config: Config,
        queue: OutboundQueue,
        reactor: Any,
        resolver: MXResolver,
        results: Results,
        trust_root: Any = None,
    ) -> None:
        """C{trust_root} replaces the platform's CAs for the "verify" TLS policy (tests)."""
        self.config = config
        self.queue = queue
        self.reactor = reactor
        self.resolver = resolver
        self.results = results
        self.trust_root = trust_root
        self.limits = DestinationLimits(config.relay.per_destination_concurrency)
        self._sessions: set[Session] = set()
        self._cut: Any = None  # stopping: the sessions still sending are cut then
        self._may_context = ssl.CertificateOptions(verify=False)
        self._connections: ConnectionCache[RelayClient] = ConnectionCache(
            CONNECTION_CACHE_TIME, config.relay.per_destination_concurrency
        )

    def stop(self, grace: float = 0.0) -> None:
        """
        Close the idle connections and abort the sessions under way, but let
        those sending a message (DATA sent) finish for C{grace} seconds: one
        whose final dot has gone out may be accepted, and cut before its
        reply is read it would be sent again after a restart (RFC 5321 6.1).
        """
        self._connections.close_all()
        sending = []
        for s in list(self._sessions):
            client = s.protocol_instance
            if grace > 0 and client is not None and client.result.stage in (DATA, DOT):
                sending.append(s)
            else:
                _abort(client)
        if sending:

            def cut() -> None:
                for s in sending:
                    if not s.finished:
                        _abort(s.protocol_instance)

            self._cut = self.reactor.callLater(grace, cut)

    @defer.inlineCallbacks
    def deliver(self, env: Envelope, domain: str, rcpts: Sequence[Recipient]):
        """Deliver C{env} to C{rcpts}, all at C{domain}; record and checkpoint their results."""
        yield self.limits.acquire(domain)
        try:
            if not self.results.running:
                return
            try:
                hops = yield self._hops(domain)
            except DeliveryError as e:
                code = 550 if e.permanent else 450
                reply = RemoteReply(code, f"{e.status} {e.text}")
                for r in rcpts:
                    self.results.record(env, r, reply, "", "none")
                    r.reply = e.text
                yield self.results.checkpoint(env, rcpts)
                return
            result = yield self._try_hops(env, domain, hops, [r.address for r in rcpts])
            by_addr = {r.address: r for r in rcpts}
            for addr, r in by_addr.items():
                reply = result.replies.get(addr) or RemoteReply(0, "4.4.2 no reply")
                remote = result.hop.host if reply.code else ""
                self.results.record(env, r, reply, remote, str(result.hop))
        finally:
            self.limits.release(domain)
        yield self.results.checkpoint(env, rcpts)

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
            host, port = split_hostport(self.config.relay.smarthost or "", 25)
            return self.resolver.host_hops(host, port)
        return self.resolver.resolve(domain)

    @defer.inlineCallbacks
    def _try_hops(self, env: Envelope, domain: str, hops: Sequence[Hop], addrs: list[str]):
        """Run a session with each hop in turn until one gets as far as MAIL FROM."""
        data = self.queue.take_recent(env.id)
        if data is not None:  # queued just now: the bytes are still in memory
            f: Any = io.BytesIO(data)
            pool = None
        else:
            f = yield self.results.in_pool(self.queue.open_message, env)
            pool = self.results.pool
        result: SessionResult | None = None
        start = 0 if data is not None else env.offset

        def rewind() -> Any:
            return f.seek(start) if pool is None else self.results.in_pool(f.seek, start)

        try:
            utf8_header = False
            if env.smtputf8:  # RFC 6532: a UTF-8 header needs SMTPUTF8 at the next hop
                if pool is None:
                    utf8_header = header_has_utf8(f, start)
                else:
                    utf8_header = yield self.results.in_pool(header_has_utf8, f, start)
            for hop in hops:
                context, required = self._tls_for(domain, hop)
                for ctx in (context, None):
                    if result is not None:
                        yield rewind()
                    result = yield self._session(
                        env, hop, addrs, f, ctx, required, domain, pool=pool, utf8=utf8_header
                    )
                    if result.stale_connection:
                        yield rewind()
                        result = yield self._session(
                            env,
                            hop,
                            addrs,
                            f,
                            ctx,
                            required,
                            domain,
                            reuse=False,
                            pool=pool,
                            utf8=utf8_header,
                        )
                    # Opportunistic TLS whose handshake failed: try once more in plain text.
                    if not (result.tls_failed and ctx is not None and not required):
                        break
                if not self.results.running or (
                    result is not None and not result.before_transaction
                ):
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
        utf8: bool = False,
    ) -> defer.Deferred:
        """
        One session; C{pool} reads C{f} (None: C{f} is in memory, read in line).
        C{utf8}: the message has a UTF-8 header that needs SMTPUTF8.
        """
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
            utf8_header=utf8,
        )
        self._sessions.add(s)
        d = s.run_on(kept) if kept is not None else s.connect(relay.connect_timeout)

        def done(result: SessionResult) -> SessionResult:
            self._sessions.discard(s)
            if not self._sessions and self._cut is not None and self._cut.active():
                self._cut.cancel()  # stopping, and the last one has ended
            return result

        return d.addBoth(done)


def _abort(client: Any) -> None:
    abort = getattr(getattr(client, "transport", None), "abortConnection", None)
    if abort is not None:  # TCP and TLS transports; a test's may lack it
        abort()


def split_hostport(value: str, default: int) -> tuple[str, int]:
    """C{host}, C{host:port}, C{[address]} or C{[address]:port} as (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, int(port)
    return value, default
