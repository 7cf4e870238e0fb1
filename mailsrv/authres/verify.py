"""
DKIM, ARC and DMARC of one message, as the end of DATA runs them: a pure,
blocking function of the message's octets, the SPF result and a resolver,
run in a pool thread of the server or in a verifier process
(L{mailsrv.authres.workers}); its results pickle.

Messages over C{max_verify} octets are not verified whole: DKIM (dkimpy
needs the message in memory, some four times over) gives neutral for them,
and a DMARC failure that a DKIM pass might have prevented is reported but
not acted on (a large legitimate message is never refused for a check skipped).
"""

from __future__ import annotations

import time

import dkim

from mailsrv.authres.dkimverify import (
    NOT_ARC_SIGNED,
    DkimResult,
    has_arc,
    parse,
    verify_arc,
    verify_parsed,
)
from mailsrv.authres.dmarc import Dmarc, DmarcResult
from mailsrv.authres.resolver import Resolver
from mailsrv.authres.spf import SpfResult

# Of the step's time: when the DKIM and ARC lookups (whose names the sender
# chooses) stop, then DMARC's (the From: domain's), so that the From: domain
# is still judged when a sender's key servers hang.
DKIM_SHARE, DMARC_SHARE = 0.6, 0.9

# Each DKIM signature's result, the ARC chain's (status, why), the DMARC result.
Results = tuple[list[DkimResult], tuple[str, str], DmarcResult]


def verify_message(
    data: bytes,
    spf: SpfResult,
    resolver: Resolver,
    dmarc: Dmarc,
    max_verify: int,
    timeout: float,
) -> Results:
    """
    The results for C{data}: the message's first C{max_verify} + 1 octets
    (more than C{max_verify}: too large to verify), the lookups ending
    within C{timeout} seconds.
    """
    start = time.monotonic()
    signatures = resolver.until(start + timeout * DKIM_SHARE)
    policies = resolver.until(start + timeout * DMARC_SHARE)
    # Every line end CRLF (two passes in C: a regular expression costs ten times more).
    message = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if len(data) > max_verify:
        head = message.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        dkims = [DkimResult("neutral", reason="message too large to verify")]
        result = dmarc.evaluate(headers_of(head), spf, dkims, policies)
        if result.result == "fail":
            # A DKIM pass might have passed it: reported, not acted on.
            result = DmarcResult(
                "fail", result.from_domain, result.policy, "none", "DKIM not verified"
            )
        return dkims, ("none", "message too large to verify"), result
    # Parsed once: the DKIM verifier's header fields serve ARC's test and DMARC.
    parsed = parse(message)
    unparsed = isinstance(parsed, dkim.DKIMException)
    headers = [] if unparsed else parsed.headers
    dkims = verify_parsed(parsed, signatures)
    # A header dkimpy cannot parse is ARC's to judge (a failed chain), as before.
    arc = verify_arc(message, signatures) if unparsed or has_arc(headers) else NOT_ARC_SIGNED
    return dkims, arc, dmarc.evaluate(headers, spf, dkims, policies)


def headers_of(message: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of C{message} (CRLF), or none when they cannot be parsed."""
    try:
        headers, _ = dkim.rfc822_parse(message)
    except dkim.DKIMException:
        return []  # DMARC: no From: domain, permerror
    return headers


__all__ = ["Results", "headers_of", "verify_message"]
