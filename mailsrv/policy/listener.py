"""
The connection gate at a listener: a factory that asks the gate about each
new connection before the protocol's factory builds anything. A refused
client gets one last line in its protocol's words and is disconnected; an
admitted one reaches the protocol through a thin forwarder that gives the
connection back to the gate when it closes. The protocol keeps the real
transport (STARTTLS and the TLS checks see the socket itself).

On the MX listener the forwarder also runs postscreen's pregreet test: the
greeting waits a short moment, and a client that talks before it is refused.
On SMTP listeners the checks of the client at connect (reverse DNS, DNS
lists: L{mailsrv.policy.client}) start when the connection is accepted, in
parallel with that wait; the greeting waits for both, and a client the DNS
lists block is refused instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.python import failure
from zope.interface import implementer

from mailsrv.logsafe import SafeLogger
from mailsrv.policy.client import ClientChecks, ClientReport, IClientChecked
from mailsrv.policy.connections import IConnectionGate, Verdict

# Seconds a refused client has to take its last line (and, on an implicit
# TLS listener, to finish the handshake it is sent over) before it is cut off.
REFUSAL_TIMEOUT = 5.0
# Refused connections of one listener still being told; past this many (a
# flood, or clients that never finish the TLS handshake their refusal is sent
# over) a refused connection is closed at once, without a word, so that
# refusals never hold many file descriptors.
MAX_REFUSALS_OPEN = 32
# What a client without a pregreet test may send while its greeting waits
# for the checks at connect, kept for the session; past it, it is dropped.
MAX_EARLY = 65536

# SMTP: 421 service not available, closing the channel (RFC 5321 3.8, 4.2.2)
# with 4.7.0 other security or policy status (RFC 3463 3.8); 554 as the
# greeting refuses the session (RFC 5321 3.1, 4.2.2) with 5.7.1 delivery not
# authorized (RFC 3463 3.8). POP3: -ERR with the SYS/TEMP and SYS/PERM
# response codes (RFC 3206 4, 5). IMAP: a BYE greeting closes the connection
# (RFC 3501 7.1.5), with UNAVAILABLE (RFC 5530 3) for a passing state.
_TEMPORARY = {
    "smtp": "421 4.7.0 {host} {reason}, try again later\r\n",
    "pop3": "-ERR [SYS/TEMP] {reason}, try again later\r\n",
    "imap": "* BYE [UNAVAILABLE] {reason}, try again later\r\n",
}
_DENIED = {
    "smtp": "554 5.7.1 {host} Access denied\r\n",
    "pop3": "-ERR [SYS/PERM] Access denied\r\n",
    "imap": "* BYE Access denied\r\n",
}
_TEXTS = {
    Verdict.SERVER_BUSY: "Too many connections",
    Verdict.TOO_MANY: "Too many connections from your address",
    Verdict.TOO_FAST: "Too many connections per minute from your address",
}
# An early talker (postscreen's pregreet test): 554 refuses the session
# (RFC 5321 3.1) and 5.5.1 invalid command (RFC 3463 3.5) names the breach of
# RFC 5321 4.3.1 (the client waits for the greeting). Postscreen's "drop"
# action sends 5.5.1 "Protocol error" too (with 521, RFC 7504).
PREGREET = "554 5.5.1 {host} Protocol error: talked before the greeting\r\n"

PROTOCOLS = {
    "smtp": "smtp",
    "submission": "smtp",
    "submissions": "smtp",
    "pop3": "pop3",
    "pop3s": "pop3",
    "imap": "imap",
    "imaps": "imap",
}


def refusal_line(kind: str, verdict: Verdict, host: str) -> bytes:
    """The last line a refused client of protocol C{kind} sees."""
    if verdict is Verdict.DENIED:
        text = _DENIED[kind]
    else:
        text = _TEMPORARY[kind]
    return text.format(host=host, reason=_TEXTS.get(verdict, "Refused")).encode()


class Refusal(protocol.Protocol):
    """Writes one line and disconnects; cut off if the client does not take it."""

    transport: Any

    def __init__(self, line: bytes, clock: Any, on_lost: Any = None) -> None:
        self.line = line
        self.clock = clock
        self.on_lost = on_lost
        self._cutoff: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.line)
        self.transport.loseConnection()
        self._cutoff = self.clock.callLater(REFUSAL_TIMEOUT, self._cut_off)

    def _cut_off(self) -> None:
        self._cutoff = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def dataReceived(self, data: bytes) -> None:
        pass  # whatever the client says now is not read

    def connectionLost(self, reason: failure.Failure = protocol.connectionDone) -> None:
        if self._cutoff is not None and self._cutoff.active():
            self._cutoff.cancel()
        self._cutoff = None
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()


class _RefusalFactory(protocol.Factory):
    def __init__(self, line: bytes, clock: Any, on_lost: Any) -> None:
        self.line = line
        self.clock = clock
        self.on_lost = on_lost

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        p = Refusal(self.line, self.clock, self.on_lost)
        p.factory = self
        return p


@implementer(IHandshakeListener)
class Gated(protocol.Protocol):
    """
    Forwards an admitted connection to the protocol built for it, and gives
    it back to the gate when it closes. With a pregreet wait, the protocol is
    built only once the wait is over; a client that sends anything before is
    refused. After STARTTLS the TLS layer wraps this forwarder, so the end of
    the handshake is passed on too.
    """

    log = SafeLogger()
    transport: Any

    def __init__(
        self, gate: GateFactory, addr: Any, host: str, counted: bool, allowed: bool = False
    ) -> None:
        self.gate = gate
        self.settings = gate.settings  # the listener's settings when it connected
        self.addr = addr
        self.host = host
        self.counted = counted
        self.allowed = allowed  # in an allowed network
        self.inner: protocol.Protocol | None = None
        self._wait: IDelayedCall | None = None
        self._refused = False
        self._lost = False
        self._waited = False  # the pregreet wait is over
        self._checking = False  # the checks at connect are under way
        self._report: ClientReport | None = None
        self._early = b""  # sent before the greeting, without a pregreet test

    def logPrefix(self) -> str:
        if self.inner is not None:
            return self.inner.logPrefix()
        return self.__class__.__name__

    def connectionMade(self) -> None:
        wait = self.settings.pregreet_wait
        if wait > 0:
            self._wait = self.gate.clock.callLater(wait, self._pregreet_over)
        checks = self.settings.client_checks
        if checks is not None:
            self._checking = True
            d = checks.check(self.gate.listener, self.host, self.allowed)
            d.addCallbacks(self._checked, self._check_failed)
        if wait <= 0:
            self._pregreet_over()

    def _pregreet_over(self) -> None:
        self._wait = None
        self._waited = True
        self._greet()

    def _checked(self, report: ClientReport) -> None:
        self._checking = False
        self._report = report
        self._greet()

    def _check_failed(self, reason: failure.Failure) -> None:
        """A check that broke lets the client pass unchecked, as a DNS timeout does."""
        self.log.failure("checks at connect of {client} failed", reason, client=self.host)
        self._checked(ClientReport(self.host, exempt="allow" if self.allowed else None))

    def _greet(self) -> None:
        """Once both the pregreet wait and the checks are over: greet, or refuse."""
        if not self._waited or self._checking or self._refused or self._lost:
            return
        report = self._report
        if report is not None and report.refusal is not None:
            self._refused = True  # logged by the checks, with the list's answer
            self.transport.write(report.refusal)
            self.transport.loseConnection()
            return
        inner = self.settings.factory.buildProtocol(self.addr)
        if inner is None:
            self.transport.loseConnection()
            return
        self.inner = inner
        if report is not None:
            session: Any = inner  # under an implicit TLS listener's wrapper
            while session is not None and not IClientChecked.providedBy(session):
                session = getattr(session, "wrappedProtocol", None)
            if session is not None:
                session.client_checked(report)
        inner.makeConnection(self.transport)
        early, self._early = self._early, b""
        if early and not self._lost:
            inner.dataReceived(early)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self._refused:
            return
        if self.settings.pregreet_wait <= 0:
            # No pregreet test: kept for the session the checks still hold up.
            self._early += data
            if len(self._early) > MAX_EARLY:
                self._refused = True
                self.transport.loseConnection()
            return
        # RFC 5321 4.3.1: the client waits for the greeting before it talks.
        self._refused = True
        if self._wait is not None:
            self._wait.cancel()
            self._wait = None
        self.log.info(
            "refused {client} on {listener}: pregreet (talked before the greeting)",
            client=self.host,
            listener=self.gate.listener,
        )
        self.transport.write(PREGREET.format(host=self.settings.hostname).encode())
        self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
        """L{IHandshakeListener}: passed on to a protocol that listens for it."""
        if IHandshakeListener.providedBy(self.inner):
            self.inner.handshakeCompleted()  # type: ignore[union-attr]

    def connectionLost(self, reason: failure.Failure = protocol.connectionDone) -> None:
        self._lost = True
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        self._wait = None
        if self.counted:
            self.counted = False
            self.gate.gate.release(self.gate.listener, self.host)
        for observer in self.gate.observers:
            observer.closed(self.gate.listener)
        if self.inner is not None:
            self.inner.connectionLost(reason)


@dataclass(frozen=True)
class ListenerSettings:
    """
    What a listener's new connections are served with: C{factory} builds
    the protocol of an admitted connection (under the TLS wrapper of an
    implicit TLS listener); C{hostname} names the server in refusals.
    Replaced in one step by L{GateFactory.use} (a reload); a connection keeps
    the settings it was accepted under.
    """

    factory: Any
    hostname: str
    pregreet_wait: float = 0.0
    client_checks: ClientChecks | None = None


class GateFactory(protocol.Factory):
    """
    Wraps the factory of one listener: C{wrapped} builds the protocol of an
    admitted connection; a refused one gets L{refusal_line} (over TLS when
    C{refusal_tls} wraps the refusal, for an implicit TLS listener).
    C{client_checks}, on an SMTP listener, looks the client up at connect.
    The listening port keeps this factory for as long as it listens; a
    reload gives it new L{ListenerSettings} (L{use}).
    """

    def __init__(
        self,
        wrapped: Any,
        gate: IConnectionGate,
        listener: str,
        clock: Any,
        hostname: str,
        pregreet_wait: float = 0.0,
        refusal_tls: Any = None,
        client_checks: ClientChecks | None = None,
    ) -> None:
        self.settings = ListenerSettings(wrapped, hostname, pregreet_wait, client_checks)
        self.gate = gate
        self.listener = listener
        self.kind = PROTOCOLS.get(listener, "smtp")
        self.clock = clock
        self.refusal_tls = refusal_tls  # callable: refusal factory -> TLS factory
        self.refusals_open = 0
        self._ports = 0  # listening ports started with this factory
        # Told of each connection: opened(listener), closed(listener),
        # refused(listener, reason) (the metrics, mailsrv.metrics).
        self.observers: list[Any] = []

    @property
    def wrappedFactory(self) -> Any:  # noqa: N802 (Twisted's name for a wrapper's inner factory)
        return self.settings.factory

    @property
    def hostname(self) -> str:
        return self.settings.hostname

    @property
    def pregreet_wait(self) -> float:
        return self.settings.pregreet_wait

    @property
    def client_checks(self) -> ClientChecks | None:
        return self.settings.client_checks

    def use(self, settings: ListenerSettings) -> ListenerSettings:
        """
        Serve new connections with C{settings} from now on; the sessions
        already open keep theirs. Returns the settings replaced.
        """
        old, self.settings = self.settings, settings
        for _ in range(self._ports):
            settings.factory.doStart()
            old.factory.doStop()
        return old

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        """The listener's name, in the port's "smtp starting on 25" line."""
        return self.listener

    def doStart(self) -> None:
        self._ports += 1
        self.settings.factory.doStart()

    def doStop(self) -> None:
        self._ports -= 1
        self.settings.factory.doStop()

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        host = str(getattr(addr, "host", "") or "local")
        verdict = self.gate.admit(self.listener, host)
        if verdict.admitted:
            allowed = verdict is Verdict.ALLOWED
            p = Gated(self, addr, host, counted=verdict is Verdict.ADMIT, allowed=allowed)
            p.factory = self
            for observer in self.observers:
                observer.opened(self.listener)
            return p
        for observer in self.observers:
            observer.refused(self.listener, verdict.name.lower())
        if self.refusals_open >= MAX_REFUSALS_OPEN:
            return None  # closed at once by the listening port
        self.refusals_open += 1
        refusals: Any = _RefusalFactory(
            refusal_line(self.kind, verdict, self.settings.hostname),
            self.clock,
            self._refusal_closed,
        )
        if self.refusal_tls is not None:
            refusals = self.refusal_tls(refusals)
        return refusals.buildProtocol(addr)

    def _refusal_closed(self) -> None:
        self.refusals_open -= 1
