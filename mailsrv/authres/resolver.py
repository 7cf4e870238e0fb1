"""
The DNS the sender authentication checks ask: the configured C{[dns]
nameservers} (each with its port; none: the system's resolv.conf), each
query bounded by a timeout. Blocking (dnspython): used in pool threads only.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections import OrderedDict
from typing import Any

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

QUERY_TIMEOUT = 5.0  # seconds one query may take, retries included
KNOWN = 4096  # answers kept in front of dnspython's cache


class DnsTempError(Exception):
    """No answer could be had (timeout, SERVFAIL, refused): a temporary error (RFC 7208 2.6.6)."""


class Resolver:
    """TXT and address lookups through one dnspython resolver."""

    _deadline = math.inf  # time.monotonic() past which no lookup is made (L{until})

    def __init__(
        self, nameservers: tuple[tuple[str, int], ...] = (), timeout: float = QUERY_TIMEOUT
    ) -> None:
        self._resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = dns.resolver.LRUCache(4096)  # thread-safe; kept for each TTL
        # In front of it, the records themselves by (name, type) until they
        # expire: a hit costs a dictionary lookup, where dnspython's cache is
        # reached through its name parsing and resolution objects (some 20 us,
        # and every message asks for its DKIM key and DMARC record).
        self._known: OrderedDict[tuple[str, str], tuple[float, list[Any]]] = OrderedDict()
        self._known_lock = threading.Lock()

    def until(self, deadline: float) -> Resolver:
        """
        This resolver (its cache too) for work that must be over by
        C{deadline} (a C{time.monotonic()}): a lookup that would end later
        is a temporary error, so that a pool thread is never held past it
        by names a sender chose (DKIM selectors, ARC sets).
        """
        bounded = copy.copy(self)
        bounded._deadline = deadline
        return bounded

    def answers(self, name: str, qtype: str) -> list[Any]:
        """
        The records of type C{qtype} at C{name} (CNAMEs followed); [] when
        the name or the type does not exist; L{DnsTempError} when no server answered.
        """
        known = self._known.get((name, qtype))
        if known is not None and known[0] > time.time():
            return known[1]
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            # Not a domain name (an empty or over-long label, a name a sender
            # made up in a selector): it has no records; never a temporary error.
            return []
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DnsTempError(f"DNS {qtype} {name}: out of time")
        try:
            answer = self._resolver.resolve(
                qname,
                qtype,
                raise_on_no_answer=False,
                search=False,
                lifetime=min(self._resolver.lifetime, left),
            )
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.DNSException, OSError) as e:
            raise DnsTempError(f"DNS {qtype} {name}: {e.__class__.__name__}") from e
        records = list(answer.rrset) if answer.rrset is not None else []
        if answer.rrset is not None:
            with self._known_lock:  # pool threads share this resolver
                if len(self._known) >= KNOWN:
                    self._known.popitem(last=False)  # the oldest entry
                self._known[(name, qtype)] = (answer.expiration, records)
        return records

    def txt(self, name: str) -> list[bytes]:
        """The TXT records at C{name}, each one string (RFC 7208 3.3: the strings joined)."""
        return [b"".join(r.strings) for r in self.answers(name, "TXT")]
