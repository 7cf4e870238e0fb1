"""
Sender authentication as the SMTP server runs it: SPF from MAIL on (a
L{MessageAuthentication} per transaction), DKIM, ARC and DMARC at the end
of DATA on the spooled message, all in pool threads with an overall timeout
on the clock passed in; the result is one C{Authentication-Results:} field
and a verdict (L{mailsrv.filter.verdict.Verdict}): DMARC p=reject refuses
(when C{[policy] dmarc_reject}), p=quarantine files into Junk.

Messages over L{MAX_VERIFY} octets are not read whole: DKIM (dkimpy needs
the message in memory, some four times over) gives neutral for them, and a
DMARC failure that a DKIM pass might have prevented is reported but not
acted on (a large legitimate message is never refused for a check skipped).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import dkim
from twisted.internet import defer
from twisted.logger import Logger

from mailsrv.authres.dkimverify import DkimResult, verify_arc, verify_dkim
from mailsrv.authres.dmarc import Dmarc, DmarcResult, from_domain
from mailsrv.authres.header import authentication_results
from mailsrv.authres.resolver import Resolver
from mailsrv.authres.spf import SpfResult, check_spf
from mailsrv.filter.verdict import ACCEPT, JUNK, REJECT, Envelope, Verdict
from mailsrv.replies import Reply, ReplyError

# RFC 7372 3.2 / RFC 7208 8.4: 550 5.7.23 when SPF fails and the server refuses.
SPF_FAIL = Reply(550, "5.7.23", "SPF validation failed")
# RFC 7372 3.2 (X.7.24 SPF validation error) / RFC 7208 8.6: 451 on temperror.
SPF_TEMPERROR = Reply(451, "4.7.24", "SPF validation error, try again later")
# RFC 7489 6.7 (and 10.3: 5.7.1); the text opendmarc sends.
DMARC_REJECT_TEXT = "Email rejected per DMARC policy for {domain}"

MAX_VERIFY = 10 * 1024 * 1024  # octets read for DKIM; larger messages: dkim=neutral
MAX_JOBS = 4  # verifications at once: the pool (shared with the disk) keeps threads free
TIMEOUT = 30.0  # seconds the checks of one message may take in all
_LINE_END = re.compile(rb"\r?\n")


class SenderAuthentication:
    """
    The checks the MX runs on every inbound transaction (not on submission:
    that mail is ours). C{in_pool} runs a blocking function in a thread pool
    and returns a Deferred of its result.
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
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.authserv_id = authserv_id
        self.spf_reject = spf_reject
        self.dmarc_reject = dmarc_reject
        self.timeout = timeout
        self.max_verify = max_verify
        self.dmarc = dmarc if dmarc is not None else Dmarc()
        self._in_pool = in_pool
        self._jobs = defer.DeferredSemaphore(MAX_JOBS)

    def transaction(self, client_ip: str, helo: str, sender: str) -> MessageAuthentication:
        """Start the checks of one mail transaction: SPF now (RFC 7208 2.4)."""
        return MessageAuthentication(self, client_ip, helo, sender)

    def run(self, work: Callable[[], Any], on_timeout: Callable[[], Any]) -> defer.Deferred:
        """
        C{work} in a pool thread, at most L{MAX_JOBS} at once, within the
        timeout; C{on_timeout()} (or an unexpected error) gives the result otherwise.
        """
        d = self._jobs.run(self._in_pool, work)
        d.addTimeout(self.timeout, self.clock)

        def failed(failure: Any) -> Any:
            if not failure.check(defer.TimeoutError, defer.CancelledError):
                self.log.failure("sender authentication failed", failure=failure)
            return on_timeout()

        return d.addErrback(failed)


class MessageAuthentication:
    """
    One transaction's checks: its SPF result (asked at MAIL), and at the
    end of DATA the verdict on the message (L{check}, the end-of-DATA check
    seam's method).
    """

    log = Logger()

    def __init__(
        self, auth: SenderAuthentication, client_ip: str, helo: str, sender: str
    ) -> None:
        self.auth = auth
        self.sender = sender
        self.spf: SpfResult | None = None
        self._waiting: list[defer.Deferred] = []
        identity, value = ("mailfrom", sender) if sender else ("helo", helo)

        def timed_out() -> SpfResult:
            domain = (sender.rpartition("@")[2] if sender else helo).lower()
            return SpfResult("temperror", identity, value, domain, "no answer in time")

        auth.run(
            lambda: check_spf(auth.resolver, client_ip, helo, sender, auth.authserv_id),
            timed_out,
        ).addCallback(self._spf_done)

    def _spf_done(self, result: SpfResult) -> None:
        self.spf = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)

    def spf_result(self) -> defer.Deferred:
        """A Deferred of the SPF result (L{SpfResult}); it never fails."""
        if self.spf is not None:
            return defer.succeed(self.spf)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d

    def mail_refusal(self) -> defer.Deferred | None:
        """
        With C{[policy] spf_reject}: a Deferred that fails with the reply
        refusing MAIL when SPF fails (550 5.7.23) or cannot be evaluated
        (451 4.7.24), else fires; None when SPF refuses nothing.
        """
        if not self.auth.spf_reject:
            return None

        def decide(spf: SpfResult) -> None:
            if spf.result == "fail":
                text = f"SPF validation failed: {spf.domain} does not permit this client"
                raise ReplyError(SPF_FAIL, text=text, cause=f"spf=fail {spf.reason}")
            if spf.result == "temperror":
                text = f"SPF validation error for {spf.domain}, try again later"
                raise ReplyError(SPF_TEMPERROR, text=text, cause=f"spf=temperror {spf.reason}")

        return self.spf_result().addCallback(decide)

    def check(self, message_source: Any, envelope: Envelope) -> defer.Deferred:
        """The verdict on the message (a L{Verdict}, never a failure)."""
        d = self.spf_result()
        d.addCallback(self._verify, message_source)
        d.addCallback(self._verdict, envelope)
        return d

    def _verify(self, spf: SpfResult, source: Any) -> defer.Deferred:
        auth = self.auth

        def work() -> tuple[SpfResult, list[DkimResult], tuple[str, str], DmarcResult]:
            with source.open() as f:
                data = f.read(auth.max_verify + 1)
            message = _LINE_END.sub(b"\r\n", data)
            if len(data) > auth.max_verify:
                headers, _ = dkim.rfc822_parse(message.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
                dkims = [DkimResult("neutral", reason="message too large to verify")]
                arc = ("none", "message too large to verify")
                dmarc = auth.dmarc.evaluate(headers, spf, dkims, auth.resolver)
                if dmarc.result == "fail":
                    dmarc = DmarcResult(
                        "fail", dmarc.from_domain, dmarc.policy, "none", "DKIM not verified"
                    )
                return spf, dkims, arc, dmarc
            headers, _ = dkim.rfc822_parse(message)
            dkims = verify_dkim(message, auth.resolver)
            arc = verify_arc(message, auth.resolver)
            dmarc = auth.dmarc.evaluate(headers, spf, dkims, auth.resolver)
            return spf, dkims, arc, dmarc

        def timed_out() -> tuple[SpfResult, list[DkimResult], tuple[str, str], DmarcResult]:
            return (
                spf,
                [DkimResult("temperror", reason="no answer in time")],
                ("none", "not verified in time"),
                DmarcResult("temperror", reason="no answer in time"),
            )

        return auth.run(work, timed_out)

    def _verdict(self, results: tuple, envelope: Envelope) -> Verdict:
        spf, dkims, arc, dmarc = results
        field = authentication_results(self.auth.authserv_id, spf, dkims, dmarc, arc)
        action, reason = ACCEPT, ""
        if dmarc.result == "fail":
            if dmarc.disposition == "reject" and self.auth.dmarc_reject:
                action = REJECT
                reason = DMARC_REJECT_TEXT.format(domain=dmarc.from_domain)
            elif dmarc.disposition in ("reject", "quarantine"):
                # RFC 7489 6.3: quarantine is "treat as suspicious": Junk.
                action = JUNK if dmarc.disposition == "quarantine" else ACCEPT
        self.log.info(
            "{queue_id}: spf={spf} dkim={dkim} dmarc={dmarc} arc={arc} action={action}",
            queue_id=envelope.queue_id,
            spf=spf.result,
            dkim=",".join(f"{r.result}:{r.domain}" for r in dkims),
            dmarc=f"{dmarc.result}:{dmarc.from_domain}:{dmarc.disposition}",
            arc=arc[0],
            action=action,
        )
        return Verdict(action, headers=field, reason=reason)


def build_authentication(config: Any, clock: Any, in_pool: Any) -> SenderAuthentication | None:
    """The checks C{config} asks for (C{[policy] authentication_checks}), or None."""
    policy = config.policy
    if not policy.authentication_checks:
        return None
    return SenderAuthentication(
        resolver=Resolver(config.dns.nameservers),
        in_pool=in_pool,
        clock=clock,
        authserv_id=config.server.hostname,
        spf_reject=policy.spf_reject,
        dmarc_reject=policy.dmarc_reject,
    )


__all__ = ["SenderAuthentication", "MessageAuthentication", "build_authentication", "from_domain"]
