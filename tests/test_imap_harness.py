"""Shared fixtures for the IMAP tests: a server on a StringTransport over the memory store."""

from __future__ import annotations

from pathlib import Path

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailsrv.auth.realm import MailRealm
from mailsrv.auth.throttle import LoginThrottle
from mailsrv.config import parse
from mailsrv.imap.server import IMAPServerFactory, account_factory
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore

USER = "alice@example.test"
PASSWORD = b"secret"


def make_config(tmp: Path, extra: str = ""):
    return parse(
        f'[server]\ndata_dir = "{tmp}"\n[imap]\nmax_literal_size = 100000\n{extra}',
        "<test>",
        tmp,
    )


def sync_run(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


class Harness:
    """One memory store and portal; any number of client connections."""

    def __init__(self, tmp: Path, config_extra: str = "", store=None, run=sync_run) -> None:
        self.tmp = tmp
        self.config = make_config(tmp, config_extra)
        self.clock = task.Clock()
        self.store = store if store is not None else MemoryMailStore(clock=lambda: 1_700_000_000.0)
        realm = MailRealm()
        checker = InMemoryUsernamePasswordDatabaseDontUse(
            **{USER: PASSWORD, "bob@example.test": b"pw"}
        )
        self.portal = Portal(realm, [checker])
        realm.register(
            __import__("twisted.mail.imap4", fromlist=["IAccount"]).IAccount,
            account_factory(self.config, self.store, run),
        )
        self.throttle = LoginThrottle(self.clock, 3, 600)
        self.factory = IMAPServerFactory(
            config=self.config,
            store=self.store,
            portal=self.portal,
            reactor=self.clock,
            run=run,
            throttle=self.throttle,
            cooperate=lambda: defer.succeed(None),
        )

    def connect(self, host: str = "127.0.0.1") -> Client:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        proto.makeConnection(transport)
        return Client(self, proto, transport)

    def deliver(self, data: bytes, user: str = USER, folder: str = "INBOX") -> None:
        d = self.store.deliver(user, BytesSource(data), "sender@example.test", folder)
        assert d.called

    def settle(self) -> None:
        for _ in range(20):
            self.clock.advance(0)


class Client:
    def __init__(self, harness: Harness, proto, transport: StringTransport) -> None:
        self.h = harness
        self.proto = proto
        self.transport = transport
        self.greeting = self.read()

    def read(self) -> bytes:
        self.h.settle()
        out = self.transport.value()
        self.transport.clear()
        return out

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.read()

    def cmd(self, line: bytes | str) -> bytes:
        if isinstance(line, str):
            line = line.encode()
        return self.send(line + b"\r\n")

    def login(self) -> bytes:
        out = self.cmd(b'a LOGIN alice@example.test "secret"')
        assert b"a OK" in out, out
        return out

    def select(self, name: str = "INBOX") -> bytes:
        out = self.cmd(f"s SELECT {name}")
        assert b"s OK" in out, out
        return out
