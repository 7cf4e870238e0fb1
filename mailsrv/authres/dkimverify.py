"""
DKIM verification (RFC 6376 6) of every signature of a message, up to
L{MAX_SIGNATURES}, and ARC chain validation (RFC 8617 5.2), with dkimpy,
its keys looked up through our L{Resolver}. Blocking: run in a pool thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dkim

from mailsrv.authres.resolver import DnsTempError, Resolver

MAX_SIGNATURES = 5  # as OpenDKIM's MaximumSignaturesToVerify is set by many: the rest ignored
_QUIET = logging.getLogger("mailsrv.authres.dkim")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


@dataclass(frozen=True)
class DkimResult:
    """One signature's result (RFC 8601 2.7.1)."""

    result: str  # pass, fail, neutral, temperror, permerror, none
    domain: str = ""  # its d=
    selector: str = ""  # its s=
    b: str = ""  # the first characters of its b= (RFC 6008: which signature)
    reason: str = ""


class _KeyLookup:
    """dkimpy's dnsfunc: a TXT lookup that remembers whether DNS failed."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.failed = False

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = self.resolver.txt(text)
        except DnsTempError:
            self.failed = True
            return None
        return records[0] if records else None


def verify_dkim(message: bytes, resolver: Resolver) -> list[DkimResult]:
    """Each DKIM signature's result; [dkim=none] when there is none."""
    return verify_parsed(parse(message), resolver)


def parse(message: bytes) -> dkim.DKIM | dkim.DKIMException:
    """
    The message parsed once for its DKIM signatures (C{.headers}: its header
    fields, for DMARC and ARC too), or why it cannot be.
    """
    try:
        return dkim.DKIM(message, logger=_QUIET)
    except dkim.DKIMException as e:
        return e


def verify_parsed(verifier: dkim.DKIM | dkim.DKIMException, resolver: Resolver) -> list[DkimResult]:
    """L{verify_dkim} of a message L{parse} gave."""
    if isinstance(verifier, dkim.DKIMException):
        return [DkimResult("permerror", reason=str(verifier))]
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    if count == 0:
        return [DkimResult("none")]
    return [_verify_one(verifier, i, resolver) for i in range(min(count, MAX_SIGNATURES))]


def _verify_one(verifier: dkim.DKIM, idx: int, resolver: Resolver) -> DkimResult:
    lookup = _KeyLookup(resolver)
    verifier.domain = verifier.selector = None
    verifier.signature_fields = {}
    try:
        ok = verifier.verify(idx=idx, dnsfunc=lookup)
        reason = "" if ok else "signature did not verify"
    except dkim.ValidationError as e:
        ok, reason = False, str(e)
    except dkim.DKIMException as e:
        # RFC 6376 6.1.1: a signature that cannot be parsed is a permerror.
        domain, selector, b = _tags(verifier)
        return DkimResult("permerror", domain, selector, b, str(e))
    domain, selector, b = _tags(verifier)
    if ok:
        return DkimResult("pass", domain, selector, b)
    if lookup.failed:
        return DkimResult("temperror", domain, selector, b, "key lookup failed")
    return DkimResult("fail", domain, selector, b, reason)


def _tags(verifier: dkim.DKIM) -> tuple[str, str, str]:
    fields = verifier.signature_fields or {}

    def text(tag: bytes) -> str:
        return bytes(fields.get(tag, b"")).decode("ascii", "replace")

    b = "".join(text(b"b").split())[:8]
    return text(b"d").lower(), text(b"s"), b


_ARC_FIELDS = frozenset({b"arc-seal", b"arc-message-signature", b"arc-authentication-results"})
NOT_ARC_SIGNED = ("none", "Message is not ARC signed")  # as dkimpy says it


def has_arc(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether any ARC field is among C{headers}: else the chain is none, with no more work."""
    return any(name.lower() in _ARC_FIELDS for name, _ in headers)


def verify_arc(message: bytes, resolver: Resolver) -> tuple[str, str]:
    """The ARC chain's validation status (RFC 8617 4.4: none, pass or fail) and why."""
    lookup = _KeyLookup(resolver)
    try:
        cv, _, reason = dkim.arc_verify(message, logger=_QUIET, dnsfunc=lookup)
    except Exception as e:  # dkimpy's parsing of a hostile chain: a failed chain
        return "fail", f"{e.__class__.__name__}: {e}"
    status = cv.decode("ascii") if isinstance(cv, bytes) else str(cv)
    if status == "fail" and lookup.failed:
        return "fail", "key lookup failed"  # RFC 8617 4.4: none, pass or fail only
    return status, str(reason or "")
