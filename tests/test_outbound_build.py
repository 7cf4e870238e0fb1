"""
The one builder of the relayer: its parts put together, the MX lookups of
the config, and a relayer built for a test delivering local and remote mail.
"""

from __future__ import annotations

import ast
import email
from pathlib import Path

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.trial import unittest
from zope.interface.verify import verifyObject

import mailsrv.outbound
from mailsrv.config import parse
from mailsrv.interfaces import IPasswordDatabase
from mailsrv.outbound.build import build_relayer, mx_resolver, queued_router
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.mx import MXResolver
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.outbound.relayer import Relayer
from mailsrv.outbound.schedule import RetrySchedule
from mailsrv.routing import Mailbox, Relay
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from tests.test_outbound_support import MemoryAuthority, temp_dir


class _RecordingResolver:
    """Every domain is down for now; the domains asked for are kept."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolve(self, domain):
        self.asked.append(domain)
        return defer.fail(DeliveryError(False, "4.4.3", f"MX lookup for {domain} timed out"))


class BuildRelayerTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.config = parse(f"""
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "{temp_dir(self) / "data"}"
[listen]
smtp = ["tcp:2525:interface=127.0.0.1"]
[relay]
port = 2525
retry_min = "7m"
""")
        self.queue = OutboundQueue(self.config.queue_dir, self.clock, None)

    def test_the_parts_share_one_queue_and_one_record_of_results(self):
        relayer = build_relayer(
            self.config,
            queue=self.queue,
            reactor=self.clock,
            threadpool=None,
            mailboxes=MemoryMailStore(clock=self.clock.seconds),
        )
        self.assertIsInstance(relayer, Relayer)
        self.assertIsInstance(relayer.remote.resolver, MXResolver)  # from [dns] by default
        self.assertEqual(relayer.schedule, RetrySchedule.from_config(self.config.relay))
        self.assertEqual(relayer.schedule.retry_min, 420)
        assert relayer.local is not None
        parts = (relayer.remote, relayer.local, relayer.bounces)
        self.assertEqual({id(p.results) for p in parts}, {id(relayer.results)})
        self.assertEqual({id(p.queue) for p in (*parts, relayer)}, {id(self.queue)})
        self.assertIs(relayer.bounces.local, relayer.local)

    def test_without_mailboxes_every_recipient_is_remote(self):
        resolver = _RecordingResolver()
        relayer = build_relayer(
            self.config, queue=self.queue, reactor=self.clock, threadpool=None, resolver=resolver
        )
        self.assertIsNone(relayer.local)
        self.assertIsNone(relayer.bounces.local)
        self.successResultOf(relayer.start())
        self.addCleanup(relayer.stop)
        self.successResultOf(
            self.queue.enqueue("a@remote.test", ["b@example.test"], BytesSource(b"\n"))
        )
        self.assertEqual(resolver.asked, ["example.test"])

    def test_a_built_relayer_delivers_local_mail_and_asks_for_remote_hops(self):
        resolver = _RecordingResolver()
        mailboxes = MemoryMailStore(clock=self.clock.seconds)
        relayer = build_relayer(
            self.config,
            queue=self.queue,
            reactor=self.clock,
            threadpool=None,
            resolver=resolver,
            mailboxes=mailboxes,
            schedule=RetrySchedule(retry_min=60, retry_max=60, max_lifetime=600),
        )
        self.successResultOf(relayer.start())
        qid = self.successResultOf(
            self.queue.enqueue(
                "x@remote.test",
                ["alice@example.test", "bob@remote.test"],
                BytesSource(b"Subject: both\n\nbody\n"),
            )
        )
        self.assertEqual(resolver.asked, ["remote.test"])
        folder = self.successResultOf(mailboxes.open_folder("alice@example.test", "INBOX"))
        (info,) = folder.messages()
        self.assertEqual(
            email.message_from_bytes(folder.open_message(info.uid).read())["Subject"], "both"
        )
        env = QueueStore(self.config.queue_dir).load_envelope(qid)
        self.assertEqual([r.state for r in env.recipients], ["sent", "pending"])
        self.assertEqual(env.next_attempt, self.clock.seconds() + 60)  # the given schedule
        self.clock.advance(60)
        self.assertEqual(resolver.asked, ["remote.test", "remote.test"])
        self.successResultOf(relayer.stop())


class MXResolverOfConfigTests(unittest.TestCase):
    def test_own_smtp_listener_is_never_a_hop(self):
        config = parse("""
[listen]
smtp = ["tcp:2525:interface=127.0.0.1"]
[relay]
port = 2525
""")
        zone = MemoryAuthority(
            "test",
            [
                ("loop.test", dns.Record_MX(10, b"mx.loop.test")),
                ("mx.loop.test", dns.Record_A("127.0.0.1")),
                ("ok.test", dns.Record_MX(10, b"mx.ok.test")),
                ("mx.ok.test", dns.Record_A("127.0.0.2")),
            ],
        )
        mx = mx_resolver(config, MemoryReactorClock(), zone)
        f = self.failureResultOf(mx.resolve("loop.test"), DeliveryError)
        self.assertEqual((f.value.permanent, f.value.status), (True, "5.4.6"))
        (hop,) = self.successResultOf(mx.resolve("ok.test"))
        self.assertEqual((hop.host, hop.address, hop.port), ("mx.ok.test", "127.0.0.2", 2525))


class ModuleLevelImportsTests(unittest.TestCase):
    def test_no_outbound_module_imports_inside_a_function_but_the_reactor(self):
        found = []
        for path in sorted(Path(mailsrv.outbound.__file__).parent.glob("*.py")):
            for func in ast.walk(ast.parse(path.read_text())):
                if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(func):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        names = [a.name for a in node.names]
                        if (getattr(node, "module", None), names) != (
                            "twisted.internet",
                            ["reactor"],
                        ):
                            found.append(f"{path.name}:{node.lineno} {names}")
        self.assertEqual(found, [])


class RoutingDecisionsTests(unittest.TestCase):
    def test_the_relayers_router(self):
        queue = OutboundQueue(temp_dir(self) / "q", MemoryReactorClock(), None)
        config = parse('[server]\ndomains = ["example.test"]')
        local = queued_router(config, queue=queue, passwords=None, local=True)
        passwords = local.passwords
        self.assertTrue(verifyObject(IPasswordDatabase, passwords))  # every address a user
        self.assertEqual(passwords.lookup("Bob@example.test"), "Bob@example.test")
        self.assertTrue(passwords.has_user("bob@example.test"))
        self.assertFalse(self.successResultOf(passwords.verify("bob@example.test", "x")))
        self.assertEqual(local.route_queued("Bob@example.test"), Mailbox("Bob@example.test"))
        remote = queued_router(config, queue=queue, passwords=None, local=False)
        self.assertEqual(remote.route_queued("Bob@example.test"), Relay("Bob@example.test"))

    def test_no_outbound_module_decides_local_or_remote_but_the_routing_step(self):
        """The relayer asks L{mailsrv.routing}; only the builder hands it the local domains."""
        found = []
        for path in sorted(Path(mailsrv.outbound.__file__).parent.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("is_local_domain", "lookup"):
                    found.append(f"{path.name} {ast.unparse(node)}")
        self.assertEqual(found, ["build.py config.is_local_domain"])
