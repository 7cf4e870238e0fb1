"""
Support for the login tests (no tests here): the server's real parts built
by L{mailsrv.service.build_context} (password file, checker, throttle, mbox
store, disk thread pool) listening for SMTP, submission, POP3 and IMAP on
127.0.0.1, a scripted client that speaks one step at a time, and
L{RealServerCase}, the set-up the login tests share.
"""

from __future__ import annotations

import base64
import re
import shutil
import tempfile
from pathlib import Path

from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from mailsrv import config as configmod
from mailsrv.auth.passwd import PasswordFile
from mailsrv.service import ThreadPoolService, _factories, build_context

from .test_smtp_helpers import cert_paths

PASSWORD = "correct horse"
ALICE = "alice@example.test"
BOB = "bob@example.test"
LISTENERS = ("smtp", "submission", "pop3", "imap")

# What ends a server's answer to one step.
SMTP_REPLY = re.compile(rb"(?:^|\n)\d{3} [^\n]*\n")
POP3_REPLY = re.compile(rb"(?:^|\n)[+-](?:OK|ERR)?[^\n]*\n|(?:^|\n)\+ [^\n]*\n")
IMAP_GREETING = re.compile(rb"^\* OK[^\n]*\n")


def imap_tagged(tag: bytes) -> re.Pattern[bytes]:
    """The end of the answer to the IMAP command tagged C{tag}."""
    return re.compile(rb"(?:^|\n)" + re.escape(tag) + rb" [^\n]*\n")


def imap_continued(tag: bytes) -> re.Pattern[bytes]:
    """The end of the answer to C{tag}'s command or to one of its lines: C{+ } or tagged."""
    return re.compile(rb"(?:^|\n)(?:\+ |" + re.escape(tag) + rb" )[^\n]*\n")


# What a listener greets with, for L{converse}.
GREETINGS = {
    "smtp": SMTP_REPLY,
    "submission": SMTP_REPLY,
    "pop3": POP3_REPLY,
    "imap": IMAP_GREETING,
}


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def plain(user: str | bytes, password: str | bytes = PASSWORD, authzid: str | bytes = b"") -> bytes:
    """A SASL PLAIN message (RFC 4616), base64-encoded."""
    return base64.b64encode(_bytes(authzid) + b"\0" + _bytes(user) + b"\0" + _bytes(password))


class RealServer:
    """
    The server's own context and protocol factories on the given reactor,
    data in a temporary folder (removed by C{stop()}); C{stop()} when done.
    """

    def __init__(self, reactor, base: Path | None = None, **auth: object) -> None:
        self.reactor = reactor
        self._own_base = base is None
        self.base = Path(tempfile.mkdtemp(prefix="auth-test-")) if base is None else base
        cert, key = cert_paths()
        settings = {"failure_delay": 0.05, "max_failures": 5, **auth}
        lines = [
            "[server]",
            'hostname = "mx.example.test"',
            'domains = ["example.test"]',
            f'data_dir = "{self.base / "data"}"',
            # No lookups through the machine's own resolver (loopback only).
            "[policy]",
            "authentication_checks = false",
            "reverse_dns = false",
            "[tls]",
            f'certificate = "{cert}"',
            f'key = "{key}"',
            "[auth]",
            *(
                f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
                for k, v in settings.items()
            ),
        ]
        self.config = configmod.parse("\n".join(lines) + "\n", "<test>", self.base)
        self.top = service.MultiService()
        self.ctx = build_context(self.config, reactor)
        ThreadPoolService(self.ctx.threadpool, self.ctx.store).setServiceParent(self.top)
        self.top.startService()
        factories = _factories(self.ctx)
        self.ports = {}
        self._listening = []
        for name in LISTENERS:
            port = reactor.listenTCP(0, factories[name], interface="127.0.0.1")
            self._listening.append(port)
            self.ports[name] = port.getHost().port

    def add_user(self, address: str, password: str = PASSWORD) -> str:
        """Add a user as the admin command does (a cheap hash: the tests check many)."""
        admin = PasswordFile(
            self.config.auth.passwd_file, hasher=PasswordHasher.from_parameters(CHEAPEST)
        )
        return admin.add_user(address, password)

    def inbox(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.config.mail_dir / domain.lower() / local / "INBOX"

    @defer.inlineCallbacks
    def stop(self):
        for port in self._listening:
            yield port.stopListening()
        yield self.top.stopService()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)


class Dialog(protocol.Protocol):
    """
    Waits for the greeting, then sends each step's bytes and waits until what
    came back since matches the step's pattern; closes after the last step.
    C{done} fires with everything received, and the answer to each step.
    """

    def __init__(self, greeting: re.Pattern[bytes], steps: list[tuple[bytes, re.Pattern[bytes]]]):
        self.steps = list(steps)
        self.pattern: re.Pattern[bytes] | None = greeting
        self.received = b""
        self.current = b""
        self.answers: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.current += data
        while self.pattern is not None and self.pattern.search(self.current):
            self.answers.append(self.current)
            self.current = b""
            if not self.steps:
                self.pattern = None
                self.transport.loseConnection()
                return
            line, self.pattern = self.steps.pop(0)
            self.transport.write(line)

    def connectionLost(self, reason=None) -> None:
        if self.current:
            self.answers.append(self.current)
        self.done.callback(self.answers[1:])


def converse(reactor, port: int, greeting, steps) -> defer.Deferred:
    """Connect to C{port}, run the L{Dialog}; fire with the answer to each step."""
    dialog = Dialog(greeting, steps)
    d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), dialog)
    d.addCallback(lambda _: dialog.done)
    return d


class RealServerCase:
    """
    Mixin for a trial TestCase: a L{RealServer} on the global reactor for
    each test, with C{users} added, and C{self.converse(listener, steps)}.
    """

    timeout = 30
    users: tuple[str, ...] = (ALICE,)

    def auth_settings(self) -> dict:
        """The [auth] settings of the server (a subclass may override)."""
        return {}

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.server = RealServer(reactor, **self.auth_settings())
        self.addCleanup(self.server.stop)  # type: ignore[attr-defined]
        for user in self.users:
            self.server.add_user(user)

    def count_checks(self) -> list[str]:
        """From now on, the address of each password check the server makes, in order."""
        checked: list[str] = []
        passwords = self.server.ctx.passwords
        verify = passwords.verify

        def counting_verify(address, password):
            checked.append(address)
            return verify(address, password)

        passwords.verify = counting_verify
        return checked

    def converse(self, listener: str, steps) -> defer.Deferred:
        """Run C{steps} on a new connection to C{listener}; fire with each step's answer."""
        return converse(self.reactor, self.server.ports[listener], GREETINGS[listener], steps)
