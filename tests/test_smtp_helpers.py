"""Shared fixtures for the SMTP tests: a server context on the in-memory store."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from mailsrv import config as configmod
from mailsrv import tls
from mailsrv.auth.checkers import PasswordChecker
from mailsrv.auth.realm import MailRealm
from mailsrv.auth.throttle import LoginThrottle
from mailsrv.interfaces import IOutboundQueue, IPasswordDatabase
from mailsrv.service import ServerContext
from mailsrv.smtp.server import smtp_factory
from mailsrv.store.memory import MemoryMailStore

PASSWORD = "correct horse"
USERS = ("alice@example.test", "bob@example.test", "postmaster@example.test")

_CERT_DIR: Path | None = None


def cert_paths() -> tuple[Path, Path]:
    """A self-signed certificate for localhost, made once per test run."""
    global _CERT_DIR
    if _CERT_DIR is None:
        _CERT_DIR = Path(tempfile.mkdtemp(prefix="smtp-test-tls-"))
        tls.generate_self_signed("localhost", _CERT_DIR / "cert.pem", _CERT_DIR / "key.pem")
    return _CERT_DIR / "cert.pem", _CERT_DIR / "key.pem"


@implementer(IPasswordDatabase)
class Passwords:
    """A password database in a dict."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def lookup(self, address: str) -> str | None:
        return address if address in self.users else None

    def has_user(self, address: str) -> bool:
        return address in self.users

    def verify(self, address: str, password: str | bytes) -> defer.Deferred:
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        return defer.succeed(self.users.get(address) == password)


@implementer(IOutboundQueue)
class FakeQueue:
    """Records what was queued; C{fail} makes enqueue fail."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, list[str], bytes]] = []
        self.smtputf8: list[bool] = []  # each queued message's SMTPUTF8 flag
        self.fail = False

    def enqueue(self, sender, recipients, source, *, smtputf8=False, queue_id=None):
        if self.fail:
            return defer.fail(OSError("disk full"))
        with source.open() as f:
            self.queued.append((sender, list(recipients), f.read()))
        self.smtputf8.append(smtputf8)
        return defer.succeed(f"Q{len(self.queued)}")


def make_config(data_dir: Path, **limits: Any) -> configmod.Config:
    cert, key = cert_paths()
    lines = [
        "[server]",
        'hostname = "mx.example.test"',
        'domains = ["example.test", "other.test"]',
        f'data_dir = "{data_dir}"',
        "[tls]",
        f'certificate = "{cert}"',
        f'key = "{key}"',
        "[auth]",
        "failure_delay = 1.0",
        "max_failures = 3",
        "[limits]",
    ]
    for k, v in limits.items():
        lines.append(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"')
    return configmod.parse("\n".join(lines) + "\n", "<test>", data_dir)


def make_context(
    data_dir: Path | None = None,
    reactor: Any = None,
    queue: Any = "fake",
    store: Any = None,
    threadpool: Any = None,
    **limits: Any,
) -> ServerContext:
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="smtp-test-"))
    if reactor is None:
        reactor = MemoryReactorClock()
    config = make_config(data_dir, **limits)
    passwords = Passwords({u: PASSWORD for u in USERS})
    realm = MailRealm()
    portal = Portal(realm, [PasswordChecker(passwords, reactor, config.auth.failure_delay)])
    return ServerContext(
        config=config,
        reactor=reactor,
        threadpool=threadpool,
        store=store if store is not None else MemoryMailStore(clock=reactor.seconds),
        passwords=passwords,
        portal=portal,
        tls=tls.server_options(config),
        throttle=LoginThrottle(reactor, config.auth.max_failures, config.auth.failure_window),
        queue=FakeQueue() if queue == "fake" else queue,
    )


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    tls_started = None

    def startTLS(self, contextFactory, normal=True):
        self.tls_started = contextFactory


class Session:
    """One server session on a StringTransport, driven line by line."""

    def __init__(
        self,
        ctx: ServerContext,
        submission: bool = False,
        implicit_tls: bool = False,
        peer: str = "192.0.2.7",
        starttls: bool = False,
    ) -> None:
        self.ctx = ctx
        self.factory = smtp_factory(ctx, submission=submission, implicit_tls=implicit_tls)
        self.proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        cls = TLSStringTransport if starttls else StringTransport
        self.transport = cls(peerAddress=IPv4Address("TCP", peer, 40000))
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> list[str]:
        """The reply lines sent since the last call."""
        data = self.transport.value().decode("utf-8", "replace")
        self.transport.clear()
        return [line for line in data.split("\r\n") if line]

    def send(self, data: str | bytes) -> list[str]:
        if isinstance(data, str):
            data = data.encode()
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: str | bytes) -> list[str]:
        if isinstance(line, str):
            line = line.encode()
        return self.send(line + b"\r\n")

    def codes(self, data: str | bytes) -> list[str]:
        """Send; return the code and enhanced code of each final reply line."""
        return [" ".join(line.split(" ", 2)[:2]) for line in self.send(data) if line[3:4] == " "]

    def close(self) -> None:
        self.proto.connectionLost(None)


def read_inbox(ctx: ServerContext, user: str) -> list[bytes]:
    """Every message in C{user}'s INBOX, LF line ends."""
    out: list[bytes] = []
    d = ctx.store.open_folder(user, "INBOX")
    folder = _result(d)
    for info in folder.messages():
        with folder.open_message(info.uid) as f:
            out.append(f.read().replace(b"\r\n", b"\n"))
    folder.close()
    return out


def _result(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]
