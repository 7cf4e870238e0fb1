"""
The DNS lists and reverse DNS end to end: a twisted.names DNS server on
loopback serves a block list (bl.test), an allow list (wl.test) and the PTR,
A records of the clients, and the server asks it through its [dns]
nameservers over UDP; real SMTP clients (smtplib, from 127.0.0.1 and other
loopback addresses) connect over TCP. First the MX listener as the service
builds it (the gate, the checks, the SMTP session) in this process, then
the real ``twistd -n mailsrv``.
"""

from __future__ import annotations

import dataclasses
import smtplib
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.names import dns
from twisted.trial import unittest

from mailsrv import config as configmod
from mailsrv.policy.client import client_checks
from mailsrv.policy.connections import connection_gate
from mailsrv.policy.listener import GateFactory
from mailsrv.smtp.server import smtp_factory
from tests.e2e import MailServer
from tests.test_outbound_support import start_dns
from tests.test_smtp_helpers import make_context, read_inbox

TIMEOUT = 20
ALICE = "alice@example.test"
MESSAGE = b"Subject: hello\r\n\r\nhello\r\n"

RECORDS: list[tuple[str, Any]] = [
    # 127.0.0.2 is listed; 127.0.0.3 too, but an allow list names it.
    ("2.0.0.127.bl.test", dns.Record_A("127.0.0.2")),
    ("3.0.0.127.bl.test", dns.Record_A("127.0.0.2")),
    ("3.0.0.127.wl.test", dns.Record_A("127.0.10.1")),
    # 127.0.0.1 is client.test, forward-confirmed; 127.0.0.4 claims a name
    # whose address is another.
    ("1.0.0.127.in-addr.arpa", dns.Record_PTR("client.test")),
    ("client.test", dns.Record_A("127.0.0.1")),
    ("4.0.0.127.in-addr.arpa", dns.Record_PTR("liar.test")),
    ("liar.test", dns.Record_A("127.0.0.9")),
]


def send(port: int, source: str = "127.0.0.1") -> tuple[int, bytes] | dict:
    """
    Send one message to alice from C{source} (blocking: run in a thread):
    the refused recipients, or the code and text of a refused greeting.
    """
    client = smtplib.SMTP(timeout=TIMEOUT, source_address=(source, 0))
    code, text = client.connect("127.0.0.1", port)
    if code != 220:
        client.close()
        return code, text
    with client:
        client.ehlo("helo.client.test")
        try:
            return client.sendmail("bob@client.test", [ALICE], MESSAGE)
        except smtplib.SMTPRecipientsRefused as e:
            return e.recipients


def first_line(port: int, source: str) -> bytes:
    """The first line a server sends a client from C{source} (blocking)."""
    with socket.create_connection(("127.0.0.1", port), TIMEOUT, (source, 0)) as s:
        return s.makefile("rb").readline()


class Silent(protocol.DatagramProtocol):
    """A DNS server that never answers."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        pass


class ListenerEndToEnd(unittest.TestCase):
    """The MX listener as the service builds it, in this process, on the real reactor."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        dns_port = start_dns(reactor, RECORDS, origin="")
        self.addCleanup(dns_port.stopListening)
        self.dns_port = dns_port.getHost().port

    def serve(self, policy: str, dns_port: int | None = None) -> tuple[Any, int]:
        text = f'[dns]\nnameservers = ["127.0.0.1:{dns_port or self.dns_port}"]\n[policy]\n{policy}'
        extra = configmod.parse(text)
        ctx = make_context(Path(tempfile.mkdtemp(prefix="dnsbl-")), reactor=self.reactor)
        ctx = dataclasses.replace(
            ctx, config=dataclasses.replace(ctx.config, dns=extra.dns, policy=extra.policy)
        )
        factory = GateFactory(
            smtp_factory(ctx),
            connection_gate(ctx.config.policy, self.reactor),
            "smtp",
            self.reactor,
            ctx.config.server.hostname,
            client_checks=client_checks(ctx.config, self.reactor),
        )
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return ctx, port.getHost().port

    @defer.inlineCallbacks
    def test_a_listed_client_is_refused_naming_the_list(self):
        ctx, port = self.serve('dnsbl = ["bl.test"]\n')
        refused = yield threads.deferToThread(send, port, "127.0.0.2")
        # RFC 5321 3.1: a 554 greeting refuses the session.
        self.assertEqual(
            refused, (554, b"5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test")
        )
        self.assertEqual(read_inbox(ctx, ALICE), [])

    @defer.inlineCallbacks
    def test_an_unlisted_client_is_served_with_its_confirmed_name(self):
        ctx, port = self.serve('dnsbl = ["bl.test"]\n')
        self.assertEqual((yield threads.deferToThread(send, port, "127.0.0.1")), {})
        [message] = read_inbox(ctx, ALICE)
        self.assertIn(b"Received: from helo.client.test (client.test [127.0.0.1])\n", message)

    @defer.inlineCallbacks
    def test_a_client_on_an_allow_list_passes_the_block_list(self):
        ctx, port = self.serve('dnsbl = ["bl.test"]\ndnswl = ["wl.test"]\n')
        self.assertEqual((yield threads.deferToThread(send, port, "127.0.0.3")), {})
        self.assertEqual(len(read_inbox(ctx, ALICE)), 1)

    @defer.inlineCallbacks
    def test_a_dns_server_that_never_answers_delays_the_greeting_only_to_the_timeout(self):
        silent = self.reactor.listenUDP(0, Silent(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        ctx, port = self.serve(
            'dnsbl = ["bl.test"]\ndnsbl_timeout = "0.5s"\n', silent.getHost().port
        )
        began = time.monotonic()
        self.assertEqual((yield threads.deferToThread(send, port, "127.0.0.2")), {})
        self.assertGreaterEqual(time.monotonic() - began, 0.5)
        [message] = read_inbox(ctx, ALICE)
        self.assertIn(b"Received: from helo.client.test (unknown [127.0.0.2])\n", message)
        # Let the resolver's own query time out too (no UDP port left open).
        yield threads.deferToThread(time.sleep, 0.2)

    @defer.inlineCallbacks
    def test_reject_unknown_client(self):
        ctx, port = self.serve("reject_unknown_client = true\n")
        refused = yield threads.deferToThread(send, port, "127.0.0.4")
        self.assertEqual(
            refused,
            {ALICE: (450, b"4.7.25 Client host rejected: cannot find your hostname, [127.0.0.4]")},
        )
        self.assertEqual((yield threads.deferToThread(send, port, "127.0.0.1")), {})
        self.assertEqual(len(read_inbox(ctx, ALICE)), 1)


class DaemonEndToEnd(unittest.TestCase):
    """The real twistd -n mailsrv, its [dns] nameservers the test's DNS server."""

    @defer.inlineCallbacks
    def test_dns_lists_and_reverse_dns_through_twistd(self):
        from twisted.internet import reactor

        records = [r for r in RECORDS if r[0] != "client.test"]  # 127.0.0.1 unconfirmed
        dns_port = start_dns(reactor, records, origin="")
        self.addCleanup(dns_port.stopListening)
        base = Path(tempfile.mkdtemp(prefix="dnsbl-e2e-"))
        srv = MailServer(
            base,
            extra=(
                f'[dns]\nnameservers = ["127.0.0.1:{dns_port.getHost().port}"]\n'
                '[policy]\ndnsbl = ["bl.test"]\ndnswl = ["wl.test"]\ndnsbl_timeout = "3s"\n'
            ),
        )
        self.addCleanup(srv.close)
        srv.add_user(ALICE)
        # The server's lookups need this reactor to answer: nothing blocks it.
        yield threads.deferToThread(srv.start)
        port = srv.ports["smtp"]
        refused = yield threads.deferToThread(send, port, "127.0.0.2")
        self.assertEqual(
            refused, (554, b"5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test")
        )
        # Only the MX listener asks the lists: submission and POP3 serve the client.
        for name, greeting in [("submission", b"220 "), ("pop3", b"+OK")]:
            line = yield threads.deferToThread(first_line, srv.ports[name], "127.0.0.2")
            self.assertTrue(line.startswith(greeting), (name, line))
        self.assertEqual((yield threads.deferToThread(send, port, "127.0.0.3")), {})
        self.assertEqual((yield threads.deferToThread(send, port, "127.0.0.1")), {})
        inbox = srv.inbox(ALICE).read_bytes()
        self.assertIn(b"Received: from helo.client.test (unknown [127.0.0.3])\n", inbox)
        self.assertIn(b"Received: from helo.client.test (unknown [127.0.0.1])\n", inbox)
        log = (base / "server.log").read_text()
        self.assertEqual(log.count("blocked using bl.test"), 1)
        self.assertIn("refused 127.0.0.2 on smtp: blocked using bl.test (answer 127.0.0.2", log)
