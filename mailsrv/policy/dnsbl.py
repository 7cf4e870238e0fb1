"""
DNS block and allow lists (DNSBL, DNSWL; RFC 5782): is a client address
listed in a zone, and does the sum of the lists' weights reach the
threshold that refuses it at connect, as Postfix's postscreen does.

An entry is written as postscreen's C{postscreen_dnsbl_sites}: C{zone},
C{zone=127.0.0.2} or C{zone=127.0.0.[2..11;20]} (only those answers count)
and C{*weight} (default 1; negative subtracts). Without a filter any answer
in 127.0.0.0/8 counts, except 127.255.255.0/24, which lists use for their
error codes ("you query through a public resolver").

Every zone is asked in parallel through a twisted.names resolver; the
answers (and NXDOMAIN) are cached per (zone, address) for the record's TTL
(RFC 2308 5 for a negative answer), within bounds. A lookup that times out
or fails counts as not listed (fail open) and is logged once per outage of
the zone, not per query.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.names import dns, error
from twisted.python.failure import Failure

from mailsrv.logsafe import SafeLogger
from mailsrv.policy.networks import client_address

# Cache bounds (postscreen_dnsbl_min_ttl and _max_ttl are 60 s and 1 h).
MIN_TTL = 60.0
MAX_TTL = 3600.0
NEGATIVE_TTL = 300.0  # an NXDOMAIN without the zone's SOA
CACHE_SIZE = 10000  # (zone, address) answers kept

# RFC 5782 2.3: listed addresses answer with 127.0.0.2 and up; the
# 127.255.255.0/24 answers are the lists' error codes, never a listing.
_LISTED = ipaddress.ip_network("127.0.0.0/8")
_ERRORS = ipaddress.ip_network("127.255.255.0/24")
# One octet of an answer pattern: 2, or [2..11], or [2;4;10..11].
_OCTET = re.compile(r"^(\d{1,3}|\[\d{1,3}(?:\.\.\d{1,3})?(?:;\d{1,3}(?:\.\.\d{1,3})?)*\])$")
_ANSWER = re.compile(
    r"^(\d+|\[[\d.;]*\])\.(\d+|\[[\d.;]*\])\.(\d+|\[[\d.;]*\])\.(\d+|\[[\d.;]*\])$"
)
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# RFC 1035 2.3.4: 253 characters, of which the IPv6 nibbles take 64 and a dot.
MAX_ZONE = 253 - 65


class EntryError(ValueError):
    """A list entry that cannot be used (the text says why)."""


@dataclass(frozen=True)
class DNSListEntry:
    """One configured list: its zone, the answers that count, and its weight."""

    zone: str
    answers: tuple[frozenset[int], ...] | None = None  # four octet sets; None: any
    weight: int = 1

    def counts(self, answer: str) -> bool:
        """Whether the A record C{answer} is a listing by this entry."""
        try:
            addr = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        if self.answers is None:
            return addr in _LISTED and addr not in _ERRORS
        octets = addr.packed
        return all(o in allowed for o, allowed in zip(octets, self.answers, strict=True))


def parse_zone(text: str) -> str:
    """A DNS zone name, lower case without the final dot; L{EntryError} if it is none."""
    zone = text.strip().lower().rstrip(".")
    labels = zone.split(".")
    if not zone or len(zone) > MAX_ZONE or not all(_LABEL.match(label) for label in labels):
        raise EntryError(f"{text!r} is not a DNS zone name")
    return zone


def _octet(text: str) -> frozenset[int]:
    if not _OCTET.match(text):
        raise EntryError(f"{text!r} is not an octet, nor a pattern like [2..11;20]")
    out: set[int] = set()
    for part in text.strip("[]").split(";"):
        lo, _, hi = part.partition("..")
        first, last = int(lo), int(hi or lo)
        if not 0 <= first <= last <= 255:
            raise EntryError(f"{part!r} is not an octet range of 0 to 255")
        out.update(range(first, last + 1))
    return frozenset(out)


def parse_entry(text: str) -> DNSListEntry:
    """
    A list entry as postscreen_dnsbl_sites writes it: C{zone[=answer][*weight]},
    where answer is an address whose octets may be patterns (C{127.0.0.[2..11]}).
    """
    if not isinstance(text, str):
        raise EntryError(f"{text!r} is not a string")
    rest, star, weight_text = text.partition("*")
    weight = 1
    if star:
        try:
            weight = int(weight_text.strip())
        except ValueError:
            raise EntryError(f"{text!r}: the weight after * must be an integer") from None
    zone_text, eq, pattern = rest.partition("=")
    zone = parse_zone(zone_text)
    answers = None
    if eq:
        octets = _ANSWER.match(pattern.strip())
        if octets is None:
            raise EntryError(f"{text!r}: the answer must be an IPv4 address like 127.0.0.2")
        try:
            answers = tuple(_octet(o) for o in octets.groups())
        except EntryError as e:
            raise EntryError(f"{text!r}: {e}") from None
    return DNSListEntry(zone, answers, weight)


def query_name(host: str, zone: str) -> str | None:
    """
    The name to look up for C{host} in C{zone}: the IPv4 octets reversed
    (RFC 5782 2.1), or the 32 nibbles of an IPv6 address reversed (2.4);
    None for a peer without an IP address.
    """
    addr = client_address(host)
    if addr is None:
        return None
    reverse = addr.reverse_pointer  # 1.0.0.127.in-addr.arpa, b.a.9.8...ip6.arpa
    return reverse.rsplit(".", 2)[0] + "." + zone


@dataclass(frozen=True)
class Listing:
    """A client listed by one entry: the entry and the answer it got."""

    entry: DNSListEntry
    answer: str


def _ttl(value: float) -> float:
    return min(max(value, MIN_TTL), MAX_TTL)


def _negative_ttl(authority: Iterable[Any]) -> float:
    """RFC 2308 5: the lesser of the SOA's TTL and its MINIMUM field."""
    for rr in authority:
        if rr.type == dns.SOA:
            return _ttl(min(rr.ttl, rr.payload.minimum))
    return _ttl(NEGATIVE_TTL)


class AnswerCache:
    """Answers per key until their expiry on the clock; the oldest go past C{size}."""

    def __init__(self, clock: Any, size: int = CACHE_SIZE) -> None:
        self.clock = clock
        self.size = size
        self._entries: OrderedDict[Any, tuple[float, tuple[str, ...]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> tuple[str, ...] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, answers = found
        if expires <= self.clock.seconds():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return answers

    def put(self, key: Any, answers: tuple[str, ...], ttl: float) -> None:
        self._entries[key] = (self.clock.seconds() + ttl, answers)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class DNSLists:
    """
    The lists of one kind (block or allow): which of their entries list an
    address. Each zone is asked once per address (entries of one zone with
    other answers or weights share the lookup, and so do connections that
    ask at the same time).
    """

    log = SafeLogger()

    def __init__(
        self,
        entries: Iterable[DNSListEntry],
        resolver: Any,
        clock: Any,
        timeout: float,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.entries = tuple(entries)
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self.cache = AnswerCache(clock, cache_size)
        self.zones = tuple(dict.fromkeys(e.zone for e in self.entries))
        self._pending: dict[tuple[str, str], list[defer.Deferred]] = {}
        self._failing: set[str] = set()  # zones whose last lookup failed

    def listings(self, host: str) -> defer.Deferred:
        """
        Fires with the L{Listing}s of C{host} (empty: listed nowhere) within
        the timeout; never fails.
        """
        lookups = [self.answers(zone, host) for zone in self.zones]
        d = defer.gatherResults(lookups)
        d.addCallback(self._match)
        return d

    def _match(self, answers: list[tuple[str, ...]]) -> list[Listing]:
        by_zone = dict(zip(self.zones, answers, strict=True))
        out = []
        for entry in self.entries:
            for answer in by_zone[entry.zone]:
                if entry.counts(answer):
                    out.append(Listing(entry, answer))
                    break
        return out

    def answers(self, zone: str, host: str) -> defer.Deferred:
        """The A records C{zone} has for C{host} (empty when none or no answer in time)."""
        name = query_name(host, zone)
        if name is None:
            return defer.succeed(())
        key = (zone, name)
        cached = self.cache.get(key)
        if cached is not None:
            return defer.succeed(cached)
        waiting = self._pending.get(key)
        d: defer.Deferred = defer.Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[key] = [d]
        lookup = self.resolver.lookupAddress(name, timeout=(self.timeout,))
        lookup.addTimeout(self.timeout, self.clock)
        lookup.addCallbacks(self._answered, self._failed, (key,), None, (key, host))
        lookup.addErrback(self._broken, zone)
        lookup.addCallback(self._tell, key)
        return d

    def _answered(self, result: Any, key: tuple[str, str]) -> tuple[str, ...]:
        answers, authority, _ = result
        found = [rr for rr in answers if rr.type == dns.A]
        if found:
            out = tuple(rr.payload.dottedQuad() for rr in found)
            self.cache.put(key, out, _ttl(min(rr.ttl for rr in found)))
        else:
            out = ()
            self.cache.put(key, out, _negative_ttl(authority))
        self._recovered(key[0])
        return out

    def _failed(self, reason: Failure, key: tuple[str, str], host: str) -> tuple[str, ...]:
        zone = key[0]
        if reason.check(error.DNSNameError, error.AuthoritativeDomainError):
            # NXDOMAIN: not listed (RFC 5782 2.1), cached as RFC 2308 says.
            args = getattr(reason.value, "args", ())  # the client's errors carry the answer
            message = args[0] if args and isinstance(args[0], dns.Message) else None
            self.cache.put(key, (), _negative_ttl(message.authority if message else ()))
            self._recovered(zone)
            return ()
        if zone not in self._failing:
            self._failing.add(zone)
            cause = "no answer in time" if reason.check(defer.TimeoutError) else reason.value
            self.log.warn(
                "DNS list {zone} failed for {client} ({cause}); clients pass unchecked"
                " by it until it answers again",
                zone=zone,
                client=host,
                cause=str(cause) or repr(reason.value),
            )
        return ()

    def _broken(self, reason: Failure, zone: str) -> tuple[str, ...]:
        self.log.failure("reading the answer of DNS list {zone}", failure=reason, zone=zone)
        return ()

    def _recovered(self, zone: str) -> None:
        if zone in self._failing:
            self._failing.discard(zone)
            self.log.info("DNS list {zone} answers again", zone=zone)

    def _tell(self, answers: tuple[str, ...], key: tuple[str, str]) -> None:
        for d in self._pending.pop(key, []):
            d.callback(answers)


@dataclass(frozen=True)
class DNSBLVerdict:
    """What the block and allow lists say of one client."""

    listings: tuple[Listing, ...] = ()  # by the block lists
    allowed_by: Listing | None = None  # the first allow list that lists it
    score: int = 0  # the block lists' summed weight
    threshold: int = 1

    @property
    def blocked(self) -> bool:
        """Refused: no allow list names it and the weights reach the threshold."""
        return self.allowed_by is None and self.score >= self.threshold

    @property
    def blocked_by(self) -> Listing | None:
        """The listing named to the client: the heaviest of a blocked client's."""
        if not self.blocked or not self.listings:
            return None
        return max(self.listings, key=lambda listing: listing.entry.weight)


class DNSBLCheck:
    """The block lists and the allow lists of the server, asked together."""

    def __init__(self, block: DNSLists, allow: DNSLists, threshold: int = 1) -> None:
        self.block = block
        self.allow = allow
        self.threshold = threshold

    def check(self, host: str) -> defer.Deferred:
        """Fires with the L{DNSBLVerdict} on C{host} within the timeout; never fails."""
        d = defer.gatherResults([self.block.listings(host), self.allow.listings(host)])
        d.addCallback(self._verdict)
        return d

    def _verdict(self, found: list[list[Listing]]) -> DNSBLVerdict:
        blocked, allowed = found
        return DNSBLVerdict(
            listings=tuple(blocked),
            allowed_by=allowed[0] if allowed else None,
            score=sum(listing.entry.weight for listing in blocked),
            threshold=self.threshold,
        )
