"""
Where to deliver mail for a domain: MX lookup with the RFC 5321 5.1 rules,
over twisted.names.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.names import client, dns, error

from mailsrv.addresses.domains import DomainError, ascii_domain
from mailsrv.dnscache import FillingCache
from mailsrv.logsafe import SafeLogger
from mailsrv.outbound.errors import DeliveryError


@dataclass(frozen=True)
class Hop:
    """One address to try: the MX host's name, its address, and the port."""

    host: str
    address: str
    port: int
    preference: int = 0

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


def make_resolver(nameservers: Iterable[tuple[str, int]], reactor: Any) -> Any:
    """The resolver for MX lookups: the given servers, or the system's resolv.conf."""
    servers = list(nameservers)
    if servers:
        upstream = client.Resolver(servers=servers, reactor=reactor)
    else:
        upstream = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return FillingCache(upstream, reactor)  # answers kept for their TTL


def _unescape_split(description: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(description):
        c = description[i]
        if c == "\\" and i + 1 < len(description):
            cur.append(description[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def listening_addresses(endpoints: Iterable[str]) -> set[tuple[str, int]]:
    """
    The (address, port) pairs of C{tcp:}/C{tcp6:} server endpoint strings;
    an unspecified interface yields 0.0.0.0 or ::.
    """
    out = set()
    for description in endpoints:
        parts = _unescape_split(description)
        kind = parts[0].lower()
        if kind not in ("tcp", "tcp6"):
            continue
        interface = "::" if kind == "tcp6" else "0.0.0.0"
        port = None
        for p in parts[1:]:
            if "=" in p:
                k, v = p.split("=", 1)
                if k == "port":
                    port = int(v)
                elif k == "interface":
                    interface = v or interface
            elif port is None and p.isdigit():
                port = int(p)
        if port is not None:
            out.add((interface, port))
    return out


def _is_self(address: str, port: int, own: set[tuple[str, int]]) -> bool:
    """Whether connecting to address:port would reach one of our own listeners."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for iface, p in own:
        if p != port:
            continue
        if iface in ("0.0.0.0", "::", ""):
            if ip.is_loopback or ip.is_unspecified:
                return True
            continue
        try:
            if ipaddress.ip_address(iface) == ip:
                return True
        except ValueError:
            continue
    return False


def order_mx(records: list[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """MX records by preference, in random order among equals (RFC 5321 5.1)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r[0])  # sort is stable: equals keep the shuffle


def is_null_mx(records: list[tuple[int, str]]) -> bool:
    """RFC 7505 3: a single MX record of preference 0 for the root name '.'."""
    return any(name in ("", ".") for _, name in records)


@functools.lru_cache(maxsize=256)
def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class MXResolver:
    """Turns a domain into the ordered list of L{Hop}s to try."""

    log = SafeLogger()

    def __init__(
        self, resolver: Any, port: int, own: set[tuple[str, int]], rng: random.Random | None = None
    ) -> None:
        self._resolver = resolver
        self._port = port
        self._own = own
        self._rng = rng or random.Random()

    def host_hops(self, host: str, port: int) -> defer.Deferred:
        """The hops of one named host (a smarthost): its addresses, no MX lookup."""

        def hops(addresses: list[str]) -> list[Hop]:
            if not addresses:
                raise DeliveryError(False, "4.4.3", f"No address for {host}")
            return [Hop(host, a, port) for a in addresses]

        def not_found(f: Any) -> Any:
            f.trap(error.DNSNameError)
            raise DeliveryError(False, "4.4.3", f"Host not found: {host}")

        if _is_ip_literal(host):  # e.g. a smarthost given as an address: no lookup, no generator
            return defer.succeed(hops([host]))
        return self._addresses(host).addCallbacks(hops, not_found)

    @defer.inlineCallbacks
    def _addresses(self, name: str):  # -> Deferred[list[str]]
        """AAAA then A addresses of C{name}; DNSNameError if the name does not exist."""
        if _is_ip_literal(name):
            return [name]
        results = yield defer.DeferredList(
            [self._resolver.lookupIPV6Address(name), self._resolver.lookupAddress(name)],
            consumeErrors=True,
        )
        out: list[str] = []
        failures = []
        for ok, value in results:
            if not ok:
                failures.append(value)
                continue
            for rr in value[0]:
                if rr.type == dns.AAAA:
                    out.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
                elif rr.type == dns.A:
                    out.append(rr.payload.dottedQuad())
        if not out and failures and all(f.check(error.DNSNameError) for f in failures):
            raise error.DNSNameError(name)
        if not out and failures:
            raise DeliveryError(
                False,
                "4.4.3",
                f"Host lookup failed for {name}: "
                f"{failures[0].getErrorMessage() or failures[0].type.__name__}",
            )
        return list(dict.fromkeys(out))

    @defer.inlineCallbacks
    def resolve(self, domain: str):  # -> Deferred[list[Hop]]
        """
        Fire with the L{Hop}s to try in order, or fail with L{DeliveryError}:
        permanent for a domain that does not exist, a null MX (RFC 7505) or a
        loop back to this server; temporary for DNS trouble. A domain with
        U-labels is looked up as its A-labels (RFC 5890 2.3.2.1: the DNS holds
        only those).
        """
        domain = domain.rstrip(".").lower()
        if not domain.isascii():
            try:
                domain = ascii_domain(domain)
            except DomainError:
                raise DeliveryError(True, "5.1.2", f"Bad domain name {domain}: not IDNA2008")
        if domain.startswith("[") and domain.endswith("]"):  # RFC 5321 4.1.3 address literal
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            try:
                address = str(ipaddress.ip_address(literal))
            except ValueError:
                raise DeliveryError(True, "5.1.2", f"Bad address literal {domain}")
            hops = [Hop(domain, address, self._port)]
            return self._drop_self(domain, hops)
        try:
            answers, _, _ = yield self._resolver.lookupMailExchange(domain)
        except error.DNSNameError:
            raise DeliveryError(True, "5.1.2", f"Host or domain name not found: {domain}")
        except (error.DomainError, error.AuthoritativeDomainError):
            records: list[tuple[int, str]] = []
        except Exception as e:
            raise DeliveryError(
                False, "4.4.3", f"MX lookup for {domain} failed: {type(e).__name__} {e}"
            )
        else:
            records = [
                (rr.payload.preference, str(rr.payload.name).rstrip(".").lower() or ".")
                for rr in answers
                if rr.type == dns.MX
            ]
        if records and is_null_mx(records):
            raise DeliveryError(
                True, "5.1.10", f"Domain {domain} does not accept mail (null MX, RFC 7505)"
            )
        if not records:
            # RFC 5321 5.1: no MX, the domain itself is the implicit MX.
            try:
                addresses = yield self._addresses(domain)
            except error.DNSNameError:
                raise DeliveryError(True, "5.1.2", f"Host or domain name not found: {domain}")
            if not addresses:
                raise DeliveryError(True, "5.1.2", f"No MX and no address for {domain}")
            return self._drop_self(domain, [Hop(domain, a, self._port) for a in addresses])

        ordered = order_mx(records, self._rng)
        lookups = yield defer.DeferredList(
            [self._addresses(name) for _, name in ordered], consumeErrors=True
        )
        hops = []
        for (pref, name), (ok, value) in zip(ordered, lookups, strict=False):
            if ok:
                hops.extend(Hop(name, a, self._port, pref) for a in value)
            else:
                self.log.warn(
                    "MX host {host} of {domain} does not resolve: {why}",
                    host=name,
                    domain=domain,
                    why=value.getErrorMessage(),
                )
        if not hops:
            raise DeliveryError(False, "4.4.3", f"No MX host of {domain} has an address")
        return self._drop_self(domain, hops)

    def _drop_self(self, domain: str, hops: list[Hop]) -> list[Hop]:
        """
        RFC 5321 5.1: if this server is one of the MX hosts, drop it and every
        MX of equal or lower priority; nothing left means a mail loop.
        """
        mine = [h.preference for h in hops if _is_self(h.address, h.port, self._own)]
        if not mine:
            return hops
        cutoff = min(mine)
        kept = [h for h in hops if h.preference < cutoff]
        if not kept:
            raise DeliveryError(True, "5.4.6", f"Mail for {domain} loops back to myself")
        return kept
