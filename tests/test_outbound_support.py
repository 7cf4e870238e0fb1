"""
Real servers on loopback for the outbound tests: a twisted.names DNS server
answering from an in-memory zone, and Twisted ESMTP receivers with scripted
behaviour (accept, 4xx then accept, 5xx, drop mid-DATA), all on one port
number at different loopback addresses (the relayer has one [relay] port).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import ISSLTransport
from twisted.mail import imap4, smtp
from twisted.names import authority, dns, server
from zope.interface import implementer


class MemoryAuthority(authority.FileAuthority):
    """An authority for the zone C{origin} with records given as (name, record) pairs."""

    def __init__(self, origin: str, records: list[tuple[str, Any]]) -> None:
        self._origin = origin
        self._given = records
        super().__init__(origin)

    def loadFile(self, filename: str) -> None:
        origin = self._origin.encode()
        self.soa = (
            origin,
            dns.Record_SOA(
                mname=b"ns." + origin,
                rname=b"root." + origin,
                serial=1,
                refresh=60,
                retry=60,
                expire=60,
                minimum=1,
                ttl=1,
            ),
        )
        self.records = {origin: [self.soa[1]]}
        for name, rec in self._given:
            self.records.setdefault(name.encode().lower(), []).append(rec)


def start_dns(reactor: Any, records: list[tuple[str, Any]], origin: str = "test") -> Any:
    """Listen on UDP 127.0.0.1 (any port); return the port (stopListening to clean up)."""
    factory = server.DNSServerFactory(authorities=[MemoryAuthority(origin, records)])
    factory.noisy = False
    udp = dns.DNSDatagramProtocol(controller=factory)
    udp.noisy = False
    return reactor.listenUDP(0, udp, interface="127.0.0.1")


HOSTILE_REPLY = "5.1.1 no such user\r\n2026-01-01T00:00:00 [forged#info] \x1b[2Jhello"


@dataclass
class Received:
    """One message a receiver accepted."""

    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    helo: bytes
    auth: str | None = None


@dataclass
class Receiver:
    """What one receiver saw; C{behaviour} decides how it answers."""

    behaviour: str  # accept | tempfail | reject | hostile | drop | slow
    messages: list[Received] = field(default_factory=list)
    rcpt_counts: Counter = field(default_factory=Counter)
    connections: int = 0
    drops: int = 0
    active: int = 0
    max_active: int = 0
    reactor: Any = None  # for "slow"

    def delivered(self, rcpt: str) -> int:
        return sum(m.recipients.count(rcpt) for m in self.messages)


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, proto: _ReceiverProtocol, sender: str, rcpts: list[str]) -> None:
        self.proto = proto
        self.sender = sender
        self.rcpts = rcpts
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        r = self.proto.receiver
        if r.behaviour == "drop" and r.drops == 0 and len(self.lines) == 2:
            r.drops += 1
            self.dropped = True
            self.proto.transport.abortConnection()

    dropped = False

    def eomReceived(self) -> defer.Deferred:
        if self.dropped:  # the rest of the buffer is still parsed: this one never counts
            return defer.succeed(b"")
        self.proto.deliveries.append(self)
        r = self.proto.receiver
        if r.behaviour == "slow":
            return task.deferLater(r.reactor, 0.1, lambda: b"queued")
        return defer.succeed(b"queued")

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, proto: _ReceiverProtocol) -> None:
        self.proto = proto

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: from test"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        self.proto.mail_from = str(origin)
        self.proto.rcpts = []
        return origin

    def validateTo(self, user: Any) -> Any:
        addr = str(user.dest)
        r = self.proto.receiver
        r.rcpt_counts[addr] += 1
        if r.behaviour == "hostile":
            # A reply whose text would forge log lines and drive a terminal:
            # Twisted sends it as a multi-line reply (the CR ends a line).
            raise smtp.SMTPServerError(550, HOSTILE_REPLY)
        if r.behaviour == "reject" or addr.startswith("nosuchuser@"):
            raise smtp.SMTPServerError(550, f"5.1.1 <{addr}>: Recipient address rejected")
        if r.behaviour == "tempfail" and r.rcpt_counts[addr] == 1:
            raise smtp.SMTPServerError(451, "4.3.0 Greylisted, try again later")
        self.proto.rcpts.append(addr)
        return lambda: self.proto.message_for(addr)


class _ReceiverProtocol(smtp.ESMTP):
    receiver: Receiver

    def connectionMade(self) -> None:
        super().connectionMade()
        r = self.receiver
        r.connections += 1
        r.active += 1
        r.max_active = max(r.max_active, r.active)
        self.deliveries: list[_Message] = []
        self._current: _Message | None = None

    def connectionLost(self, reason: Any) -> None:
        self.receiver.active -= 1
        super().connectionLost(reason)

    def message_for(self, addr: str) -> _Message:
        # One IMessage per recipient is Twisted's contract; keep one record per transaction.
        if self._current is None or self._current.rcpts is not self.rcpts:
            self._current = _Message(self, self.mail_from, self.rcpts)
            return self._current
        return _Noop()

    def do_DATA(self, rest: bytes) -> None:
        self._current = None
        super().do_DATA(rest)

    def _messageHandled(self, resultList: Any) -> None:
        for m in self.deliveries:
            self.receiver.messages.append(
                Received(
                    m.sender,
                    list(m.rcpts),
                    b"\n".join(m.lines) + b"\n",
                    ISSLTransport.providedBy(self.transport),
                    self._helo[0] if self._helo else b"",
                    getattr(self, "auth_user", None),
                )
            )
        self.deliveries = []
        super()._messageHandled(resultList)


@implementer(smtp.IMessage)
class _Noop:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred:
        return defer.succeed(b"")

    def connectionLost(self) -> None:
        pass


class ReceiverFactory(protocol.ServerFactory):
    noisy = False

    def __init__(
        self, receiver: Receiver, tls: Any = None, auth: tuple[str, str] | None = None
    ) -> None:
        self.receiver = receiver
        self.tls = tls
        self.auth = auth

    def buildProtocol(self, addr: Any) -> _ReceiverProtocol:
        chal = None
        if self.auth is not None:
            chal = {b"LOGIN": imap4.LOGINCredentials, b"PLAIN": imap4.PLAINCredentials}
        p = _ReceiverProtocol(chal=chal, contextFactory=self.tls)
        p.factory = self
        p.receiver = self.receiver
        p.host = b"receiver.test"
        p.delivery = _Delivery(p)
        p.timeout = 30
        if self.auth is not None:
            user, password = self.auth
            checker = InMemoryUsernamePasswordDatabaseDontUse(**{user: password.encode()})
            p.portal = Portal(_Realm(p), [checker])
        return p


@implementer(IRealm)
class _Realm:
    def __init__(self, proto: _ReceiverProtocol) -> None:
        self.proto = proto

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        self.proto.auth_user = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        return smtp.IMessageDelivery, self.proto.delivery, lambda: None


def listen_all(reactor: Any, plan: dict[str, tuple[Any, ...]]) -> tuple[int, list[Any]]:
    """
    Listen with each receiver on its address, all on one port number.
    C{plan} maps address -> (receiver, tls options or None[, (user, password)]).
    Returns (port, ports).
    """
    for _ in range(20):
        ports: list[Any] = []
        try:
            number = 0
            for address, (receiver, tls, *auth) in plan.items():
                receiver.reactor = reactor
                factory = ReceiverFactory(receiver, tls, auth[0] if auth else None)
                p = reactor.listenTCP(number, factory, interface=address)
                ports.append(p)
                number = p.getHost().port
            return number, ports
        except error.CannotListenError:
            for p in ports:
                p.stopListening()
    raise RuntimeError("could not find a free port on every loopback address")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def daemon_relay_config(dns_port: Any, relay_port: int) -> str:
    """Config lines for a daemon that relays through the test's DNS server and receivers."""
    return (
        "[dns]\n"
        f'nameservers = ["127.0.0.1:{dns_port.getHost().port}"]\n'
        "[relay]\n"
        f"port = {relay_port}\n"
        'retry_min = "1h"\n'
        'retry_max = "1h"\n'
    )


def temp_dir(case: Any) -> Any:
    """A fresh folder outside the work tree, removed when the test ends."""
    path = Path(tempfile.mkdtemp(prefix="mailsrv-outbound-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path
