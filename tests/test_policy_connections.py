"""
The connection gate on a task.Clock: limits per client address and per
listener, the sliding minute, allowed and denied networks (IPv4, IPv6,
IPv4-mapped), the rate-limited refusal log, the network files and their
re-reading, the [policy] config keys, and the gate at a listener over
StringTransport (each protocol's refusal, the pregreet test).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv import config as configmod
from mailsrv.policy.connections import (
    WINDOW,
    ConnectionGate,
    ConnectionLimits,
    IConnectionGate,
    Verdict,
    connection_gate,
)
from mailsrv.policy.listener import MAX_REFUSALS_OPEN, GateFactory, refusal_line
from mailsrv.policy.networks import (
    NetworkError,
    NetworkList,
    NetworkWatcher,
    client_address,
    parse_network,
    read_network_file,
)

A = "192.0.2.1"
B = "192.0.2.2"


def gate(clock=None, **limits: int) -> ConnectionGate:
    return ConnectionGate(clock or Clock(), ConnectionLimits(**limits))


def logged(g: Any) -> list[dict]:
    events: list[dict] = []
    g.log = Logger(observer=events.append)
    return events


def test_the_gate_provides_its_interface():
    assert verifyObject(IConnectionGate, gate())


def test_concurrent_connections_per_address_and_listener():
    g = gate(max_connections_per_ip=2, connections_per_ip_per_minute=0)
    assert g.admit("smtp", A) is Verdict.ADMIT
    assert g.admit("smtp", A) is Verdict.ADMIT
    assert g.admit("smtp", A) is Verdict.TOO_MANY
    assert g.admit("smtp", B) is Verdict.ADMIT  # another address
    assert g.admit("imap", A) is Verdict.ADMIT  # another listener
    g.release("smtp", A)
    assert g.admit("smtp", A) is Verdict.ADMIT
    assert g.admit("smtp", A) is Verdict.TOO_MANY


def test_total_connections_of_the_server():
    g = gate(max_connections=3, max_connections_per_ip=0, connections_per_ip_per_minute=0)
    assert [g.admit("smtp", f"192.0.2.{n}") for n in range(4)][-1] is Verdict.SERVER_BUSY
    assert g.admit("pop3", "198.51.100.1") is Verdict.SERVER_BUSY  # all listeners together
    g.release("smtp", "192.0.2.0")
    assert g.admit("pop3", "198.51.100.1") is Verdict.ADMIT
    g.release("smtp", "203.0.113.9")  # never admitted: changes nothing
    assert g.total == 3


def test_connections_per_minute_is_a_sliding_window():
    clock = Clock()
    g = gate(clock, max_connections_per_ip=0, connections_per_ip_per_minute=3)
    for _ in range(3):
        assert g.admit("smtp", A) is Verdict.ADMIT
        g.release("smtp", A)
        clock.advance(10)
    assert g.admit("smtp", A) is Verdict.TOO_FAST  # three in the last 30 s
    clock.advance(WINDOW - 30)  # the first is 60 s old: out of the window
    assert g.admit("smtp", A) is Verdict.ADMIT
    assert g.admit("smtp", A) is Verdict.TOO_FAST
    clock.advance(10)
    assert g.admit("smtp", A) is Verdict.ADMIT


def test_refused_attempts_do_not_extend_the_window():
    clock = Clock()
    g = gate(clock, max_connections_per_ip=0, connections_per_ip_per_minute=1)
    assert g.admit("smtp", A) is Verdict.ADMIT
    for _ in range(100):
        clock.advance(0.5)
        assert g.admit("smtp", A) is Verdict.TOO_FAST
    clock.advance(WINDOW - 50)
    assert g.admit("smtp", A) is Verdict.ADMIT
    assert len(g.recent[("smtp", A)]) == 1


def test_zero_is_no_limit():
    g = gate(max_connections=0, max_connections_per_ip=0, connections_per_ip_per_minute=0)
    assert all(g.admit("smtp", A) is Verdict.ADMIT for _ in range(5000))


def test_denied_and_allowed_networks():
    allow = NetworkList((parse_network("2001:db8::/32"), parse_network("192.0.2.0/28")))
    deny = NetworkList((parse_network("192.0.2.0/24"), parse_network("::1/128")))
    g = ConnectionGate(Clock(), ConnectionLimits(max_connections_per_ip=1), allow, deny)
    assert g.admit("smtp", "192.0.2.200") is Verdict.DENIED
    assert g.admit("smtp", "192.0.2.1") is Verdict.DENIED  # deny wins over allow
    assert g.admit("smtp", "::ffff:192.0.2.9") is Verdict.DENIED  # IPv4-mapped: as IPv4
    assert g.admit("smtp", "::1") is Verdict.DENIED
    assert [g.admit("smtp", "2001:db8::5") for _ in range(3)] == [Verdict.ALLOWED] * 3
    assert g.total == 0  # allowed networks are not counted
    assert g.admit("smtp", "127.0.0.1") is Verdict.ADMIT  # loopback: not trusted by default
    assert g.admit("smtp", "127.0.0.1") is Verdict.TOO_MANY


def test_mapped_and_plain_ipv4_count_as_one_address():
    g = gate(max_connections_per_ip=1)
    assert g.admit("smtp", "::ffff:192.0.2.1") is Verdict.ADMIT
    assert g.admit("smtp", A) is Verdict.TOO_MANY
    g.release("smtp", A)
    assert g.admit("smtp", "::ffff:192.0.2.1") is Verdict.ADMIT


def test_the_addresses_of_one_ipv6_64_count_as_one_client():
    # One end site has a /64 (RFC 6177): new addresses from it get no new allowance.
    g = gate(max_connections_per_ip=2, connections_per_ip_per_minute=3)
    assert g.admit("smtp", "2001:db8:1:2::1") is Verdict.ADMIT
    assert g.admit("smtp", "2001:db8:1:2::2") is Verdict.ADMIT
    assert g.admit("smtp", "2001:db8:1:2:ffff::3") is Verdict.TOO_MANY
    assert g.admit("smtp", "2001:db8:1:3::1") is Verdict.ADMIT  # another /64
    g.release("smtp", "2001:db8:1:2::1")
    assert g.admit("smtp", "2001:db8:1:2::9") is Verdict.ADMIT
    g.release("smtp", "2001:db8:1:2::2")
    assert g.admit("smtp", "2001:db8:1:2::7") is Verdict.TOO_FAST  # 3 new this minute


def test_refusals_are_logged_once_a_minute_per_address_with_a_count():
    clock = Clock()
    g = gate(clock, max_connections_per_ip=1, connections_per_ip_per_minute=0)
    events = logged(g)
    g.admit("smtp", A)
    g.admit("smtp", B)
    for _ in range(1000):
        g.admit("smtp", A)
    g.admit("smtp", B)
    assert [(e["client"], e["more"]) for e in events] == [(A, 0), (B, 0)]
    clock.advance(WINDOW)
    g.admit("smtp", A)
    assert [(e["client"], e["more"]) for e in events][-1] == (A, 999)
    assert events[-1]["reason"] == "too many connections from the address"
    assert events[-1]["listener"] == "smtp"


def test_client_addresses():
    assert str(client_address("::ffff:10.1.2.3")) == "10.1.2.3"
    assert str(client_address("fe80::1%eth0")) == "fe80::1"
    assert client_address("/run/mailsrv.sock") is None


def test_networks_parse_and_refuse_typos():
    assert str(parse_network("10.0.0.0/8")) == "10.0.0.0/8"
    assert str(parse_network("2001:db8::")) == "2001:db8::/128"
    assert str(parse_network("::ffff:10.0.0.0/104")) == "10.0.0.0/8"
    for bad in ["10.0.0.1/8", "10.0.0.0/33", "example.test", "", "2001:db8::/129"]:
        with pytest.raises(NetworkError):
            parse_network(bad)


def test_a_network_file_names_every_bad_line(tmp_path):
    path = tmp_path / "deny"
    path.write_text("# comment\n\n10.0.0.0/8  # trailing\nbad\n2001:db8::/32\n10.0.0.1/8\n")
    with pytest.raises(NetworkError) as e:
        read_network_file(path)
    assert e.value.problems[0].startswith(f"{path}:4: 'bad'")
    assert e.value.problems[1].startswith(f"{path}:6: '10.0.0.1/8'")
    path.write_text("# comment\n10.0.0.0/8  # trailing\n2001:db8::/32\n")
    assert [str(n) for n in read_network_file(path)] == ["10.0.0.0/8", "2001:db8::/32"]


def test_policy_config_defaults_and_keys(tmp_path):
    policy = configmod.parse("", "<t>", tmp_path).policy
    assert (policy.max_connections, policy.max_connections_per_ip) == (1000, 20)
    assert policy.connections_per_ip_per_minute == 60
    assert (policy.deny, policy.allow, policy.deny_file, policy.allow_file) == ((), (), None, None)
    assert policy.pregreet is True and policy.pregreet_wait == 0.0
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "deny").write_text("198.51.100.0/24\n")
    text = (
        "[policy]\n"
        'deny = ["192.0.2.0/24", "2001:db8::/32"]\n'
        'allow = ["10.0.0.0/8"]\n'
        'deny_file = "etc/deny"\n'
        'pregreet_wait = "500ms"\n'
        "pregreet = false\n"
    )
    policy = configmod.parse(text, "<t>", tmp_path).policy
    assert [str(n) for n in policy.deny] == ["192.0.2.0/24", "2001:db8::/32"]
    assert policy.deny_file == tmp_path / "etc" / "deny"  # beside the config file
    assert policy.pregreet_wait == 0.5 and policy.pregreet is False
    g = connection_gate(policy, Clock())
    assert g.admit("smtp", "198.51.100.7") is Verdict.DENIED
    assert g.admit("smtp", "10.9.9.9") is Verdict.ALLOWED


def test_policy_config_errors_name_the_key_and_the_line(tmp_path):
    (tmp_path / "allow").write_text("10.0.0.0/8\n10.0.0.1/8\n")
    text = (
        "[policy]\n"
        'deny = ["192.0.2.1/24"]\n'
        'allow_file = "allow"\n'
        'deny_file = "missing"\n'
        "max_connections = -1\n"
        'pregreet_wait = "soon"\n'
        'pregreet = "yes"\n'
    )
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse(text, "mailsrv.toml", tmp_path)
    errors = "\n".join(e.value.errors)
    assert "policy.deny: '192.0.2.1/24' is not a network" in errors
    assert f"policy.allow_file: {tmp_path / 'allow'}:2: '10.0.0.1/8'" in errors
    assert "policy.deny_file: cannot read" in errors
    assert "policy.max_connections: must be at least 0" in errors
    assert "policy.pregreet_wait: must be seconds" in errors
    assert "policy.pregreet: must be true or false" in errors


class SyncPool:
    """A thread pool that runs its work at once, on the caller's thread."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):  # noqa: N802
        try:
            result = f(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            on_result(False, e)
        else:
            on_result(True, result)


class ThreadClock(Clock):
    def callFromThread(self, f, *args, **kwargs):  # noqa: N802
        f(*args, **kwargs)


def written_earlier(path: Path, text: str) -> None:
    path.write_text(text)
    then = time.time() - 10
    os.utime(path, (then, then))


def test_network_files_are_read_again_when_they_change(tmp_path):
    path = tmp_path / "deny"
    written_earlier(path, "192.0.2.0/24\n")
    deny = NetworkList(path=path)
    deny.load()
    g = ConnectionGate(Clock(), ConnectionLimits(), deny=deny)
    clock = ThreadClock()
    watcher = NetworkWatcher([deny], clock, SyncPool(), interval=5.0)
    events: list[dict] = []
    watcher.log = Logger(observer=events.append)
    watcher.startService()
    assert g.admit("smtp", "192.0.2.1") is Verdict.DENIED
    written_earlier(path, "198.51.100.0/24\n")
    clock.advance(5)
    assert g.admit("smtp", "192.0.2.1") is Verdict.ADMIT
    assert g.admit("smtp", "198.51.100.1") is Verdict.DENIED
    written_earlier(path, "198.51.100.0/24\nnot a network\n")  # a bad line: the old list stays
    clock.advance(5)
    assert g.admit("smtp", "198.51.100.1") is Verdict.DENIED
    assert ":2: 'not a network'" in events[-1]["problem"]
    path.write_text("203.0.113.0/24\n")  # just written: maybe half, read at a later look
    clock.advance(5)
    assert g.admit("smtp", "203.0.113.1") is Verdict.ADMIT
    os.utime(path, (time.time() - 10, time.time() - 10))
    clock.advance(5)
    assert g.admit("smtp", "203.0.113.1") is Verdict.DENIED
    watcher.stopService()
    assert not clock.getDelayedCalls()


# --- the gate at a listener -----------------------------------------------


class Greeter(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(b"220 hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class GreeterFactory(protocol.Factory):
    def __init__(self) -> None:
        self.built: list[Greeter] = []

    def buildProtocol(self, addr):
        p = Greeter()
        self.built.append(p)
        return p


def connect_to(factory: GateFactory, host: str = A) -> tuple[Any, StringTransport]:
    addr = IPv4Address("TCP", host, 40000)
    p = factory.buildProtocol(addr)
    t = StringTransport(peerAddress=addr)
    p.makeConnection(t)
    return p, t


def listener(name: str, g: ConnectionGate, clock: Clock, wait: float = 0.0):
    inner = GreeterFactory()
    return GateFactory(inner, g, name, clock, "mx.example.test", pregreet_wait=wait), inner


@pytest.mark.parametrize(
    "name, line",
    [
        ("smtp", b"421 4.7.0 mx.example.test Too many connections from your address"),
        ("submission", b"421 4.7.0 mx.example.test Too many connections from your address"),
        ("pop3", b"-ERR [SYS/TEMP] Too many connections from your address"),
        ("imaps", b"* BYE [UNAVAILABLE] Too many connections from your address"),
    ],
)
def test_the_excess_is_told_in_its_protocol_and_disconnected(name, line):
    clock = Clock()
    factory, inner = listener(name, gate(clock, max_connections_per_ip=1), clock)
    p, t = connect_to(factory)
    assert t.value() == b"220 hello\r\n"
    _, refused = connect_to(factory)
    assert refused.value().startswith(line) and refused.value().endswith(b"\r\n")
    assert refused.disconnecting
    assert len(inner.built) == 1  # no protocol built for the refused client
    p.connectionLost(None)  # the first one closes: room for one again
    assert inner.built[0].lost
    _, t = connect_to(factory)
    assert t.value() == b"220 hello\r\n"


def test_a_refused_client_that_does_not_read_is_cut_off():
    clock = Clock()
    factory, _ = listener("smtp", gate(clock, max_connections_per_ip=1), clock)
    connect_to(factory)
    refused, t = connect_to(factory)
    aborted: list[bool] = []
    t.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    clock.advance(5)
    assert aborted == [True]
    refused.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_denied_replies():
    host = "mx.example.test"
    assert (
        refusal_line("smtp", Verdict.DENIED, host) == b"554 5.7.1 mx.example.test Access denied\r\n"
    )
    assert refusal_line("pop3", Verdict.DENIED, host) == b"-ERR [SYS/PERM] Access denied\r\n"
    assert refusal_line("imap", Verdict.DENIED, host) == b"* BYE Access denied\r\n"
    assert refusal_line("smtp", Verdict.TOO_FAST, host).startswith(
        b"421 4.7.0 mx.example.test Too many connections per minute"
    )


def test_pregreet_a_client_that_talks_first_is_refused():
    clock = Clock()
    g = gate(clock, max_connections_per_ip=1)
    factory, inner = listener("smtp", g, clock, wait=0.3)
    p, t = connect_to(factory)
    events: list[dict] = []
    p.log = Logger(observer=events.append)
    clock.advance(0.1)
    assert t.value() == b""  # no greeting yet
    p.dataReceived(b"EHLO bot\r\n")
    assert t.value() == b"554 5.5.1 mx.example.test Protocol error: talked before the greeting\r\n"
    assert t.disconnecting
    assert inner.built == []  # the SMTP session never starts
    assert "pregreet" in events[0]["log_format"] and events[0]["client"] == A
    clock.advance(1)
    assert not clock.getDelayedCalls()
    p.connectionLost(None)
    assert g.total == 0


def test_pregreet_a_client_that_waits_is_greeted_after_the_wait():
    clock = Clock()
    g = gate(clock)
    factory, inner = listener("smtp", g, clock, wait=0.3)
    p, t = connect_to(factory)
    clock.advance(0.29)
    assert t.value() == b""
    clock.advance(0.01)
    assert t.value() == b"220 hello\r\n"
    p.dataReceived(b"EHLO client\r\n")
    assert inner.built[0].received == b"EHLO client\r\n"
    p.connectionLost(None)
    assert inner.built[0].lost and g.total == 0


def test_pregreet_a_client_that_leaves_during_the_wait():
    clock = Clock()
    g = gate(clock)
    factory, inner = listener("smtp", g, clock, wait=0.3)
    p, _ = connect_to(factory)
    p.connectionLost(None)
    assert not clock.getDelayedCalls() and inner.built == [] and g.total == 0


@implementer(IHandshakeListener)
class TLSGreeter(Greeter):
    handshakes = 0

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshakes += 1


def test_the_end_of_a_starttls_handshake_reaches_the_protocol():
    # After STARTTLS the TLS layer wraps the forwarder and tells it, not the protocol.
    clock = Clock()
    inner = protocol.Factory.forProtocol(TLSGreeter)
    factory = GateFactory(inner, gate(clock), "imap", clock, "mx.example.test")
    p, _ = connect_to(factory)
    assert IHandshakeListener.providedBy(p)
    p.handshakeCompleted()
    assert p.inner.handshakes == 1


def test_refusals_still_being_told_are_bounded():
    # A flood of clients that never take their refusal (nor finish the TLS
    # handshake it is sent over) must not hold file descriptors: past the
    # bound, a refused connection is closed at once (no protocol).
    clock = Clock()
    factory, _ = listener("imaps", gate(clock, max_connections_per_ip=1), clock)
    connect_to(factory)
    told = [connect_to(factory)[0] for _ in range(MAX_REFUSALS_OPEN)]
    assert factory.buildProtocol(IPv4Address("TCP", A, 40001)) is None
    told[0].connectionLost(None)
    told[0].connectionLost(None)  # once only
    assert factory.buildProtocol(IPv4Address("TCP", A, 40002)) is not None
    assert factory.buildProtocol(IPv4Address("TCP", A, 40003)) is None
    clock.advance(5)  # the rest are cut off, and counted out when they close
    for p in told[1:]:
        p.connectionLost(None)
    assert factory.refusals_open == 1
