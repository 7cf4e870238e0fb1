"""
The Authentication-Results field as the authres package writes it: the
reference that mailsrv.authres.header's own writing is held to.
"""

from __future__ import annotations

from collections.abc import Sequence

import authres
import authres.arc
import authres.dmarc

from mailsrv.authres.dkimverify import DkimResult
from mailsrv.authres.dmarc import DmarcResult
from mailsrv.authres.header import FIELD, _comment
from mailsrv.authres.spf import SpfResult


def authentication_results(
    authserv_id: str,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    dmarc: DmarcResult | None,
    arc: tuple[str, str] | None,
) -> bytes:
    """The field, LF-terminated, one result per folded line (RFC 8601 2.2)."""
    clauses: list[authres.AuthenticationResult] = []
    if spf is not None:
        clause = authres.SPFAuthenticationResult(
            result=spf.result, result_comment=_comment(spf.reason)
        )
        if spf.identity == "helo":
            clause.smtp_helo = spf.value
        else:
            clause.smtp_mailfrom = spf.value or "<>"
        clauses.append(clause)
    for r in dkim:
        clause = authres.DKIMAuthenticationResult(
            result=r.result, result_comment=_comment(r.reason)
        )
        if r.domain:
            clause.header_d = r.domain
        if r.selector:
            clause.header_s = r.selector
        if r.b:
            # RFC 6008: which signature, when a domain has several.
            clause.properties.append(authres.core.AuthenticationResultProperty("header", "b", r.b))
        clauses.append(clause)
    if dmarc is not None:
        comment = None
        if dmarc.result == "fail":
            comment = f"p={dmarc.policy} dis={dmarc.disposition}"
        elif dmarc.reason:
            comment = dmarc.reason
        clause = authres.dmarc.DMARCAuthenticationResult(
            result=dmarc.result, result_comment=_comment(comment or "")
        )
        if dmarc.from_domain:
            clause.header_from = dmarc.from_domain
        clauses.append(clause)
    if arc is not None:
        clauses.append(
            authres.arc.ARCAuthenticationResult(result=arc[0], result_comment=_comment(arc[1]))
        )
    if not clauses:
        return f"{FIELD}: {authserv_id}; none\n".encode()
    body = ";\n\t".join(str(c) for c in clauses)
    # RFC 5322 2.1.1: lines of at most 998 characters; a clause is well below.
    return f"{FIELD}: {authserv_id};\n\t{body}\n".encode("ascii", "replace")
