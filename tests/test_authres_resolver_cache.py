"""
The sender checks' resolver keeps answers for their TTL and no longer: a
record with TTL 0 is asked anew each time, one with a TTL is not, against a
real DNS server on loopback.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import threads
from twisted.names import dns
from twisted.trial import unittest

from mailsrv.authres.resolver import Resolver

from .test_outbound_support import start_dns


class ResolverCache(unittest.TestCase):
    timeout = 30

    async def test_answers_are_kept_for_their_ttl_only(self) -> None:
        from twisted.internet import reactor

        port = start_dns(
            reactor,
            [
                ("now.test", dns.Record_TXT(b"one", ttl=0)),
                ("kept.test", dns.Record_TXT(b"one", ttl=300)),
            ],
        )
        self.addCleanup(port.stopListening)
        authority: Any = port.protocol.controller.resolver.resolvers[0]
        resolver = Resolver((("127.0.0.1", port.getHost().port),), timeout=5)

        def ask() -> tuple[list[bytes], list[bytes]]:
            return resolver.txt("now.test"), resolver.txt("kept.test")

        first = await threads.deferToThread(ask)
        for name in (b"now.test", b"kept.test"):
            authority.records[name] = [dns.Record_TXT(b"two", ttl=0)]
        second = await threads.deferToThread(ask)
        self.assertEqual(first, ([b"one"], [b"one"]))
        self.assertEqual(second, ([b"two"], [b"one"]))
