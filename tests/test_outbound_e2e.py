"""
End to end: the outbound service with a real twisted.names DNS server and
real ESMTP receivers on loopback addresses; DSNs checked in the sender's
mailbox (in-memory store) or at the remote receiver.
"""

from __future__ import annotations

import email
import email.policy

from twisted.internet import defer, ssl, task
from twisted.names import client, dns
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.config import parse
from mailsrv.outbound.queue import PENDING, SENT, OutboundQueue, QueueStore
from mailsrv.outbound.service import outbound_service
from mailsrv.service import ServerContext
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from mailsrv.tls import generate_self_signed
from tests.test_outbound_support import Receiver, ipv6_loopback, listen_all, start_dns, temp_dir

MESSAGE = (
    b"From: Alice <alice@example.test>\n"
    b"Subject: test message\n"
    b"Message-ID: <m1@example.test>\n"
    b"\n"
    b"Hello.\n"
    b".leading dot\n"
    b".\n"
    b"last line\n"
)

A, MX, AAAA = dns.Record_A, dns.Record_MX, dns.Record_AAAA


class Passwords:
    def __init__(self, users):
        self.users = set(users)

    def lookup(self, address):
        return address if address in self.users else None

    def has_user(self, address):
        return address in self.users


class OutboundEndToEnd(unittest.TestCase):
    timeout = 60

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = temp_dir(self)
        cert, key = self.tmp / "cert.pem", self.tmp / "key.pem"
        generate_self_signed("mx.accept.test", cert, key)
        server_tls = ssl.PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes()).options()
        self.trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(cert.read_bytes())])

        self.accept = Receiver("accept")
        self.tempfail = Receiver("tempfail")
        self.reject = Receiver("reject")
        self.drop = Receiver("drop")
        self.plain = Receiver("accept")
        self.v6 = Receiver("accept")
        plan = {
            "127.0.0.2": (self.accept, server_tls),
            "127.0.0.3": (self.tempfail, None),
            "127.0.0.4": (self.reject, None),
            "127.0.0.5": (self.drop, None),
            "127.0.0.6": (self.plain, None),
        }
        self.have_v6 = ipv6_loopback()
        if self.have_v6:
            plan["::1"] = (self.v6, None)
        self.port, ports = listen_all(reactor, plan)
        for p in ports:
            self.addCleanup(p.stopListening)

        records = [
            ("accept.test", MX(10, b"mx.accept.test")),
            ("mx.accept.test", A("127.0.0.2")),
            ("tempfail.test", MX(10, b"mx.tempfail.test")),
            ("mx.tempfail.test", A("127.0.0.3")),
            ("reject.test", MX(10, b"mx.reject.test")),
            ("mx.reject.test", A("127.0.0.4")),
            ("drop.test", MX(10, b"mx.drop.test")),
            ("mx.drop.test", A("127.0.0.5")),
            ("amx.test", A("127.0.0.6")),  # no MX: the A record is the implicit MX
            ("null.test", MX(0, b"")),  # RFC 7505
            ("backup.test", MX(10, b"dead.backup.test")),
            ("backup.test", MX(20, b"mx.accept.test")),
            ("dead.backup.test", A("127.0.0.7")),  # nothing listens there
            ("verify.test", MX(10, b"mx.accept.test")),
            ("badverify.test", MX(10, b"wrong.accept.test")),
            ("wrong.accept.test", A("127.0.0.2")),
            ("encrypt.test", MX(10, b"mx.plain.test")),
            ("mx.plain.test", A("127.0.0.6")),
            ("loop.test", MX(10, b"me.loop.test")),
            ("me.loop.test", A("127.0.0.9")),  # our own smtp listener (config below)
            ("v6.test", AAAA("::1")),
        ]
        dns_port = start_dns(reactor, records)
        self.addCleanup(dns_port.stopListening)
        self.dns_port = dns_port.getHost().port

        self.pool = ThreadPool(1, 4, name="test-outbound")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = MemoryMailStore()
        self.passwords = Passwords({"alice@example.test"})
        self.data = self.tmp / "data"

    def config(self, retry_min=1, retry_max=1, **relay):
        extra = "".join(f"{k} = {v}\n" for k, v in relay.items())
        return parse(f"""
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "{self.data}"
[listen]
smtp = ["tcp:{self.port}:interface=127.0.0.9"]
[relay]
port = {self.port}
retry_min = {retry_min}
retry_max = {retry_max}
connect_timeout = 5
tls_policy = {{ "verify.test" = "verify", "badverify.test" = "verify", "encrypt.test" = "encrypt" }}
{extra}
""")

    def start(self, config):
        ctx = ServerContext(
            config=config,
            reactor=self.reactor,
            threadpool=self.pool,
            store=self.store,
            passwords=self.passwords,
            portal=None,
            tls=None,
            queue=OutboundQueue(config.queue_dir, self.reactor, self.pool),
        )
        resolver = client.Resolver(servers=[("127.0.0.1", self.dns_port)], reactor=self.reactor)
        svc = outbound_service(ctx, resolver=resolver, trust_root=self.trust, scan_interval=0.1)
        svc.startService()
        self._running = svc

        def stop():
            if svc.running:
                return svc.stopService()

        self.addCleanup(stop)
        return ctx, svc

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=20.0):
        deadline = self.reactor.seconds() + timeout
        while not predicate():
            if self.reactor.seconds() > deadline:
                self.fail("timed out waiting")
            yield task.deferLater(self.reactor, 0.02, lambda: None)

    def queue_ids(self):
        return QueueStore(self.data / "queue").ids()

    @defer.inlineCallbacks
    def inbox(self, user):
        folder = yield self.store.open_folder(user, "INBOX")
        out = []
        for info in folder.messages():
            raw = folder.open_message(info.uid).read().replace(b"\r\n", b"\n")
            out.append(email.message_from_bytes(raw, policy=email.policy.compat32))
        return out

    def dsn_blocks(self, msg):
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        human, status, headers = msg.get_payload()
        per_message, *rcpts = status.get_payload()
        return (
            human.get_payload(),
            per_message,
            {b["Final-Recipient"][8:]: b for b in rcpts},
            headers,
        )

    @defer.inlineCallbacks
    def test_every_kind_of_destination(self):
        ctx, _ = self.start(self.config())
        rcpts = [
            "a1@accept.test",
            "a2@accept.test",
            "t@tempfail.test",
            "r@reject.test",
            "d@drop.test",
            "x@amx.test",
            "n@null.test",
            "b@backup.test",
            "l@loop.test",
        ]
        if self.have_v6:
            rcpts.append("six@v6.test")
        qid = yield ctx.queue.enqueue("alice@example.test", rcpts, BytesSource(MESSAGE))
        self.assertEqual(self.queue_ids(), [qid])
        yield self.wait_for(lambda: not self.queue_ids())

        expected = b"Received: from test\n" + MESSAGE
        # Two recipients at one domain share one transaction, over STARTTLS.
        self.assertEqual(len(self.accept.messages), 2)
        (first,) = [m for m in self.accept.messages if "a1@accept.test" in m.recipients]
        self.assertEqual(sorted(first.recipients), ["a1@accept.test", "a2@accept.test"])
        self.assertEqual(first.data, expected)
        self.assertEqual(first.sender, "alice@example.test")
        self.assertTrue(first.tls)
        self.assertEqual(first.helo, b"mail.example.test")
        # Backup MX used when the primary does not answer.
        self.assertEqual(self.accept.delivered("b@backup.test"), 1)
        for r in ("a1@accept.test", "a2@accept.test"):
            self.assertEqual(self.accept.delivered(r), 1)
        # 4xx then accepted: delivered once, on the second try.
        self.assertEqual(self.tempfail.rcpt_counts["t@tempfail.test"], 2)
        self.assertEqual(self.tempfail.delivered("t@tempfail.test"), 1)
        self.assertEqual(self.tempfail.messages[0].data, expected)
        # Dropped mid-DATA, then retried and delivered once.
        self.assertEqual(self.drop.drops, 1)
        self.assertEqual(self.drop.delivered("d@drop.test"), 1)
        self.assertEqual(self.drop.connections, 2)
        # No MX: the A record.
        self.assertEqual(self.plain.delivered("x@amx.test"), 1)
        self.assertFalse(self.plain.messages[0].tls)
        if self.have_v6:
            self.assertEqual(self.v6.delivered("six@v6.test"), 1)
        self.assertEqual(self.reject.messages, [])
        self.assertEqual(self.reject.rcpt_counts["r@reject.test"], 1)

        # One DSN for the three failures, in the local sender's mailbox.
        (bounce,) = yield self.inbox("alice@example.test")
        self.assertEqual(bounce["To"], "alice@example.test")
        human, per_message, blocks, headers = self.dsn_blocks(bounce)
        self.assertEqual(per_message["Reporting-MTA"], "dns; mail.example.test")
        self.assertEqual(per_message["X-Queue-ID"], qid)
        self.assertEqual(set(blocks), {"r@reject.test", "n@null.test", "l@loop.test"})
        r = blocks["r@reject.test"]
        self.assertEqual(r["Action"], "failed")
        self.assertEqual(r["Status"], "5.1.1")
        self.assertEqual(r["Remote-MTA"], "dns; mx.reject.test")
        self.assertEqual(
            r["Diagnostic-Code"], "smtp; 550 5.1.1 <r@reject.test>: Recipient address rejected"
        )
        self.assertIn("<r@reject.test>: host mx.reject.test said: 550 5.1.1", human)
        self.assertEqual(blocks["n@null.test"]["Status"], "5.1.10")
        self.assertEqual(blocks["l@loop.test"]["Status"], "5.4.6")
        self.assertIn("Subject: test message", headers.get_payload())
        self.assertNotIn("leading dot", bounce.as_string())

    @defer.inlineCallbacks
    def test_remote_sender_gets_the_dsn_and_a_bounce_is_never_bounced(self):
        ctx, _ = self.start(self.config())
        yield ctx.queue.enqueue("bob@accept.test", ["r@reject.test"], BytesSource(MESSAGE))
        yield ctx.queue.enqueue("", ["r2@reject.test"], BytesSource(MESSAGE))
        yield ctx.queue.enqueue("nosuchuser@accept.test", ["r3@reject.test"], BytesSource(MESSAGE))
        yield self.wait_for(
            lambda: not self.queue_ids() and self.accept.rcpt_counts["nosuchuser@accept.test"] == 1
        )
        yield task.deferLater(self.reactor, 0.3, lambda: None)
        self.assertEqual(self.queue_ids(), [])
        (dsn,) = self.accept.messages
        self.assertEqual(dsn.sender, "")  # RFC 5321 4.5.5: from <>
        self.assertEqual(dsn.recipients, ["bob@accept.test"])
        msg = email.message_from_bytes(dsn.data, policy=email.policy.compat32)
        _, _, blocks, _ = self.dsn_blocks(msg)
        self.assertEqual(list(blocks), ["r@reject.test"])
        # The DSN to nosuchuser@ was refused: dropped, not bounced again.
        self.assertEqual(self.accept.rcpt_counts["nosuchuser@accept.test"], 1)
        self.assertEqual(self.reject.rcpt_counts["r2@reject.test"], 1)
        inbox = yield self.inbox("alice@example.test")
        self.assertEqual(inbox, [])

    @defer.inlineCallbacks
    def test_restart_resumes_the_queue_without_resending(self):
        config = self.config(retry_min=3600, retry_max=3600)
        ctx, svc = self.start(config)
        qid = yield ctx.queue.enqueue(
            "alice@example.test", ["ok@accept.test", "t@tempfail.test"], BytesSource(MESSAGE)
        )
        store = QueueStore(self.data / "queue")
        yield self.wait_for(lambda: store.load_envelope(qid).attempts == 1)
        yield svc.stopService()
        env = store.load_envelope(qid)
        self.assertEqual(
            [(r.address, r.state) for r in env.recipients],
            [("ok@accept.test", SENT), ("t@tempfail.test", PENDING)],
        )
        self.assertEqual(env.recipients[1].status, "4.3.0")
        self.assertIn("451 4.3.0 Greylisted", env.last_error)
        self.assertGreaterEqual(env.next_attempt - env.created, 3000)
        self.assertEqual(self.accept.delivered("ok@accept.test"), 1)
        self.assertEqual(self.tempfail.delivered("t@tempfail.test"), 0)

        # A new server on the same queue folder; "queue flush" makes it retry now.
        store.request_flush()
        self.start(config)
        yield self.wait_for(lambda: not self.queue_ids())
        self.assertEqual(self.accept.delivered("ok@accept.test"), 1)
        self.assertEqual(self.tempfail.delivered("t@tempfail.test"), 1)
        self.assertEqual(self.accept.connections, 1)
        inbox = yield self.inbox("alice@example.test")
        self.assertEqual(inbox, [])

    @defer.inlineCallbacks
    def test_tls_policies(self):
        ctx, _ = self.start(self.config(retry_min=3600, retry_max=3600))
        qid = yield ctx.queue.enqueue(
            "alice@example.test",
            ["v@verify.test", "w@badverify.test", "e@encrypt.test"],
            BytesSource(MESSAGE),
        )
        store = QueueStore(self.data / "queue")
        yield self.wait_for(lambda: store.load_envelope(qid).attempts == 1)
        (m,) = self.accept.messages
        self.assertEqual(m.recipients, ["v@verify.test"])
        self.assertTrue(m.tls)
        env = store.load_envelope(qid)
        state = {r.address: r for r in env.recipients}
        self.assertEqual(state["v@verify.test"].state, SENT)
        self.assertEqual(state["w@badverify.test"].state, PENDING)  # certificate name mismatch
        self.assertEqual(state["e@encrypt.test"].state, PENDING)
        self.assertIn("TLS is required", state["e@encrypt.test"].reply)
        self.assertEqual(self.plain.messages, [])

    @defer.inlineCallbacks
    def test_admin_delete_removes_a_deferred_message(self):
        ctx, svc = self.start(self.config(retry_min=3600, retry_max=3600))
        qid = yield ctx.queue.enqueue(
            "alice@example.test", ["t@tempfail.test"], BytesSource(MESSAGE)
        )
        store = QueueStore(self.data / "queue")
        yield self.wait_for(lambda: store.load_envelope(qid).attempts == 1)
        self.assertTrue(store.remove(qid))
        relayer = svc.relayer
        yield self.wait_for(lambda: qid not in relayer.entries)
        store.request_flush()
        yield task.deferLater(self.reactor, 0.3, lambda: None)
        self.assertEqual(self.tempfail.rcpt_counts["t@tempfail.test"], 1)
        self.assertEqual(self.queue_ids(), [])


class SmarthostAndConcurrency(unittest.TestCase):
    """Everything through one smarthost with AUTH; the per-destination connection limit."""

    timeout = 60

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = temp_dir(self)
        self.relay = Receiver("accept")
        self.slow = Receiver("slow")
        self.port, ports = listen_all(
            reactor,
            {
                "127.0.0.2": (self.relay, None, ("relayuser", "s3cret")),
                "127.0.0.3": (self.slow, None),
            },
        )
        for p in ports:
            self.addCleanup(p.stopListening)
        dns_port = start_dns(reactor, [("slow.test", A("127.0.0.3"))])
        self.addCleanup(dns_port.stopListening)
        self.dns_port = dns_port.getHost().port
        self.pool = ThreadPool(1, 4, name="test-outbound")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = MemoryMailStore()

    def start(self, relay_lines):
        config = parse(f"""
[server]
hostname = "mail.example.test"
data_dir = "{self.tmp / "data"}"
[relay]
port = {self.port}
retry_min = 1
retry_max = 1
{relay_lines}
""")
        ctx = ServerContext(
            config=config,
            reactor=self.reactor,
            threadpool=self.pool,
            store=self.store,
            passwords=Passwords(()),
            portal=None,
            tls=None,
            queue=OutboundQueue(config.queue_dir, self.reactor, self.pool),
        )
        resolver = client.Resolver(servers=[("127.0.0.1", self.dns_port)], reactor=self.reactor)
        svc = outbound_service(ctx, resolver=resolver, scan_interval=0.1)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        return ctx

    @defer.inlineCallbacks
    def wait_empty(self):
        store = QueueStore(self.tmp / "data" / "queue")
        deadline = self.reactor.seconds() + 20
        while store.ids():
            self.assertLess(self.reactor.seconds(), deadline)
            yield task.deferLater(self.reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_smarthost_with_auth(self):
        ctx = self.start(
            f'smarthost = "127.0.0.2:{self.port}"\n'
            'smarthost_username = "relayuser"\nsmarthost_password = "s3cret"\n'
        )
        yield ctx.queue.enqueue(
            "alice@example.test", ["x@anywhere.example", "y@slow.test"], BytesSource(MESSAGE)
        )
        yield self.wait_empty()
        (m,) = self.relay.messages
        self.assertEqual(sorted(m.recipients), ["x@anywhere.example", "y@slow.test"])
        self.assertEqual(m.auth, "relayuser")
        self.assertEqual(self.slow.messages, [])

    @defer.inlineCallbacks
    def test_per_destination_concurrency(self):
        ctx = self.start("per_destination_concurrency = 2\n")
        for i in range(6):
            yield ctx.queue.enqueue("alice@example.test", [f"u{i}@slow.test"], BytesSource(MESSAGE))
        yield self.wait_empty()
        self.assertEqual(len(self.slow.messages), 6)
        self.assertEqual(self.slow.max_active, 2)
        self.assertLess(self.slow.connections, 6)  # idle connections were reused

    @defer.inlineCallbacks
    def test_smarthost_refusing_our_login_defers(self):
        ctx = self.start(
            f'smarthost = "127.0.0.2:{self.port}"\n'
            'smarthost_username = "relayuser"\nsmarthost_password = "wrong"\n'
        )
        qid = yield ctx.queue.enqueue(
            "alice@example.test", ["x@anywhere.example"], BytesSource(MESSAGE)
        )
        store = QueueStore(self.tmp / "data" / "queue")
        deadline = self.reactor.seconds() + 10
        while store.load_envelope(qid).attempts < 1:
            self.assertLess(self.reactor.seconds(), deadline)
            yield task.deferLater(self.reactor, 0.02, lambda: None)
        (r,) = store.load_envelope(qid).recipients
        self.assertEqual((r.state, r.status), (PENDING, "4.7.0"))
        self.assertIn("535", r.reply)
        self.assertEqual(self.relay.messages, [])
