"""MX selection rules (RFC 5321 5.1, RFC 7505) against a fake resolver."""

from __future__ import annotations

import random
import socket

import pytest
from twisted.internet import defer
from twisted.names import dns, error

from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.mx import Hop, MXResolver, listening_addresses, order_mx


class FakeResolver:
    """Records by (name, type); a name absent from C{names} is NXDOMAIN."""

    def __init__(self, records, servfail=()):
        self.records = records
        self.names = {n for n, _ in records}
        self.servfail = set(servfail)

    def _lookup(self, name, qtype, payload_of):
        if name in self.servfail:
            return defer.fail(error.DNSServerError(name))
        if name not in self.names:
            return defer.fail(error.DNSNameError(name))
        answers = [
            dns.RRHeader(name, qtype, payload=payload_of(v))
            for v in self.records.get((name, qtype), [])
        ]
        return defer.succeed((answers, [], []))

    def lookupMailExchange(self, name):
        return self._lookup(name, dns.MX, lambda v: dns.Record_MX(v[0], v[1].encode()))

    def lookupAddress(self, name):
        return self._lookup(name, dns.A, lambda v: dns.Record_A(v))

    def lookupIPV6Address(self, name):
        return self._lookup(name, dns.AAAA, lambda v: dns.Record_AAAA(v))


RECORDS = {
    ("multi.test", dns.MX): [(20, "backup.multi.test"), (10, "a.multi.test"), (10, "b.multi.test")],
    ("a.multi.test", dns.A): ["192.0.2.1"],
    ("b.multi.test", dns.A): ["192.0.2.2"],
    ("b.multi.test", dns.AAAA): ["2001:db8::2"],
    ("backup.multi.test", dns.A): ["192.0.2.3"],
    ("noмх.test", dns.A): [],
    ("plain.test", dns.A): ["192.0.2.9"],
    ("plain6.test", dns.AAAA): ["2001:db8::9"],
    ("null.test", dns.MX): [(0, "")],
    ("self.test", dns.MX): [(10, "me.self.test"), (20, "other.self.test")],
    ("me.self.test", dns.A): ["127.0.0.1"],
    ("other.self.test", dns.A): ["192.0.2.7"],
    ("selfbest.test", dns.MX): [(5, "me.self.test"), (20, "other.self.test")],
    ("backupme.test", dns.MX): [(5, "other.self.test"), (10, "me.self.test"), (20, "a.multi.test")],
    ("dangling.test", dns.MX): [(10, "nowhere.test")],
    ("flaky.test", dns.MX): [(10, "a.multi.test")],
    ("empty.test", dns.A): [],
}
OWN = {("127.0.0.1", 25)}


def resolve(domain, records=RECORDS, rng=None, servfail=(), own=OWN):
    fake = FakeResolver(records, servfail)
    d = MXResolver(fake, 25, own, rng or random.Random(1)).resolve(domain)
    out = []
    d.addBoth(out.append)
    (result,) = out
    if isinstance(result, Exception) or hasattr(result, "raiseException"):
        result.raiseException()
    return result


def test_mx_by_preference_with_ipv6_first_per_host():
    hops = resolve("multi.test")
    assert [h.preference for h in hops] == [10, 10, 10, 20]
    assert hops[-1] == Hop("backup.multi.test", "192.0.2.3", 25, 20)
    b = [h.address for h in hops if h.host == "b.multi.test"]
    assert b == ["2001:db8::2", "192.0.2.2"]


def test_random_order_among_equal_preferences():
    firsts = {resolve("multi.test", rng=random.Random(seed))[0].host for seed in range(40)}
    assert firsts == {"a.multi.test", "b.multi.test"}


def test_order_mx_keeps_preference_order():
    recs = [(30, "c"), (10, "a"), (20, "b"), (10, "a2")]
    for seed in range(10):
        assert [p for p, _ in order_mx(recs, random.Random(seed))] == [10, 10, 20, 30]


def test_no_mx_falls_back_to_a_and_aaaa():
    assert resolve("plain.test") == [Hop("plain.test", "192.0.2.9", 25)]
    assert resolve("plain6.test") == [Hop("plain6.test", "2001:db8::9", 25)]


def test_null_mx_is_permanent():
    with pytest.raises(DeliveryError) as e:
        resolve("null.test")
    assert e.value.permanent and e.value.status == "5.1.10"


def test_nxdomain_is_permanent_servfail_temporary():
    with pytest.raises(DeliveryError) as e:
        resolve("nonexistent.test")
    assert e.value.permanent and e.value.status == "5.1.2"
    with pytest.raises(DeliveryError) as e:
        resolve("flaky.test", servfail={"flaky.test"})
    assert not e.value.permanent
    with pytest.raises(DeliveryError) as e:
        resolve("dangling.test")
    assert not e.value.permanent
    with pytest.raises(DeliveryError) as e:
        resolve("empty.test")
    assert e.value.permanent


def test_self_as_mx_drops_it_and_everything_less_preferred():
    # RFC 5321 5.1: we are MX 10 of backupme.test: only the MX 5 is left.
    assert [h.host for h in resolve("backupme.test")] == ["other.self.test"]
    with pytest.raises(DeliveryError) as e:
        resolve("selfbest.test")
    assert e.value.permanent and e.value.status == "5.4.6"
    # Another port on the same address is not us.
    assert len(resolve("selfbest.test", own={("127.0.0.1", 2525)})) == 2
    # A wildcard listener catches every loopback address.
    with pytest.raises(DeliveryError):
        resolve("selfbest.test", own={("0.0.0.0", 25)})


def test_address_literal():
    assert resolve("[192.0.2.5]") == [Hop("[192.0.2.5]", "192.0.2.5", 25)]
    assert resolve("[IPv6:2001:db8::5]")[0].address == "2001:db8::5"
    with pytest.raises(DeliveryError):
        resolve("[127.0.0.1]")


def test_listening_addresses():
    assert listening_addresses(
        ["tcp:2525:interface=127.0.0.2", "tcp:port=25", r"tcp6:25:interface=\:\:1", "unix:/tmp/x"]
    ) == {("127.0.0.2", 2525), ("0.0.0.0", 25), ("::1", 25)}


def test_ipv6_text_form():
    assert socket.inet_pton(socket.AF_INET6, resolve("plain6.test")[0].address)


def test_a_u_label_domain_is_looked_up_as_its_a_labels():
    # RFC 5890 2.3.2.1: the DNS holds A-labels only.
    records = {
        ("xn--bcher-kva.example", dns.MX): [(10, "mx.xn--bcher-kva.example")],
        ("mx.xn--bcher-kva.example", dns.A): ["192.0.2.5"],
    }
    hops = resolve("Bücher.example", records=records)
    assert hops == [Hop("mx.xn--bcher-kva.example", "192.0.2.5", 25, 10)]
    with pytest.raises(DeliveryError) as e:
        resolve("bü_cher.example", records=records)
    assert e.value.permanent and e.value.status == "5.1.2"
