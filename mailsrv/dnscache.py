"""
A twisted.names resolver that keeps the answers it got for their TTL: the
reverse name of each SMTP client (its PTR and forward records), the
DNS lists' and the relay's MX lookups ask the same names again and again.

twisted.names' own C{CacheResolver} is filled only by its DNS server
(C{DNSServerFactory}); put before a client resolver in a chain, it stays
empty and every lookup goes out (and it arms a timer per answer).
L{FillingCache} keeps the answers of the resolver behind it, bounded.
Failures (NXDOMAIN, timeouts) are not kept: each is asked again, as before.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet import defer
from twisted.names import common, dns

MAX_ENTRIES = 10_000  # answers kept at most (the least recently used dropped first)
MAX_RECORDS = 32  # records an answer may hold (all sections) to be kept
MAX_TTL = 86_400  # seconds an answer is kept at most, whatever its TTL says

Result = tuple[list[Any], list[Any], list[Any]]  # answers, authority, additional


class FillingCache(common.ResolverBase):
    """
    Answers from the cache while they last, else from C{upstream}, whose
    answers it keeps until the shortest TTL among their records has passed
    on C{clock} (checked when asked: no timer per answer).
    """

    def __init__(self, upstream: Any, clock: Any, max_entries: int = MAX_ENTRIES) -> None:
        super().__init__()
        self.upstream = upstream
        self.clock = clock
        self.max_entries = max_entries
        self.cache: OrderedDict[dns.Query, tuple[float, float, Result]] = OrderedDict()

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred:
        query = dns.Query(name, type, cls)
        kept = self.cache.get(query)
        if kept is not None:
            stored, expires, result = kept
            now = self.clock.seconds()
            if now < expires:
                self.cache.move_to_end(query)
                return defer.succeed(_aged(result, int(now - stored)))
            del self.cache[query]
        d = self.upstream.query(query, timeout)
        d.addCallback(self._keep, query)
        return d

    def _keep(self, result: Result, query: dns.Query) -> Result:
        records = [r for section in result for r in section]
        # An answer without records is not kept. A NODATA answer carries its
        # zone's SOA in the authority section and is kept for that record's
        # TTL (RFC 2308 5). Large answers are not kept (a client's PTR names
        # are its own to choose, and each could point at a 64 KiB answer), and
        # no answer is kept longer than MAX_TTL.
        if not records or len(records) > MAX_RECORDS:
            return result
        ttl = min(r.ttl for r in records)
        if ttl >= 2**31:
            ttl = 0  # RFC 2181 8: a TTL with the top bit set is zero
        ttl = min(ttl, MAX_TTL)
        if ttl > 0:
            now = self.clock.seconds()
            self.cache[query] = (now, now + ttl, result)
            self.cache.move_to_end(query)
            while len(self.cache) > self.max_entries:
                self.cache.popitem(last=False)
        return result


def _aged(result: Result, elapsed: int) -> Result:
    """C{result} with each record's TTL counted down by C{elapsed} seconds."""
    if elapsed <= 0:
        return result
    return tuple(  # type: ignore[return-value]
        [
            dns.RRHeader(r.name.name, r.type, r.cls, max(0, r.ttl - elapsed), r.payload, r.auth)
            for r in section
        ]
        for section in result
    )


__all__ = ["FillingCache"]
