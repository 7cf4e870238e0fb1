"""Support for the POP3 tests (no tests here): a context on the in-memory store, a fake pool."""

from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace

from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from twisted.cred.portal import Portal
from twisted.internet import address, interfaces, task
from twisted.internet.testing import StringTransport
from zope.interface import alsoProvides, implementer

from mailsrv import config as config_mod
from mailsrv.auth.checkers import PasswordChecker
from mailsrv.auth.passwd import PasswordFile
from mailsrv.auth.realm import MailRealm
from mailsrv.auth.throttle import LoginThrottle
from mailsrv.pop3 import MaildropLocks, pop3_factory
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore

ALICE = "alice@example.test"
PASSWORD = "s3cret pass"
LOOPBACK = address.IPv4Address("TCP", "127.0.0.1", 40000)
REMOTE = address.IPv4Address("TCP", "192.0.2.1", 1234)


class SyncPool:
    """A thread pool that runs the work at once, on the calling thread."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold: list | None = None  # when a list, work waits here until run_held()

    def callInThreadWithCallback(self, on_result, f, *a, **kw):
        self.calls += 1

        def run():
            try:
                r = f(*a, **kw)
            except BaseException:
                from twisted.python.failure import Failure

                on_result(False, Failure())
            else:
                on_result(True, r)

        if self.hold is not None:
            self.hold.append(run)
        else:
            run()

    def run_held(self) -> None:
        held, self.hold = self.hold or [], []
        for run in held:
            run()


class Clock(task.Clock):
    def callFromThread(self, f, *a, **kw):
        f(*a, **kw)


@implementer(interfaces.ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can pretend to start TLS."""

    tls_started_with = None

    def startTLS(self, ctx, normal=True):
        self.tls_started_with = ctx
        alsoProvides(self, interfaces.ISSLTransport)


def make_ctx(tmp: Path, cleartext: str = "loopback", **limits) -> SimpleNamespace:
    extra = "".join(f"{k} = {v}\n" for k, v in limits.items())
    cfg = config_mod.parse(
        f'[server]\ndomains = ["example.test"]\n[auth]\ncleartext = "{cleartext}"\n'
        f"failure_delay = 2.0\nmax_failures = 3\n[limits]\n{extra}",
        "<test>",
        tmp,
    )
    clock = Clock()
    pool = SyncPool()
    store = MemoryMailStore(clock=lambda: 1_700_000_000.0)
    passwords = PasswordFile(
        tmp / "passwd", clock, pool, hasher=PasswordHasher.from_parameters(CHEAPEST)
    )
    passwords.add_user(ALICE, PASSWORD)
    passwords.add_user("bob@example.test", "bobpw")
    portal = Portal(MailRealm(), [PasswordChecker(passwords, clock, cfg.auth.failure_delay)])
    return SimpleNamespace(
        config=cfg,
        reactor=clock,
        threadpool=pool,
        store=store,
        passwords=passwords,
        portal=portal,
        tls=object(),
        throttle=LoginThrottle(clock, cfg.auth.max_failures, cfg.auth.failure_window),
        pop3_locks=MaildropLocks(),
    )


def deliver(ctx, data: bytes, user: str = ALICE) -> None:
    ctx.store.deliver(user, BytesSource(data), "sender@remote.test")


class Session:
    """A POP3 server protocol on a StringTransport, driven line by line."""

    def __init__(self, ctx, peer=LOOPBACK, implicit_tls: bool = False, factory=None) -> None:
        self.ctx = ctx
        self.factory = factory or pop3_factory(ctx, implicit_tls=implicit_tls)
        self.proto = self.factory.buildProtocol(peer)
        self.transport = TLSStringTransport(peerAddress=peer)
        if implicit_tls:
            alsoProvides(self.transport, interfaces.ISSLTransport)
        self.proto.makeConnection(self.transport)

    def take(self) -> bytes:
        v = self.transport.value()
        self.transport.clear()
        return v

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: str | bytes) -> bytes:
        if isinstance(line, str):
            line = line.encode()
        return self.send(line + b"\r\n")

    def login(self, user: str = ALICE, password: str = PASSWORD) -> bytes:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        return self.cmd(f"PASS {password}")

    def close(self) -> None:
        if not self.transport.disconnecting:
            self.transport.loseConnection()
        self.proto.connectionLost(None)


def plain(authz: str, user: str, password: str) -> str:
    return base64.b64encode(f"{authz}\0{user}\0{password}".encode()).decode()
