"""
Reverse DNS of a client, forward-confirmed (FCrDNS): the names its
address's PTR records give (RFC 1035 3.5, RFC 3596 2.5) whose own A or
AAAA records contain the address again. Anyone can publish any PTR name for
their own addresses; only a name whose forward records agree is shown in
C{Received:} and counts as the client's name, as Postfix does.

Looked up once per SMTP connection, within a timeout; no answer in time, or
any DNS failure, is "unknown" (None).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet import defer
from twisted.names import dns

from mailsrv.policy.networks import client_address

MAX_NAMES = 5  # PTR names whose forward records are looked up (the first few)
_MAX_NAME = 253  # RFC 1035 2.3.4
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _forward_addresses(result: Any, rtype: int) -> set[Any]:
    answers, _, _ = result
    out = set()
    for rr in answers:
        if rr.type == rtype:
            try:
                out.add(ipaddress.ip_address(rr.payload.address))
            except ValueError:
                continue
    return out


def _hostname(name: Any) -> str | None:
    """
    A PTR name as a host name, or None if it is none: its owner may publish
    any octets (CR, LF, spaces, non-ASCII) and make them resolve back.
    RFC 1123 2.1: letters, digits and hyphens (with "_", as Postfix's
    valid_hostname), labels of 1 to 63 octets (RFC 1035 2.3.4), and not all
    numeric, which would pass for an address.
    """
    raw = getattr(name, "name", name)
    try:
        text = raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        return None
    text = text.lower().rstrip(".")
    labels = text.split(".")
    if len(text) > _MAX_NAME or len(labels) < 2 or labels[-1].isdigit():
        return None
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return text


class ReverseDNS:
    """Finds the forward-confirmed name of client addresses through a twisted.names resolver."""

    def __init__(self, resolver: Any, clock: Any, timeout: float, max_names: int = MAX_NAMES):
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self.max_names = max_names

    def name(self, host: str) -> defer.Deferred:
        """
        Fires with the confirmed name of C{host} (lower case, no final dot),
        or None, within the timeout; never fails.
        """
        addr = client_address(host)
        if addr is None:
            return defer.succeed(None)
        d = self._confirmed(addr)
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(lambda _: None)  # NXDOMAIN, SERVFAIL, timeout: unknown
        return d

    @defer.inlineCallbacks
    def _confirmed(self, addr: Any) -> Any:
        t = (self.timeout,)
        answers, _, _ = yield self.resolver.lookupPointer(addr.reverse_pointer, timeout=t)
        names = []
        for rr in answers:
            if rr.type == dns.PTR:
                name = _hostname(rr.payload.name)
                if name is not None and name not in names:
                    names.append(name)
        names = names[: self.max_names]
        if addr.version == 4:
            rtype, lookup = dns.A, self.resolver.lookupAddress
        else:
            rtype, lookup = dns.AAAA, self.resolver.lookupIPV6Address
        results = yield defer.DeferredList(
            [lookup(n, timeout=t) for n in names], consumeErrors=True
        )
        for name, (ok, result) in zip(names, results, strict=True):
            if ok and addr in _forward_addresses(result, rtype):
                return name
        return None
