"""
Session mechanics the SMTP, POP3 and IMAP servers share, each a small
object a protocol holds (composition, not another base class under
Twisted's servers): the bad-command counter that drops a client sending
nothing but errors, the STARTTLS gate, flow control for long replies, and
how a session idle too long is closed. Each protocol keeps its own words on
the wire; only the rules live here.

The idle timer is Twisted's L{twisted.protocols.policies.TimeoutMixin} in
all three, on the reactor the server was given; at its end each calls
L{IdleClose}. The TLS handshake deadline is
L{mailsrv.deadline.HandshakeDeadlineMixin}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, ITLSTransport
from zope.interface import implementer

from mailsrv.auth.policy import cleartext_allowed, is_tls


class BadCommands:
    """
    A client's bad commands, counted toward C{limit} (C{limits.max_errors}).
    At the limit the protocol says goodbye in its own words and closes
    (SMTP 421, RFC 5321 3.8; POP3 C{-ERR}; IMAP C{* BYE}, RFC 3501 7.1.5),
    and again at each further bad command until the connection is gone.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def bad(self) -> bool:
        """Count one bad command; True when the client is at the limit and must be dropped."""
        self.count += 1
        return self.count >= self.limit

    def good(self) -> None:
        """A command went well: start counting again (IMAP's rule; SMTP and POP3 never forgive)."""
        self.count = 0


class TLSGate:
    """
    The STARTTLS gate of one session: whether the connection is encrypted
    (implicit TLS or STARTTLS done), whether it may still start TLS
    (RFC 3207, RFC 2595, RFC 3501 6.2.1), and whether a password may be sent
    on it now (C{auth.cleartext}, L{mailsrv.auth.policy.cleartext_allowed}):
    capability lists offer AUTH, USER and LOGIN only when it may, and the
    commands refuse it otherwise.
    """

    def __init__(self, options: Any, cleartext: str, implicit_tls: bool) -> None:
        """C{options}: the TLS context for STARTTLS, or None (none configured, or implicit TLS)."""
        self.options = None if implicit_tls else options
        self.cleartext = cleartext
        self.implicit_tls = implicit_tls
        self.started = False
        self.transport: Any = None

    def connected(self, transport: Any) -> None:
        """The session's transport, at C{connectionMade}."""
        self.transport = transport

    def active(self) -> bool:
        """Whether the session is encrypted."""
        return self.implicit_tls or self.started or is_tls(self.transport)

    def can_start(self) -> bool:
        """Whether STARTTLS may be offered and accepted now."""
        return (
            self.options is not None
            and not self.active()
            and ITLSTransport.providedBy(self.transport)
        )

    def start(self) -> None:
        """Begin the TLS handshake (after the protocol's "go ahead" reply)."""
        self.transport.startTLS(self.options)
        self.started = True

    def password_allowed(self) -> bool:
        """Whether a password may be sent on this connection now."""
        return self.active() or cleartext_allowed(self.cleartext, self.transport)


@implementer(IPushProducer)
class OutputFlow:
    """
    Flow control for a long reply (a listing, a message, a FETCH): the
    transport's producer while the reply is written; C{wait()} fires when
    the transport has room again, so the reply is written no faster than
    the client reads it.
    """

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiting: list[defer.Deferred] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    def wait(self) -> defer.Deferred:
        """Fire when the transport is ready for more (at once if it is now)."""
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d


# Seconds a session closed for idleness has to read its goodbye and go.
GOODBYE_GRACE = 10.0


class IdleClose:
    """
    How a session that was idle too long ends: the protocol's goodbye (SMTP
    421, RFC 5321 4.5.3.2.7; POP3 C{-ERR}, RFC 1939 3; IMAP C{* BYE}, RFC
    3501 5.4), then a clean close. A clean close waits until the client has
    read everything written, so a client that has stopped reading would hold
    the connection open for ever: it is aborted at once when output is
    already backed up (or a close is already under way), and C{grace}
    seconds after the goodbye if it is still open then.
    """

    def __init__(self, clock: Any, grace: float = GOODBYE_GRACE) -> None:
        """C{clock}: the reactor the server was given (an IReactorTime)."""
        self.clock = clock
        self.grace = grace
        self._cut: Any = None

    def expire(self, transport: Any, goodbye: Callable[[], None], backed_up: bool = False) -> bool:
        """
        Close C{transport} of a session idle too long: C{goodbye()} writes the
        protocol's farewell. False when the connection was aborted at once,
        without a goodbye.
        """
        if transport.disconnecting or backed_up:
            transport.abortConnection()
            return False
        goodbye()
        transport.loseConnection()
        if self._cut is None:
            self._cut = self.clock.callLater(self.grace, self._abort, transport)
        return True

    def _abort(self, transport: Any) -> None:
        self._cut = None
        transport.abortConnection()

    def connection_lost(self) -> None:
        """The connection is gone: nothing left to abort."""
        cut, self._cut = self._cut, None
        if cut is not None and cut.active():
            cut.cancel()


# Seconds the sessions have at shutdown to finish the command under way.
SHUTDOWN_GRACE = 10.0


class OpenSessions:
    """
    The open sessions of one listener, told goodbye when the server stops
    (POP3 C{-ERR}, IMAP C{* BYE}, RFC 3501 7.1.5; SMTP has its own, with
    its transactions). A session registers as its connection opens and
    leaves as it closes; at shutdown each gets C{shut_down()}, which says
    goodbye now or once the command under way is answered, and the
    connections still open after C{grace} seconds are cut.
    """

    def __init__(self, clock: Any, grace: float = SHUTDOWN_GRACE) -> None:
        self.clock = clock
        self.grace = grace
        self._open: dict[Any, defer.Deferred] = {}

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, session: Any) -> None:
        self._open[session] = defer.Deferred()

    def closed(self, session: Any) -> None:
        ended = self._open.pop(session, None)
        if ended is not None:
            ended.callback(None)

    def shut_down(self) -> defer.Deferred:
        """Say goodbye to every session; fire once all have closed (or were cut)."""
        sessions = dict(self._open)
        for session in sessions:
            session.shut_down()
        if not sessions:
            return defer.succeed(None)

        def cut() -> None:
            for session in list(self._open):
                abort = getattr(session.transport, "abortConnection", None)
                if abort is not None:
                    abort()
                self.closed(session)

        timer = self.clock.callLater(self.grace, cut)
        d = defer.DeferredList(list(sessions.values()))
        return d.addBoth(lambda _: timer.cancel() if timer.active() else None)
