"""
Sender authentication as the SMTP server runs it: SPF from MAIL on, DKIM,
ARC and DMARC at the end
of DATA on the spooled message, all in pool threads with an overall timeout
on the clock passed in; the result is one C{Authentication-Results:} field
and a verdict (L{mailsrv.filter.verdict.Verdict}): DMARC p=reject refuses
(when C{[policy] dmarc_reject}; else the field alone tells it, as
opendmarc's RejectFailures=false does), p=quarantine files into Junk.

The end-of-DATA work (L{mailsrv.authres.verify}) runs in verifier
processes (L{mailsrv.authres.workers}, C{[policy] authentication_workers})
when given, so that its pure Python work does not contend with the reactor
for the GIL; else in the pool threads, as SPF does. Messages over
L{MAX_VERIFY} octets are not read whole (L{verify_message}).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.authres.dkimverify import DkimResult
from mailsrv.authres.dmarc import Dmarc, DmarcResult
from mailsrv.authres.header import authentication_results
from mailsrv.authres.resolver import Resolver
from mailsrv.authres.spf import SpfResult, check_spf
from mailsrv.authres.verify import Results, verify_message
from mailsrv.authres.workers import VerifierPool, WorkerDied
from mailsrv.filter.verdict import ACCEPT, DEFER, JUNK, REJECT, Envelope, Verdict
from mailsrv.replies import Reply, ReplyError
from mailsrv.smtp.checks import IMessageCheck

# RFC 7372 3.2 / RFC 7208 8.4: 550 5.7.23 when SPF fails and the server refuses.
SPF_FAIL = Reply(550, "5.7.23", "SPF validation failed")
# RFC 7372 3.2 (X.7.24 SPF validation error) / RFC 7208 8.6: 451 on temperror.
SPF_TEMPERROR = Reply(451, "4.7.24", "SPF validation error, try again later")
# RFC 7489 6.7 / RFC 3463 3.8 (5.7.1 delivery not authorized); opendmarc's text.
DMARC_REJECT = Reply(550, "5.7.1", "Email rejected per DMARC policy for {domain}")
# RFC 3463 3.8 (4.7.0 other security status): a p=reject failure that an
# aligned check with a temporary error might have passed; the sender retries.
DMARC_TEMPERROR = Reply(451, "4.7.0", "DMARC policy for {domain} could not be checked, try later")

MAX_VERIFY = 10 * 1024 * 1024  # octets read for DKIM; larger messages: dkim=neutral
MAX_JOBS = 4  # verifications at once: the pool (shared with the disk) keeps threads free
TIMEOUT = 30.0  # seconds one step (SPF; DKIM, ARC and DMARC) may take in all
SPF_MEMO = 300.0  # seconds an SPF result started at MAIL waits for its DATA
MAX_MEMO = 10_000  # SPF results kept at most (the oldest forgotten first)


@implementer(IMessageCheck)
class SenderAuthentication:
    """
    The checks the MX runs on every inbound transaction (not on submission:
    that mail is ours), the first of the end-of-DATA checks
    (L{mailsrv.smtp.checks}). C{in_pool} runs a blocking function in a
    thread pool and returns a Deferred of its result.

    SPF starts at MAIL (L{mail}); its result waits for the end of DATA in
    a memo keyed by what it depends on (client address, HELO name, sender),
    kept L{SPF_MEMO} seconds: a session that sends several messages from
    one sender asks DNS once, and the end-of-DATA check needs nothing but
    its envelope to find it.
    """

    log = Logger()

    def __init__(
        self,
        *,
        resolver: Resolver,
        in_pool: Callable[[Callable[[], Any]], defer.Deferred],
        clock: Any,
        authserv_id: str,
        spf_reject: bool = False,
        dmarc_reject: bool = True,
        timeout: float = TIMEOUT,
        max_verify: int = MAX_VERIFY,
        dmarc: Dmarc | None = None,
        workers: VerifierPool | None = None,
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.authserv_id = authserv_id
        self.spf_reject = spf_reject
        self.dmarc_reject = dmarc_reject
        self.timeout = timeout
        self.max_verify = max_verify
        self.dmarc = dmarc if dmarc is not None else Dmarc()
        self.workers = workers  # None: DKIM, ARC and DMARC in the pool threads
        self._in_pool = in_pool
        self._jobs = defer.DeferredSemaphore(MAX_JOBS)
        self._spf: OrderedDict[tuple[str, str, str], tuple[float, _SpfLookup]] = OrderedDict()

    # SPF, from MAIL on

    def spf(self, client_ip: str, helo: str, sender: str) -> _SpfLookup:
        """The SPF evaluation for this envelope: the one under way or known, else a new one."""
        now = self.clock.seconds()
        while self._spf:
            # Forget what is older than SPF_MEMO (the oldest first), and beyond MAX_MEMO.
            started, _ = next(iter(self._spf.values()))
            if now - started < SPF_MEMO and len(self._spf) < MAX_MEMO:
                break
            self._spf.popitem(last=False)
        key = (client_ip, helo, sender.lower())
        known = self._spf.get(key)
        if known is not None:
            return known[1]
        lookup = _SpfLookup(self, client_ip, helo, sender)
        self._spf[key] = (now, lookup)
        return lookup

    def mail(self, client_ip: str, helo: str, sender: str) -> defer.Deferred | None:
        """
        Start SPF for a MAIL command. With C{[policy] spf_reject}: a Deferred
        that fails with the reply refusing MAIL when SPF fails (550 5.7.23,
        RFC 7208 8.4) or cannot be evaluated (451 4.7.24, 8.6), else fires;
        None when SPF refuses nothing (MAIL is answered at once).
        """
        lookup = self.spf(client_ip, helo, sender)
        if not self.spf_reject:
            return None

        def decide(spf: SpfResult) -> None:
            if spf.result == "fail":
                text = f"SPF validation failed: {spf.domain} does not permit this client"
                raise ReplyError(SPF_FAIL, text=text, cause=f"spf=fail {spf.reason}")
            if spf.result == "temperror":
                text = f"SPF validation error for {spf.domain}, try again later"
                raise ReplyError(SPF_TEMPERROR, text=text, cause=f"spf=temperror {spf.reason}")

        return lookup.result().addCallback(decide)

    def run(self, work: Callable[[], Any], on_timeout: Callable[[], Any]) -> defer.Deferred:
        """
        C{work} in a pool thread, at most L{MAX_JOBS} at once, within the
        timeout; C{on_timeout()} gives the result otherwise (and after an
        unexpected error, which is logged).
        """
        return self._bounded(lambda: self._jobs.run(self._in_pool, work), on_timeout)

    def _bounded(self, start: Callable[[], defer.Deferred], on_timeout: Callable[[], Any]) -> Any:
        """The Deferred C{start()} gives, within the timeout; else C{on_timeout()}."""
        d = start()
        d.addTimeout(self.timeout, self.clock)

        def failed(failure: Any) -> Any:
            if failure.check(WorkerDied):
                self.log.warn("sender authentication not verified: {why}", why=failure.value)
            elif not failure.check(defer.TimeoutError, defer.CancelledError):
                self.log.failure("sender authentication failed", failure=failure)
            return on_timeout()

        return d.addErrback(failed)

    # DKIM, ARC, DMARC at the end of DATA

    def check(self, message_source: Any, envelope: Envelope) -> defer.Deferred:
        """The verdict on the message (a L{Verdict}; never a failure)."""
        d = self.spf(envelope.client_ip, envelope.helo or "", envelope.sender).result()
        d.addCallback(self._verify, message_source)
        d.addCallback(self._verdict, envelope)
        return d

    def _verify(self, spf: SpfResult, source: Any) -> defer.Deferred:
        def read() -> bytes:
            with source.open() as f:
                return f.read(self.max_verify + 1)

        def timed_out() -> Results:
            return (
                [DkimResult("temperror", reason="no answer in time")],
                ("none", "not verified in time"),
                DmarcResult("temperror", reason="no answer in time"),
            )

        workers = self.workers
        if workers is None:
            d = self.run(
                lambda: verify_message(
                    read(), spf, self.resolver, self.dmarc, self.max_verify, self.timeout
                ),
                timed_out,
            )
        else:

            def read_off_reactor() -> defer.Deferred:
                if getattr(source, "in_memory", False):
                    return defer.succeed(read())  # a spool held in memory: no disk to wait on
                return self._in_pool(read)

            d = self._bounded(
                lambda: workers.verify(read_off_reactor, spf, self.max_verify, self.timeout),
                timed_out,
            )
        return d.addCallback(lambda results: (spf, *results))

    def _verdict(self, results: tuple, envelope: Envelope) -> Verdict:
        spf, dkims, arc, dmarc = results
        field = authentication_results(self.authserv_id, spf, dkims, dmarc, arc)
        action, refusal = ACCEPT, None
        if dmarc.result == "fail":
            if dmarc.disposition == "reject" and self.dmarc_reject:
                action = REJECT
                refusal = Reply(
                    DMARC_REJECT.code,
                    DMARC_REJECT.enhanced,
                    DMARC_REJECT.text.format(domain=dmarc.from_domain),
                )
            elif dmarc.disposition == "quarantine":
                action = JUNK  # RFC 7489 6.3: "treat as suspicious"
        elif dmarc.result == "temperror" and dmarc.disposition == "reject" and self.dmarc_reject:
            # Neither refused for good nor let through: the sender's retry decides.
            action = DEFER
            refusal = Reply(
                DMARC_TEMPERROR.code,
                DMARC_TEMPERROR.enhanced,
                DMARC_TEMPERROR.text.format(domain=dmarc.from_domain),
            )
        dkim = ",".join(f"{r.result}:{r.domain}" for r in dkims)
        dmarc_text = f"{dmarc.result}:{dmarc.from_domain}:{dmarc.disposition}"
        # The line's text is built here (an f-string) rather than by
        # twisted.logger's formatter, a tenth of a millisecond a message less
        # on the reactor; the named fields stay in the event for other observers.
        self.log.info(
            "{text}",
            text=f"{envelope.queue_id}: spf={spf.result} dkim={dkim} dmarc={dmarc_text} "
            f"arc={arc[0]} action={action}",
            queue_id=envelope.queue_id,
            spf=spf.result,
            dkim=dkim,
            dmarc=dmarc_text,
            arc=arc[0],
            action=action,
        )
        return Verdict(
            action, headers=field, reason=refusal.text if refusal else "", refusal=refusal
        )


class _SpfLookup:
    """One SPF evaluation, started at once in a pool thread; its result for any number of waiters."""

    def __init__(self, auth: SenderAuthentication, client_ip: str, helo: str, sender: str) -> None:
        self._result: SpfResult | None = None
        self._waiting: list[defer.Deferred] = []
        identity, value = ("mailfrom", sender) if sender else ("helo", helo)

        def timed_out() -> SpfResult:
            domain = (sender.rpartition("@")[2] if sender else helo).lower()
            return SpfResult("temperror", identity, value, domain, "no answer in time")

        auth.run(
            lambda: check_spf(auth.resolver, client_ip, helo, sender, auth.authserv_id),
            timed_out,
        ).addCallback(self._done)

    def _done(self, result: SpfResult) -> None:
        self._result = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)

    @property
    def done(self) -> bool:
        """Whether the result is known."""
        return self._result is not None

    def result(self) -> defer.Deferred:
        """A Deferred of the L{SpfResult}; it never fails."""
        if self._result is not None:
            return defer.succeed(self._result)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d


def build_authentication(config: Any, clock: Any, in_pool: Any) -> SenderAuthentication | None:
    """
    The checks C{config} asks for (C{[policy] authentication_checks}), or
    None; C{clock} is the reactor (its C{callFromThread} too, for the
    verifier processes of C{[policy] authentication_workers}).
    """
    policy = config.policy
    if not policy.authentication_checks:
        return None
    workers = policy.authentication_workers
    # Started by the first message, stopped by the server's VerifierService.
    pool = VerifierPool(clock, workers, config.dns.nameservers) if workers else None
    return sender_authentication(config, clock, in_pool, pool)


def sender_authentication(
    config: Any, clock: Any, in_pool: Any, workers: VerifierPool | None
) -> SenderAuthentication:
    """The checks with C{config}'s settings, on C{workers} (None: threads); a reload keeps them."""
    policy = config.policy
    return SenderAuthentication(
        resolver=Resolver(config.dns.nameservers),
        in_pool=in_pool,
        clock=clock,
        workers=workers,
        authserv_id=config.server.hostname,
        spf_reject=policy.spf_reject,
        dmarc_reject=policy.dmarc_reject,
    )


__all__ = ["SenderAuthentication", "build_authentication", "sender_authentication"]
