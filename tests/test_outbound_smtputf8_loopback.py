"""
SMTPUTF8 out (RFC 6531), end to end: the outbound service with a real DNS
server and two raw SMTP receivers on loopback, one offering SMTPUTF8 and
one not; the DSN checked in the sender's mailbox.
"""

from __future__ import annotations

import email
import email.policy

from twisted.internet import defer, error, protocol, task
from twisted.names import client, dns
from twisted.protocols.basic import LineReceiver
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.config import parse
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.outbound.service import outbound_service
from mailsrv.service import ServerContext
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from tests.test_outbound_e2e import Passwords
from tests.test_outbound_support import start_dns, temp_dir

JOSE = "jösé@example.test"


class RawReceiver(protocol.ServerFactory):
    """An SMTP sink that records the command lines as sent, with or without SMTPUTF8."""

    def __init__(self, smtputf8: bool) -> None:
        self.smtputf8 = smtputf8
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []

    def buildProtocol(self, addr):
        p = _RawSMTP()
        p.factory = self
        return p


class _RawSMTP(LineReceiver):
    factory: RawReceiver
    _data: list[bytes] | None = None

    def connectionMade(self):
        self.sendLine(b"220 receiver ESMTP")

    def lineReceived(self, line):
        if self._data is not None:
            if line == b".":
                self.factory.messages.append(b"\n".join(self._data))
                self._data = None
                self.sendLine(b"250 2.0.0 queued")
            else:
                self._data.append(line)
            return
        self.factory.commands.append(line)
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            extensions = [b"PIPELINING", b"8BITMIME"] + (
                [b"SMTPUTF8"] if self.factory.smtputf8 else []
            )
            self.sendLine(b"250-receiver")
            for ext in extensions[:-1]:
                self.sendLine(b"250-" + ext)
            self.sendLine(b"250 " + extensions[-1])
        elif verb == b"DATA":
            self._data = []
            self.sendLine(b"354 go")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 ok")


class SMTPUTF8OutTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = temp_dir(self)
        self.utf8 = RawReceiver(smtputf8=True)
        self.ascii = RawReceiver(smtputf8=False)
        self.port = self._listen({"127.0.0.2": self.utf8, "127.0.0.3": self.ascii})
        records = [
            ("utf8.test", dns.Record_MX(10, b"mx.utf8.test")),
            ("mx.utf8.test", dns.Record_A("127.0.0.2")),
            ("ascii.test", dns.Record_MX(10, b"mx.ascii.test")),
            ("mx.ascii.test", dns.Record_A("127.0.0.3")),
            # bücher.test: the DNS holds only its A-labels.
            ("xn--bcher-kva.test", dns.Record_MX(10, b"mx.ascii.test")),
        ]
        dns_port = start_dns(reactor, records)
        self.addCleanup(dns_port.stopListening)
        self.pool = ThreadPool(1, 4, name="test-smtputf8")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = MemoryMailStore()
        self.data = self.tmp / "data"
        config = parse(f"""
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "{self.data}"
[relay]
port = {self.port}
retry_min = 1
retry_max = 1
connect_timeout = 5
""")
        self.ctx = ServerContext(
            config=config,
            reactor=reactor,
            threadpool=self.pool,
            store=self.store,
            passwords=Passwords({JOSE, "alice@example.test"}),
            portal=None,
            tls=None,
            queue=OutboundQueue(config.queue_dir, reactor, self.pool),
        )
        resolver = client.Resolver(
            servers=[("127.0.0.1", dns_port.getHost().port)], reactor=reactor
        )
        svc = outbound_service(self.ctx, resolver=resolver, scan_interval=0.1)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())

    def _listen(self, plan):
        for _ in range(20):
            ports, number = [], 0
            try:
                for address, factory in plan.items():
                    p = self.reactor.listenTCP(number, factory, interface=address)
                    ports.append(p)
                    number = p.getHost().port
            except error.CannotListenError:
                for p in ports:
                    p.stopListening()
                continue
            for p in ports:
                self.addCleanup(p.stopListening)
            return number
        raise RuntimeError("no free port on every loopback address")

    @defer.inlineCallbacks
    def wait_for_empty_queue(self, timeout=20.0):
        deadline = self.reactor.seconds() + timeout
        while QueueStore(self.data / "queue").ids():
            if self.reactor.seconds() > deadline:
                self.fail("the queue did not empty")
            yield task.deferLater(self.reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def inbox(self, user):
        folder = yield self.store.open_folder(user, "INBOX")
        out = []
        for info in folder.messages():
            raw = folder.open_message(info.uid).read().replace(b"\r\n", b"\n")
            out.append(email.message_from_bytes(raw, policy=email.policy.compat32))
        return out

    @defer.inlineCallbacks
    def test_smtputf8_where_offered_a_dsn_where_not_and_a_labels_for_an_idn(self):
        queue = self.ctx.queue
        message = "From: jösé@example.test\nSubject: x\n\nhello\n".encode()
        yield queue.enqueue(JOSE, ["müller@utf8.test"], BytesSource(message), smtputf8=True)
        yield queue.enqueue(JOSE, ["bob@ascii.test"], BytesSource(message), smtputf8=True)
        yield queue.enqueue(
            "alice@example.test",
            ["carol@bücher.test"],
            BytesSource(b"Subject: plain\n\nhello\n"),
            smtputf8=True,
        )
        yield self.wait_for_empty_queue()

        # (a) The server offering SMTPUTF8 gets it, and the UTF-8 paths.
        self.assertIn("MAIL FROM:<jösé@example.test> SMTPUTF8".encode(), self.utf8.commands)
        self.assertIn("RCPT TO:<müller@utf8.test>".encode(), self.utf8.commands)
        self.assertEqual(len(self.utf8.messages), 1)
        # (c) A U-label domain: found by its A-labels, sent as them without SMTPUTF8.
        self.assertIn(b"MAIL FROM:<alice@example.test>", self.ascii.commands)
        self.assertIn(b"RCPT TO:<carol@xn--bcher-kva.test>", self.ascii.commands)
        self.assertEqual(len(self.ascii.messages), 1)
        # (b) The server without SMTPUTF8 never saw the UTF-8 message...
        self.assertFalse(any("jösé".encode() in c for c in self.ascii.commands))
        self.assertFalse(any(b"bob@ascii.test" in c for c in self.ascii.commands))
        # ... and the sender has a DSN saying why (RFC 3464; RFC 6533 for its
        # UTF-8 address; RFC 6531 3.7.4.1 for the status).
        (bounce,) = yield self.inbox(JOSE)
        self.assertEqual(bounce.get_content_type(), "multipart/report")
        self.assertEqual(bounce.get_param("report-type"), "global-delivery-status")
        raw = bounce.as_bytes()
        self.assertIn("To: jösé@example.test\n".encode(), raw)
        human, status, _ = bounce.get_payload()
        self.assertIn(
            "the next hop mx.ascii.test does not support SMTPUTF8",
            human.get_payload(decode=True).decode("utf-8"),
        )
        self.assertEqual(status.get_content_type(), "message/global-delivery-status")
        self.assertIn(b"Final-Recipient: rfc822; bob@ascii.test\n", raw)
        self.assertIn(b"Status: 5.6.7\n", raw)
