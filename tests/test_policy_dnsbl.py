"""
DNS block and allow lists on a task.Clock, answered by a twisted.names
authority in memory: the names asked (IPv4, IPv6, RFC 5782), the entries
(postscreen's syntax), weights and the threshold, a DNSWL that exempts a
client, the cache (TTL within bounds, NXDOMAIN, bounded size), and a list
that does not answer (fails open, logged once). Then the gate at the MX
listener on a StringTransport: the greeting waits for the lookups (in
parallel with the pregreet wait) and a listed client is refused.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.names import dns, error
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv.policy.client import ClientChecks, ClientReport, IClientChecked
from mailsrv.policy.connections import ConnectionGate, ConnectionLimits
from mailsrv.policy.dnsbl import (
    MAX_TTL,
    MIN_TTL,
    NEGATIVE_TTL,
    DNSBLCheck,
    DNSLists,
    EntryError,
    parse_entry,
    query_name,
)
from mailsrv.policy.listener import GateFactory
from mailsrv.policy.rdns import ReverseDNS
from tests.test_outbound_support import MemoryAuthority
from tests.test_policy_connections import Greeter

LISTED = "192.0.2.99"
CLEAN = "192.0.2.1"


class Counting:
    """A resolver that counts the names asked of the one it wraps."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.asked: list[str] = []

    def __getattr__(self, method: str) -> Any:
        def lookup(name: Any, timeout: Any = None) -> defer.Deferred:
            self.asked.append(name if isinstance(name, str) else name.decode())
            return getattr(self.resolver, method)(name, timeout)

        return lookup


class Silent:
    """A resolver that never answers (a DNS server that is down)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getattr__(self, method: str) -> Any:
        def lookup(name: Any, timeout: Any = None) -> defer.Deferred:
            self.asked.append(name)
            return defer.Deferred()

        return lookup


def rev(host: str, zone: str) -> str:
    name = query_name(host, zone)
    assert name is not None
    return name


def a(address: str, ttl: int = 600) -> Any:
    return dns.Record_A(address, ttl=ttl)


def authority(*records: tuple[str, Any]) -> Counting:
    return Counting(MemoryAuthority("", list(records)))


def result(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    return out[0]


def lists(resolver: Any, *entries: str, clock: Clock | None = None, **kw: Any) -> DNSLists:
    return DNSLists([parse_entry(e) for e in entries], resolver, clock or Clock(), 5.0, **kw)


def logged(obj: Any) -> list[dict]:
    events: list[dict] = []
    obj.log = Logger(observer=events.append)
    return events


def test_query_names_reverse_ipv4_octets_and_ipv6_nibbles():
    # RFC 5782 2.1 and 2.4, with its examples.
    assert query_name("192.168.42.23", "bl.example") == "23.42.168.192.bl.example"
    assert query_name("::ffff:192.168.42.23", "bl.example") == "23.42.168.192.bl.example"
    assert query_name("2001:db8:1:2:3:4:567:89ab", "ugly.example") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example"
    )
    assert query_name("local", "bl.example") is None


def test_entries_in_postscreen_syntax():
    e = parse_entry("Zen.Example.")
    assert (e.zone, e.answers, e.weight) == ("zen.example", None, 1)
    assert e.counts("127.0.0.2") and e.counts("127.0.0.11")
    # The lists' error codes and anything outside 127/8 are no listing.
    assert not e.counts("127.255.255.254") and not e.counts("192.0.2.1")
    e = parse_entry("zen.example=127.0.0.[2..3;10..11]*3")
    assert e.weight == 3
    assert [n for n in range(1, 13) if e.counts(f"127.0.0.{n}")] == [2, 3, 10, 11]
    e = parse_entry("wl.example=127.0.[0..255].[1..3]*-2")
    assert e.weight == -2 and e.counts("127.0.15.3") and not e.counts("127.0.15.4")
    assert parse_entry("bl.example=127.0.0.2").counts("127.0.0.2")
    assert not parse_entry("bl.example=127.0.0.2").counts("127.0.0.3")
    for bad in ["", "bad..zone", "bl example", "bl.example=127.0.0", "bl.example*x",
                "bl.example=127.0.0.[3..2]", "bl.example=127.0.0.256", "-bl.example"]:  # fmt: skip
        with pytest.raises(EntryError):
            parse_entry(bad)


def test_listed_and_clean_clients_and_the_answers_that_count():
    dns_ = authority(
        (rev(LISTED, "bl.test"), a("127.0.0.4")),
        (rev(LISTED, "errors.test"), a("127.255.255.254")),
    )
    found = result(lists(dns_, "bl.test", "bl.test=127.0.0.2", "errors.test").listings(LISTED))
    assert [(x.entry.zone, x.entry.answers is None, x.answer) for x in found] == [
        ("bl.test", True, "127.0.0.4")
    ]
    assert dns_.asked.count(rev(LISTED, "bl.test")) == 1  # one lookup for both entries
    assert result(lists(dns_, "bl.test").listings(CLEAN)) == []


def test_weights_add_up_to_the_threshold():
    dns_ = authority(
        (rev(LISTED, "one.test"), a("127.0.0.2")),
        (rev(LISTED, "two.test"), a("127.0.0.2")),
        (rev(CLEAN, "two.test"), a("127.0.0.2")),
    )
    clock = Clock()
    block = lists(dns_, "one.test*1", "two.test*2", clock=clock)
    check = DNSBLCheck(block, lists(dns_, clock=clock), threshold=3)
    verdict = result(check.check(LISTED))
    assert verdict.score == 3 and verdict.blocked
    assert verdict.blocked_by.entry.zone == "two.test"  # the heaviest is named
    verdict = result(check.check(CLEAN))
    assert verdict.score == 2 and not verdict.blocked and verdict.blocked_by is None
    # A negative weight (postscreen's allow entries) subtracts.
    minus = DNSBLCheck(lists(dns_, "one.test*3", "two.test*-1"), lists(dns_), threshold=3)
    assert result(minus.check(LISTED)).score == 2 and not result(minus.check(LISTED)).blocked


def test_a_dnswl_listing_exempts_the_client():
    dns_ = authority(
        (rev(LISTED, "bl.test"), a("127.0.0.2")),
        (rev(LISTED, "wl.test"), a("127.0.15.1")),
    )
    check = DNSBLCheck(lists(dns_, "bl.test"), lists(dns_, "wl.test"))
    verdict = result(check.check(LISTED))
    assert verdict.score == 1 and not verdict.blocked and verdict.blocked_by is None
    assert verdict.allowed_by.entry.zone == "wl.test"
    # The report a session gets: exempt, so no reject_unknown_client either.
    checks = ClientChecks(ReverseDNS(dns_, Clock(), 5.0), check, reject_unknown_client=True)
    report = result(checks.check("smtp", LISTED))
    assert report.exempt == "dnswl wl.test" and report.refusal is None
    assert report.rcpt_refusal is None and report.name is None


def test_answers_are_cached_for_their_ttl_within_bounds():
    clock = Clock()
    dns_ = authority(
        (rev("192.0.2.1", "bl.test"), a("127.0.0.2", ttl=120)),
        (rev("192.0.2.2", "bl.test"), a("127.0.0.2", ttl=5)),
        (rev("192.0.2.3", "bl.test"), a("127.0.0.2", ttl=86400)),
    )
    block = lists(dns_, "bl.test", clock=clock)

    def asked(host: str) -> int:
        assert result(block.listings(host))  # listed, from the cache or not
        return dns_.asked.count(rev(host, "bl.test"))

    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert asked(host) == 1
    clock.advance(MIN_TTL - 1)
    assert asked("192.0.2.2") == 1  # 5 s is raised to the minimum
    clock.advance(1)
    assert asked("192.0.2.2") == 2
    clock.advance(119 - MIN_TTL)
    assert asked("192.0.2.1") == 1  # the record's TTL
    clock.advance(1)
    assert asked("192.0.2.1") == 2
    clock.advance(MAX_TTL - 120 - 1)
    assert asked("192.0.2.3") == 1  # a day is lowered to the maximum
    clock.advance(1)
    assert asked("192.0.2.3") == 2


def test_nxdomain_is_cached_for_the_negative_ttl():
    clock = Clock()
    dns_ = authority()  # NXDOMAIN for everything, without an SOA
    block = lists(dns_, "bl.test", clock=clock)
    assert result(block.listings(CLEAN)) == []
    clock.advance(NEGATIVE_TTL - 1)
    assert result(block.listings(CLEAN)) == []
    assert len(dns_.asked) == 1
    clock.advance(1)
    result(block.listings(CLEAN))
    assert len(dns_.asked) == 2


def test_the_negative_ttl_comes_from_the_soa_of_an_nxdomain():
    # RFC 2308 5: the lesser of the SOA record's TTL and its MINIMUM.
    soa = dns.Record_SOA(mname=b"ns.bl.test", rname=b"root.bl.test", minimum=120, ttl=900)
    message = dns.Message(rCode=dns.ENAME)
    message.authority = [dns.RRHeader(b"bl.test", dns.SOA, dns.IN, 900, soa)]
    asked: list[str] = []

    class NXDomain:
        def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred:
            asked.append(name)
            return defer.fail(error.DNSNameError(message))

    clock = Clock()
    block = lists(NXDomain(), "bl.test", clock=clock)
    result(block.listings(CLEAN))
    clock.advance(119)
    result(block.listings(CLEAN))
    assert len(asked) == 1
    clock.advance(1)
    result(block.listings(CLEAN))
    assert len(asked) == 2


def test_the_cache_is_bounded():
    clock = Clock()
    dns_ = authority()
    block = lists(dns_, "bl.test", clock=clock, cache_size=3)
    hosts = [f"192.0.2.{n}" for n in range(1, 6)]
    for host in hosts:
        result(block.listings(host))
    assert len(block.cache) == 3
    result(block.listings(hosts[-1]))  # kept: not asked again
    result(block.listings(hosts[0]))  # the oldest went: asked again
    assert [dns_.asked.count(rev(h, "bl.test")) for h in hosts] == [2, 1, 1, 1, 1]


def test_lookups_of_one_address_at_once_share_one_query():
    clock = Clock()
    silent = Silent()
    block = lists(silent, "bl.test", clock=clock)
    first, second = block.listings(LISTED), block.listings(LISTED)
    assert len(silent.asked) == 1
    clock.advance(5)
    assert result(first) == [] and result(second) == []


def test_a_list_that_does_not_answer_fails_open_and_is_logged_once():
    clock = Clock()
    silent = Silent()
    block = lists(silent, "bl.test", clock=clock)
    events = logged(block)
    check = DNSBLCheck(block, lists(silent, clock=clock))
    verdicts = [check.check(LISTED), check.check(CLEAN)]
    clock.advance(4.9)
    assert not any(d.called for d in verdicts)
    clock.advance(0.1)
    assert [result(d).blocked for d in verdicts] == [False, False]
    # Not cached: the next client asks again; still failing: not logged again.
    third = check.check("192.0.2.3")
    clock.advance(5)
    assert not result(third).blocked
    assert len(silent.asked) == 3
    failures = [e for e in events if "failed" in e["log_format"]]
    assert len(failures) == 1 and failures[0]["zone"] == "bl.test"
    assert "no answer in time" in failures[0]["cause"]


def test_a_list_that_answers_again_is_logged_once_more():
    clock = Clock()

    class Flaky:
        down = True

        def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred:
            if self.down:
                return defer.fail(error.DNSServerError("SERVFAIL"))
            return defer.fail(error.DNSNameError("NXDOMAIN"))

    resolver = Flaky()
    block = lists(resolver, "bl.test", clock=clock)
    events = logged(block)
    result(block.listings("192.0.2.1"))
    result(block.listings("192.0.2.2"))
    resolver.down = False
    result(block.listings("192.0.2.3"))
    assert ["failed" in e["log_format"] for e in events] == [True, False]
    assert "answers again" in events[1]["log_format"]


# The gate at the MX listener: the greeting waits for the lookups.


@implementer(IClientChecked)
class CheckedGreeter(Greeter):
    """A session that keeps the report of the checks at connect."""

    client: ClientReport | None = None

    def client_checked(self, report: ClientReport) -> None:
        assert self.transport is None  # before connectionMade
        self.client = report


class GreeterFactory:
    def __init__(self) -> None:
        self.built: list[CheckedGreeter] = []

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: Any) -> CheckedGreeter:
        p = CheckedGreeter()
        self.built.append(p)
        return p


def test_the_smtp_session_is_told_the_report():
    from mailsrv.smtp.server import SMTPServer
    from tests.test_smtp_helpers import make_context

    assert verifyObject(IClientChecked, SMTPServer(make_context()))
    assert verifyObject(IClientChecked, CheckedGreeter())


def mx_listener(clock: Clock, resolver: Any, wait: float = 0.0, timeout: float = 1.0):
    block = DNSLists([parse_entry("bl.test")], resolver, clock, timeout)
    checks = ClientChecks(
        ReverseDNS(resolver, clock, timeout), DNSBLCheck(block, DNSLists([], resolver, clock, 1))
    )
    gate = ConnectionGate(clock, ConnectionLimits(), allow=None)
    inner = GreeterFactory()
    factory = GateFactory(
        inner, gate, "smtp", clock, "mx.example.test", pregreet_wait=wait, client_checks=checks
    )
    return factory, inner, gate, block


def connect(factory: GateFactory, host: str) -> tuple[Any, StringTransport]:
    addr = IPv4Address("TCP", host, 40000)
    p = factory.buildProtocol(addr)
    t = StringTransport(peerAddress=addr)
    p.makeConnection(t)
    return p, t


def test_a_listed_client_is_refused_in_the_greeting():
    clock = Clock()
    dns_ = authority((rev(LISTED, "bl.test"), a("127.0.0.2")))
    factory, inner, gate, block = mx_listener(clock, dns_, wait=0.3)
    events: list[dict] = []
    factory.client_checks.log = Logger(observer=events.append)  # type: ignore[union-attr]
    p, t = connect(factory, LISTED)
    assert t.value() == b""  # the pregreet wait still runs
    clock.advance(0.3)
    assert t.value() == (
        b"554 5.7.1 Service unavailable; client [192.0.2.99] blocked using bl.test\r\n"
    )
    assert t.disconnecting and inner.built == []
    assert len(events) == 1
    assert (events[0]["zone"], events[0]["answer"], events[0]["client"]) == (
        "bl.test",
        "127.0.0.2",
        LISTED,
    )
    p.connectionLost(None)
    assert gate.total == 0


def test_the_greeting_waits_for_the_lookups_and_the_pregreet_wait():
    clock = Clock()
    silent = Silent()
    factory, inner, gate, _ = mx_listener(clock, silent, wait=0.3, timeout=1.0)
    p, t = connect(factory, CLEAN)
    # Started at once, in parallel with the wait: the PTR and the list.
    assert sorted(silent.asked) == sorted(
        [rev(CLEAN, "bl.test"), "1.2.0.192.in-addr.arpa"]
    )  # fmt: skip
    clock.advance(0.3)
    assert t.value() == b""  # the lookups are not over
    clock.advance(0.7)
    assert t.value() == b"220 hello\r\n"  # no answer in time: served, unknown
    assert inner.built[0].client.name is None  # type: ignore[union-attr]


def test_a_quick_answer_still_waits_for_the_pregreet_test():
    clock = Clock()
    factory, inner, _, _ = mx_listener(clock, authority(), wait=0.3)
    p, t = connect(factory, CLEAN)
    clock.advance(0.1)
    p.dataReceived(b"EHLO bot\r\n")
    assert t.value().startswith(b"554 5.5.1 ")
    assert inner.built == []


def test_without_a_pregreet_test_early_commands_reach_the_session():
    clock = Clock()
    silent = Silent()
    factory, inner, _, _ = mx_listener(clock, silent, wait=0.0, timeout=1.0)
    p, t = connect(factory, CLEAN)
    p.dataReceived(b"EHLO early\r\n")
    assert t.value() == b"" and inner.built == []
    clock.advance(1.0)
    assert t.value() == b"220 hello\r\n"
    assert inner.built[0].received == b"EHLO early\r\n"


def test_an_allowed_network_skips_the_lists():
    clock = Clock()
    dns_ = authority((rev(LISTED, "bl.test"), a("127.0.0.2")))
    factory, inner, gate, _ = mx_listener(clock, dns_)
    from mailsrv.policy.networks import NetworkList, parse_network

    gate.allow = NetworkList((parse_network(LISTED),))
    p, t = connect(factory, LISTED)
    assert t.value() == b"220 hello\r\n"
    report = inner.built[0].client
    assert report is not None
    assert report.exempt == "allow" and report.blocked_by is None
    assert rev(LISTED, "bl.test") not in dns_.asked


def test_dns_lookups_at_connect_in_flight_are_bounded():
    # Each DNS query holds a UDP socket until it is answered or times out:
    # clients from ever new addresses (an IPv6 network) whose DNS never
    # answers, connecting and leaving at once, must not pile them up until
    # the server runs out of file descriptors. Past the bound, a client
    # passes unchecked at once, as when the lookups time out.
    from twisted.internet.address import IPv6Address

    from mailsrv.config import parse
    from mailsrv.policy.client import MAX_LOOKUPS, client_checks

    clock = Clock()
    silent = Silent()
    config = parse('[policy]\ndnsbl = ["bl.test"]\n')
    checks = client_checks(config, clock, silent)
    assert checks is not None
    assert checks.rdns is not None
    events = logged(checks.rdns.resolver)  # the lookups of the reverse DNS and the lists
    gate = ConnectionGate(clock, ConnectionLimits(), allow=None)
    inner = GreeterFactory()
    factory = GateFactory(inner, gate, "smtp", clock, "mx.example.test", client_checks=checks)
    for i in range(3 * MAX_LOOKUPS):
        addr = IPv6Address("TCP", f"2001:db8:{i:x}::25", 40000)
        p = factory.buildProtocol(addr)
        p.makeConnection(StringTransport(peerAddress=addr))
        p.connectionLost(None)
    assert len(silent.asked) <= MAX_LOOKUPS
    p, t = connect(factory, CLEAN)
    assert t.value() == b"220 hello\r\n"  # not held up
    assert inner.built[-1].client.name is None  # type: ignore[union-attr]
    busy = [e for e in events if "under way" in e["log_format"]]
    assert len(busy) == 1  # once for the whole flood
    # The lookups time out: clients are looked up again.
    clock.advance(config.policy.dnsbl_timeout)
    asked = len(silent.asked)
    p, t = connect(factory, LISTED)
    assert len(silent.asked) == asked + 2 and t.value() == b""
