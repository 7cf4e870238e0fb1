"""
SPF (RFC 7208) of the MAIL FROM identity, or of the HELO identity when the
reverse-path is null (RFC 7208 2.4), with pyspf, its DNS sent to our
L{Resolver} (the configured nameservers) by a subclass of C{spf.query}
that replaces its one DNS method: no module-wide state is changed.
Blocking: run it in a pool thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import spf

from mailsrv.authres.resolver import DnsTempError, Resolver

# RFC 7208 4.6.4: at least 20 seconds for the whole evaluation.
SPF_TIMEOUT = 20.0
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


@dataclass(frozen=True)
class SpfResult:
    """One SPF result (RFC 7208 2.6) and the identity it is for (RFC 8601 2.7.2)."""

    result: str
    identity: str  # "mailfrom" or "helo"
    value: str  # the address or HELO name checked
    domain: str  # the domain whose policy was checked
    reason: str = ""

    @property
    def property(self) -> str:
        """The RFC 8601 2.7.2 property: smtp.mailfrom or smtp.helo."""
        return f"smtp.{self.identity}"


class _Query(spf.query):
    """C{spf.query} asking L{Resolver} (the configured nameservers) instead of dnspython's default."""

    def __init__(self, resolver: Resolver, **kw: Any) -> None:
        super().__init__(**kw)
        self._resolver = resolver
        self._deadline = time.monotonic() + self.timeout  # RFC 7208 4.6.4: the whole check

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        # pyspf's own dns(), but through our resolver (which follows CNAMEs itself).
        if not name:
            raise spf.PermError("empty domain name")
        name = str(name).rstrip(".").lower()
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # not a domain name: no records
        key = (name, qtype)
        result = self.cache.get(key)
        if result is None:
            if time.monotonic() > self._deadline:
                raise spf.TempError("DNS: the SPF check took too long")
            try:
                result = [_value(qtype, r) for r in self._resolver.answers(name, qtype)]
            except DnsTempError as e:
                raise spf.TempError(str(e))
            self.cache[key] = result
        if not result and not ignore_void:
            # RFC 7208 4.6.4: at most two void lookups.
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _value(qtype: str, rdata: Any) -> Any:
    """A record as pyspf's DNS layer gives it."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(True))
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return tuple(rdata.strings)  # TXT


def check_spf(
    resolver: Resolver,
    client_ip: str,
    helo: str,
    sender: str,
    receiver: str,
    timeout: float = SPF_TIMEOUT,
) -> SpfResult:
    """
    The SPF result for mail from C{sender} (or, when it is empty, from
    postmaster@C{helo}) sent by C{client_ip}. Never raises: a DNS failure
    is temperror (RFC 7208 2.6.6), a malformed identity none (4.3).
    """
    identity, value = ("mailfrom", sender) if sender else ("helo", helo)
    domain = (sender.rpartition("@")[2] if sender else helo).rstrip(".").lower()
    if not domain or "." not in domain or domain.startswith("["):
        # RFC 7208 4.3: not a fully qualified domain name: none.
        return SpfResult("none", identity, value, domain, "no domain to check")
    try:
        q = _Query(
            resolver,
            i=client_ip,
            s=sender,
            h=helo,
            receiver=receiver,
            timeout=timeout,
            querytime=timeout,
        )
        result, _, explanation = q.check()
    except Exception as e:  # pyspf's own errors outside check(): never a crash
        return SpfResult("temperror", identity, value, domain, f"{e.__class__.__name__}: {e}")
    if result not in RESULTS:
        result = "permerror"
    return SpfResult(result, identity, value, domain, explanation)
