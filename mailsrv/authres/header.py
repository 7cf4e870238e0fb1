"""
The one C{Authentication-Results:} field (RFC 8601) that tells what the
checks found, and the test for the fields from outside that are dropped as
the message streams in.

The field is written here, clause by clause, in the exact form the
authres package gives (tests/test_authres.py holds the two to the same
bytes): the package builds an object per clause and per property and
re-quotes each value with regular expressions, which cost a tenth of a
millisecond a message on the server's one thread (benchmarks/checks_bench.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mailsrv.authres.dkimverify import DkimResult
from mailsrv.authres.dmarc import DmarcResult
from mailsrv.authres.spf import SpfResult

FIELD = "Authentication-Results"
_UNSAFE = re.compile(r"[^\x20-\x7e]|[()\\]")
# RFC 2045 5.1: a token is printable ASCII but for space and tspecials.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
_QUOTED = re.compile(r'["\\]')
_DROPPED = frozenset({b"authentication-results"})


def dropped_field(lname: bytes) -> bool:
    """
    Whether a header field from outside (its lower-case name) is dropped:
    every Authentication-Results field, so that no sender can claim results
    in our name (RFC 8601 5: those with our authserv-id must go; we drop
    all, as the MX is the border). ARC-Authentication-Results fields stay:
    they belong to ARC sets (RFC 8617 4.1.1) that would break without them.
    """
    return lname in _DROPPED


def _comment(text: str) -> str | None:
    """A comment made safe (printable ASCII, no parentheses), at most 100 characters."""
    text = _UNSAFE.sub(" ", text).strip()[:100]
    return text or None


def _value(value: str) -> str:
    """
    A property's value as RFC 8601 2.2 writes it: an address or domain
    (with "@"), or an RFC 2045 token, as it is; else a quoted-string.
    """
    if "@" in value or _TOKEN.fullmatch(value):
        return value
    return '"' + _QUOTED.sub(r"\\\g<0>", value) + '"'


def _clause(method: str, result: str, comment: str | None, props: Sequence[tuple[str, str]]) -> str:
    """C{method=result (comment) ptype.property=value ...} (RFC 8601 2.2)."""
    text = f"{method}={result.lower()}"
    if comment:
        text += f" ({comment})"
    for name, value in props:
        if value:
            text += f" {name}={_value(value)}"
    return text


def authentication_results(
    authserv_id: str,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    dmarc: DmarcResult | None,
    arc: tuple[str, str] | None,
) -> bytes:
    """The field, LF-terminated, one result per folded line (RFC 8601 2.2)."""
    clauses: list[str] = []
    if spf is not None:
        prop = "smtp.helo" if spf.identity == "helo" else "smtp.mailfrom"
        value = spf.value if spf.identity == "helo" else (spf.value or "<>")
        clauses.append(_clause("spf", spf.result, _comment(spf.reason), [(prop, value)]))
    for r in dkim:
        # header.b (RFC 6008): which signature, when a domain has several.
        props = [("header.d", r.domain), ("header.s", r.selector), ("header.b", r.b)]
        clauses.append(_clause("dkim", r.result, _comment(r.reason), props))
    if dmarc is not None:
        comment = None
        if dmarc.result == "fail":
            comment = f"p={dmarc.policy} dis={dmarc.disposition}"
        elif dmarc.reason:
            comment = dmarc.reason
        props = [("header.from", dmarc.from_domain)]
        clauses.append(_clause("dmarc", dmarc.result, _comment(comment or ""), props))
    if arc is not None:
        clauses.append(_clause("arc", arc[0], _comment(arc[1]), []))
    if not clauses:
        return f"{FIELD}: {authserv_id}; none\n".encode()
    body = ";\n\t".join(clauses)
    # RFC 5322 2.1.1: lines of at most 998 characters; a clause is well below.
    return f"{FIELD}: {authserv_id};\n\t{body}\n".encode("ascii", "replace")
