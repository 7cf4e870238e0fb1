"""
The twisted.names resolver of the server and the relay keeps answers for
their TTL (L{mailsrv.dnscache.FillingCache}), against a real DNS server on
loopback, with the cache's time on a L{task.Clock}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.names import client, dns, error
from twisted.trial import unittest

from mailsrv.dnscache import FillingCache
from mailsrv.outbound.mx import make_resolver

from .test_outbound_support import start_dns


class FillingCacheTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.port = start_dns(
            reactor,
            [
                ("kept.test", dns.Record_A("192.0.2.1", ttl=300)),
                ("now.test", dns.Record_A("192.0.2.1", ttl=0)),
                ("1.2.0.192.in-addr.arpa", dns.Record_PTR(b"kept.test", ttl=300)),
                ("forever.test", dns.Record_A("192.0.2.1", ttl=2**31 - 1)),
                ("negative.test", dns.Record_A("192.0.2.1", ttl=2**32 - 1)),
                *[("many.test", dns.Record_A(f"192.0.2.{i}", ttl=300)) for i in range(1, 41)],
            ],
        )
        self.addCleanup(self.port.stopListening)
        self.zone: Any = self.port.protocol.controller.resolver.resolvers[0]
        self.clock = task.Clock()
        upstream = client.Resolver(servers=[("127.0.0.1", self.port.getHost().port)])
        self.resolver = FillingCache(upstream, self.clock)

    def change(self, name: bytes, address: str) -> None:
        self.zone.records[name] = [dns.Record_A(address, ttl=0)]

    async def address(self, name: str) -> str:
        answers, _, _ = await self.resolver.lookupAddress(name, timeout=(2,))
        return answers[0].payload.dottedQuad()

    async def test_an_answer_is_kept_for_its_ttl(self) -> None:
        self.assertEqual(await self.address("kept.test"), "192.0.2.1")
        self.change(b"kept.test", "192.0.2.2")
        self.clock.advance(299)
        self.assertEqual(await self.address("kept.test"), "192.0.2.1")
        answers, _, _ = await self.resolver.lookupAddress("kept.test")
        self.assertEqual(answers[0].ttl, 1)  # the TTL counted down
        self.clock.advance(2)
        self.assertEqual(await self.address("kept.test"), "192.0.2.2")

    async def test_ttl_zero_answers_and_failures_are_asked_again(self) -> None:
        self.assertEqual(await self.address("now.test"), "192.0.2.1")
        self.change(b"now.test", "192.0.2.2")
        self.assertEqual(await self.address("now.test"), "192.0.2.2")
        with self.assertRaises(error.DomainError):
            await self.resolver.lookupAddress("new.test", timeout=(2,))
        self.change(b"new.test", "192.0.2.3")
        self.assertEqual(await self.address("new.test"), "192.0.2.3")

    async def test_the_cache_is_bounded(self) -> None:
        self.resolver.max_entries = 1
        await self.address("kept.test")
        await self.resolver.lookupPointer("1.2.0.192.in-addr.arpa", timeout=(2,))
        self.assertEqual(len(self.resolver.cache), 1)

    async def test_the_servers_resolver_keeps_answers(self) -> None:
        # make_resolver (reverse DNS, DNS lists' reactor side, the relay's MX
        # lookups) is one: before, its CacheResolver was never filled.
        from twisted.internet import reactor

        resolver = make_resolver([("127.0.0.1", self.port.getHost().port)], reactor)
        answers, _, _ = await resolver.lookupPointer("1.2.0.192.in-addr.arpa", timeout=(2,))
        self.assertEqual(answers[0].payload.name.name, b"kept.test")
        self.zone.records[b"1.2.0.192.in-addr.arpa"] = [dns.Record_PTR(b"other.test", ttl=0)]
        answers, _, _ = await resolver.lookupPointer("1.2.0.192.in-addr.arpa", timeout=(2,))
        self.assertEqual(answers[0].payload.name.name, b"kept.test")

    async def test_large_answers_and_long_ttls_are_bounded(self) -> None:
        # A client's PTR names are its own to choose: what it points at must
        # not fill the memory, or stay for ever.
        answers, _, _ = await self.resolver.lookupAddress("many.test", timeout=(2,))
        self.assertEqual(len(answers), 40)
        await self.address("forever.test")
        await self.address("negative.test")
        kept = {
            q.name.name: expires - stored for q, (stored, expires, _) in self.resolver.cache.items()
        }
        self.assertEqual(kept, {b"forever.test": 86_400})  # capped to a day; the others not kept
