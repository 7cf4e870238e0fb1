"""
Reverse DNS on a task.Clock, answered by a twisted.names authority in
memory: a forward-confirmed name, a PTR name whose A records do not agree,
no PTR, IPv6, the bounded number of names, a DNS server that never answers.
Then the SMTP session behind the gate: the name in C{Received:} and
C{[policy] reject_unknown_client} at RCPT.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.names import dns

from mailsrv.policy.client import ClientChecks
from mailsrv.policy.connections import ConnectionGate, ConnectionLimits
from mailsrv.policy.listener import GateFactory
from mailsrv.policy.rdns import ReverseDNS
from mailsrv.smtp.server import smtp_factory
from tests.test_outbound_support import MemoryAuthority
from tests.test_policy_dnsbl import Counting, Silent, result
from tests.test_smtp_helpers import make_context, read_inbox

HOST = "192.0.2.7"
PTR = "7.2.0.192.in-addr.arpa"


def authority(*records: tuple[str, Any]) -> Counting:
    return Counting(MemoryAuthority("", list(records)))


def name_of(resolver: Any, host: str = HOST, **kw: Any) -> Any:
    return result(ReverseDNS(resolver, Clock(), 5.0, **kw).name(host))


def test_a_forward_confirmed_name():
    dns_ = authority(
        (PTR, dns.Record_PTR("Other.Test")),
        (PTR, dns.Record_PTR("mail.client.test.")),
        ("other.test", dns.Record_A("192.0.2.8")),
        ("mail.client.test", dns.Record_A("192.0.2.9")),
        ("mail.client.test", dns.Record_A(HOST)),
    )
    assert name_of(dns_) == "mail.client.test"


def test_a_name_whose_addresses_do_not_agree_is_unknown():
    dns_ = authority(
        (PTR, dns.Record_PTR("forged.bank.test")),
        ("forged.bank.test", dns.Record_A("198.51.100.1")),
    )
    assert name_of(dns_) is None


def test_no_ptr_is_unknown():
    assert name_of(authority()) is None
    assert name_of(authority(), "local") is None  # no IP address


def test_ipv6_names_and_aaaa_records():
    host = "2001:db8::25"
    ptr = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    dns_ = authority(
        (ptr, dns.Record_PTR("mx6.client.test")),
        ("mx6.client.test", dns.Record_AAAA("2001:db8::25")),
    )
    assert name_of(dns_, host) == "mx6.client.test"
    assert dns_.asked == [ptr, "mx6.client.test"]


def test_only_the_first_names_are_looked_up():
    records: list[tuple[str, Any]] = [(PTR, dns.Record_PTR(f"n{i}.test")) for i in range(8)]
    records.append(("n6.test", dns.Record_A(HOST)))  # the seventh name would agree
    dns_ = authority(*records)
    assert name_of(dns_, max_names=5) is None
    assert dns_.asked == [PTR] + [f"n{i}.test" for i in range(5)]
    assert name_of(authority(*records), max_names=7) == "n6.test"


def test_no_answer_in_time_is_unknown():
    clock = Clock()
    d = ReverseDNS(Silent(), clock, 2.0).name(HOST)
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    assert result(d) is None


def test_a_ptr_answer_then_silence_is_unknown_in_time():
    class PtrOnly:
        def lookupPointer(self, name: str, timeout: Any = None) -> defer.Deferred:
            rr = dns.RRHeader(name, dns.PTR, dns.IN, 60, dns.Record_PTR("slow.test"))
            return defer.succeed(([rr], [], []))

        def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred:
            return defer.Deferred()

    clock = Clock()
    d = ReverseDNS(PtrOnly(), clock, 2.0).name(HOST)
    clock.advance(2.0)
    assert result(d) is None


@pytest.mark.parametrize(
    "ptr",
    [
        "mail\r\nX-Forged: yes.client.test",  # CR LF: a header or log line of its own
        "mail client.test",
        "mail(x).client.test",
        "-mail.client.test",
        "x" * 64 + ".client.test",  # RFC 1035 2.3.4: 63 octets a label
        "192.0.2.7",  # RFC 1123 2.1: all numeric, it would pass for an address
        "localhost",
    ],
)
def test_a_ptr_name_that_is_no_host_name_is_unknown(ptr):
    # Whoever owns the address's reverse zone writes any bytes as its PTR
    # name, and can make them resolve back to the address: a forward match
    # does not make them a host name (RFC 1123 2.1; Postfix's valid_hostname).
    dns_ = authority((PTR, dns.Record_PTR(ptr.encode())), (ptr, dns.Record_A(HOST)))
    assert name_of(dns_) is None


def test_a_ptr_name_with_octets_outside_ascii_does_not_hide_the_others():
    dns_ = authority(
        (PTR, dns.Record_PTR(b"caf\xc3\xa9.client.test")),
        (PTR, dns.Record_PTR("mail.client.test")),
        ("mail.client.test", dns.Record_A(HOST)),
    )
    assert name_of(dns_) == "mail.client.test"


# The SMTP session behind the gate, on a StringTransport.


class Client:
    """An SMTP client of the MX listener with the checks at connect."""

    def __init__(self, resolver: Any, reject_unknown: bool = False, listener: str = "smtp"):
        self.ctx = make_context()
        clock = self.ctx.reactor
        checks = ClientChecks(ReverseDNS(resolver, clock, 5.0), None, reject_unknown)
        factory = GateFactory(
            smtp_factory(self.ctx, submission=listener != "smtp"),
            ConnectionGate(clock, ConnectionLimits()),
            listener,
            clock,
            "mx.example.test",
            client_checks=checks,
        )
        addr = IPv4Address("TCP", HOST, 40000)
        self.proto = factory.buildProtocol(addr)
        self.transport = StringTransport(peerAddress=addr)
        self.proto.makeConnection(self.transport)
        self.session: Any = self.proto.inner  # type: ignore[attr-defined]

    def cmd(self, line: str) -> list[str]:
        self.transport.clear()
        self.proto.dataReceived(line.encode() + b"\r\n")
        return self.transport.value().decode().splitlines()


CONFIRMED = (
    (PTR, dns.Record_PTR("mail.client.test")),
    ("mail.client.test", dns.Record_A(HOST)),
)


def test_the_received_field_names_the_confirmed_client():
    c = Client(authority(*CONFIRMED))
    assert c.session.client_name == "mail.client.test"
    for line in ["EHLO helo.test", "MAIL FROM:<a@client.test>", "RCPT TO:<alice@example.test>"]:
        assert c.cmd(line)[-1].startswith("250")
    c.cmd("DATA")
    assert c.cmd("Subject: hi\r\n\r\nbody\r\n.")[-1].startswith("250")
    [message] = read_inbox(c.ctx, "alice@example.test")
    assert message.startswith(
        b"Return-Path: <a@client.test>\nReceived: from helo.test (mail.client.test [192.0.2.7])\n"
    )


def test_the_received_field_says_unknown_without_a_confirmed_name():
    c = Client(authority((PTR, dns.Record_PTR("liar.test"))))
    assert c.session.client_name is None
    for line in ["HELO helo.test", "MAIL FROM:<a@client.test>", "RCPT TO:<alice@example.test>"]:
        assert c.cmd(line)[-1].startswith("250")
    c.cmd("DATA")
    c.cmd("Subject: hi\r\n\r\nbody\r\n.")
    [message] = read_inbox(c.ctx, "alice@example.test")
    assert b"Received: from helo.test (unknown [192.0.2.7])\n" in message


def test_reject_unknown_client_at_rcpt():
    c = Client(authority(), reject_unknown=True)
    c.cmd("EHLO helo.test")
    assert c.cmd("MAIL FROM:<a@client.test>")[-1].startswith("250")
    # RFC 7372 3.3: 4.7.25; 450 as Postfix's unknown_client_reject_code.
    assert c.cmd("RCPT TO:<alice@example.test>") == [
        "450 4.7.25 Client host rejected: cannot find your hostname, [192.0.2.7]"
    ]
    # A confirmed client passes; submission is not held to it.
    c = Client(authority(*CONFIRMED), reject_unknown=True)
    c.cmd("EHLO helo.test")
    c.cmd("MAIL FROM:<a@client.test>")
    assert c.cmd("RCPT TO:<alice@example.test>")[-1].startswith("250 ")
    c = Client(authority(), reject_unknown=True, listener="submission")
    assert c.session.client.rcpt_refusal is None and c.session.client_name is None


def test_reverse_dns_off_asks_nothing_and_names_nobody():
    from mailsrv.config import ConfigError, parse
    from mailsrv.policy.client import client_checks

    resolver = authority(*CONFIRMED)
    off = parse("[policy]\nreverse_dns = false\n")
    assert off.policy.reverse_dns is False and parse("").policy.reverse_dns is True
    # Nothing to look up at all: the greeting never waits on DNS.
    assert client_checks(off, Clock(), resolver) is None
    # With the DNS lists on, they are asked, the PTR is not.
    lists = parse('[policy]\nreverse_dns = false\ndnsbl = ["bl.test"]\n')
    checks = client_checks(lists, Clock(), resolver)
    assert checks is not None
    report = result(checks.check("smtp", HOST))
    assert report.name is None
    assert resolver.asked == ["7.2.0.192.bl.test"]
    # reject_unknown_client would refuse everyone without the lookup.
    try:
        parse("[policy]\nreverse_dns = false\nreject_unknown_client = true\n")
    except ConfigError as e:
        assert "policy.reject_unknown_client: needs reverse_dns = true" in str(e)
    else:
        raise AssertionError("accepted reject_unknown_client without reverse_dns")


def test_commands_sent_before_the_greeting_and_after_starttls_are_dropped():
    # Without a pregreet test (submission) what a client sends while its
    # greeting waits for the lookups is kept for the session; what follows
    # STARTTLS in it was sent in the clear and must not be run as if it came
    # over TLS (RFC 3207 4.2, CVE-2011-0411).
    from tests.test_smtp_helpers import TLSStringTransport

    ctx = make_context()
    clock = ctx.reactor
    checks = ClientChecks(ReverseDNS(Silent(), clock, 1.0), None)
    factory = GateFactory(
        smtp_factory(ctx, submission=True),
        ConnectionGate(clock, ConnectionLimits()),
        "submission",
        clock,
        "mx.example.test",
        client_checks=checks,
    )
    addr = IPv4Address("TCP", HOST, 40000)
    proto = factory.buildProtocol(addr)
    transport = TLSStringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<forged@c.test>\r\n")
    assert transport.value() == b""
    clock.advance(1.0)
    codes = [line[:4] for line in transport.value().decode().splitlines()]
    assert codes[0] == "220 " and codes[-1] == "220 "  # greeting ... ready to start TLS
    assert "250 " in codes and len([c for c in codes if c == "250 "]) == 1  # EHLO only
    assert transport.tls_started is not None
    transport.clear()
    proto.dataReceived(b"MAIL FROM:<a@c.test>\r\n")
    assert transport.value().startswith(b"503")  # a new EHLO is needed: nothing was kept


def test_checks_at_connect_that_break_let_the_client_in_unchecked():
    class Broken(ClientChecks):
        def check(self, listener: str, host: str, allowed: bool = False) -> defer.Deferred:
            return defer.fail(RuntimeError("a bug in a check"))

    ctx = make_context()
    clock = ctx.reactor
    factory = GateFactory(
        smtp_factory(ctx),
        ConnectionGate(clock, ConnectionLimits()),
        "smtp",
        clock,
        "mx.example.test",
        client_checks=Broken(ReverseDNS(authority(), clock, 5.0)),
    )
    addr = IPv4Address("TCP", HOST, 40000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    with capturedLogs() as events:
        proto.makeConnection(transport)
    # Greeted, not left waiting with no timer; the failure is logged.
    assert transport.value().startswith(b"220 ")
    assert proto.inner.client_name is None  # type: ignore[attr-defined]
    [failed] = [e for e in events if "log_failure" in e]
    assert failed["log_failure"].check(RuntimeError)
