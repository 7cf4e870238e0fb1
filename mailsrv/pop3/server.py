"""
The POP3 session: Twisted's L{pop3.POP3} with our line reading, command
dispatch and turn-taking of pipelined commands (RFC 2449 6.6), STLS (RFC
2595), and the AUTHORIZATION state (RFC 1939 4, RFC 2449, RFC 3206, RFC
5034); the TRANSACTION state's commands are L{TransactionCommands}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.mail import pop3
from twisted.mail.interfaces import IMailboxPOP3
from twisted.python.failure import Failure

from mailsrv import loglines
from mailsrv.auth import sasl
from mailsrv.auth.policy import is_tls, peer_host
from mailsrv.deadline import HandshakeDeadlineMixin
from mailsrv.eager import send_now
from mailsrv.logsafe import SafeLogger
from mailsrv.pop3.maildrop import Maildrop, MaildropInUse, MaildropLocks
from mailsrv.pop3.replies import (
    AUTH_FAILED,
    DELETED,
    GREETING,
    IN_USE,
    NO_SUCH_MESSAGE,
    PLAINTEXT_DISALLOWED,
    SHUTTING_DOWN,
    SYS_TEMP,
    THROTTLED,
    TIMED_OUT,
    TOO_MANY_ERRORS,
)
from mailsrv.pop3.transaction import TransactionCommands
from mailsrv.session import BadCommands, IdleClose, TLSGate

IMPLEMENTATION = b"mailsrv"
MAX_LINE = 8192  # RFC 2449 4: 255 octets for commands; SASL responses need more
MAX_PIPELINED = 64  # stop reading while this many commands wait


class POP3Server(HandshakeDeadlineMixin, TransactionCommands, pop3.POP3):
    """
    A POP3 session. Commands arriving while one is in progress (a login, a
    message being sent, the expunge at QUIT) wait their turn (RFC 2449 6.6
    PIPELINING).
    """

    log = SafeLogger()
    AUTH_CMDS = [b"CAPA", b"USER", b"PASS", b"AUTH", b"STLS", b"QUIT", b"NOOP"]
    transport: Any  # TCP, TLS or (in tests) a StringTransport
    factory: Any
    mbox: Any  # the Maildrop once logged in, else None
    blocked: list[bytes] | None  # type: ignore[assignment]  # lines waiting their turn
    _userIs: bytes | None  # type: ignore[assignment]
    _onLogout: Callable[[], Any] | None  # type: ignore[assignment]

    def __init__(self, ctx: Any, locks: MaildropLocks, implicit_tls: bool = False) -> None:
        self.ctx = ctx
        self.locks = locks
        self.implicit_tls = implicit_tls
        self._authenticator = sasl.authenticator(ctx)
        self.timeOut = ctx.config.limits.timeout
        self._bad = BadCommands(ctx.config.limits.max_errors)
        self._tls = TLSGate(ctx.tls, ctx.config.auth.cleartext, implicit_tls)
        self._idle = IdleClose(ctx.reactor)
        self._buffer = b""
        self._discarding = False  # the rest of an over-long line
        self._tls_started = False  # ignore the rest of the packet that carried STLS
        self._closed = False
        self._shutting_down = False
        self._sasl: Callable[[bytes], None] | None = None
        self._method = ""
        # Read-ahead for sequential RETR: message index -> bytes, and the batch being read.
        self._cache: dict[int, bytes] = {}
        self._opened: list[tuple[int, int, int]] = []  # (index, uid, size) to read ahead
        self._batch: set[int] = set()  # indexes being read in the pool
        self._ahead_until = 0  # the next index to open ahead
        self._batch_waiters: list[tuple[int, defer.Deferred]] = []
        self.mbox = None

    # --- plumbing ---------------------------------------------------------------

    def callLater(self, period: float, func: Callable[[], Any]) -> Any:
        return self.ctx.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        # Each reply is one write; Nagle's algorithm would only delay it.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except Exception:  # not a TCP socket underneath
                pass
        self.peer = peer_host(self.transport)
        sessions = getattr(self.factory, "open_sessions", None)
        if sessions is not None:
            sessions.opened(self)
        self._tls.connected(self.transport)
        self.transport.write(GREETING + b"\r\n")
        self.setTimeout(self.timeOut)
        if self.implicit_tls:
            self.start_handshake_deadline(self.timeOut)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = True
        self.handshake_over()
        self._idle.connection_lost()
        self._cache.clear()
        self._opened = []
        super().connectionLost(reason)
        sessions = getattr(self.factory, "open_sessions", None)
        if sessions is not None:
            sessions.closed(self)

    def shut_down(self) -> None:
        """
        The server is stopping: C{-ERR} and close, now or once the command
        under way has been answered. Messages marked with DELE stay: only
        QUIT removes them (RFC 1939 6).
        """
        self._shutting_down = True
        if self.blocked is None:
            self._goodbye()

    def _goodbye(self) -> None:
        if self._closed or self.transport.disconnecting:
            return
        self.send(SHUTTING_DOWN)
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.log.info(
            "pop3 timeout for {user} from {client}",
            user=self.mbox.user if self.mbox else None,
            client=self.peer,
        )
        self._idle.expire(self.transport, lambda: self.send(TIMED_OUT))

    def send(self, *lines: bytes) -> None:
        """Write reply lines (each without CRLF) in one write."""
        if not self._closed:
            send_now(self.transport, b"".join(line + b"\r\n" for line in lines))

    def ok(self, text: bytes = b"") -> None:
        self.send(b"+OK " + text if text else b"+OK")

    def error(self, text: bytes) -> None:
        """Send C{-ERR text}."""
        self.send(text if text.startswith(b"-ERR") else b"-ERR " + text)

    def bad(self, text: bytes) -> None:
        """Send C{-ERR text} for a client error; too many of them end the session."""
        self.error(text)
        if self._bad.bad() and not self._closed:
            self.send(TOO_MANY_ERRORS)
            self.log.info("pop3 dropping {client}: too many invalid commands", client=self.peer)
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """Split lines on LF (a CR before it is dropped); over-long lines get -ERR."""
        self._tls_started = False
        buf = self._buffer + data
        start = 0
        while not self._closed and not self.transport.disconnecting:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if self._discarding:
                self._discarding = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_LINE:
                self.bad(b"Line too long.")
                continue
            self.lineReceived(line)
            if self._tls_started:
                # RFC 2595 4: anything after STLS in the same packet was sent in
                # the clear and must not be taken as coming over TLS.
                buf, start = b"", 0
                break
        self._buffer = buf[start:]
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
            if not self._discarding:
                self._discarding = True
                self.bad(b"Line too long.")

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if self.blocked is not None:
            self.blocked.append(line)
            if len(self.blocked) == MAX_PIPELINED:
                self.transport.pauseProducing()
            return
        self._handle(line)

    def _handle(self, line: bytes) -> None:
        if self._sasl is not None:
            handler, self._sasl = self._sasl, None
            handler(line)
            return
        command, _, rest = line.partition(b" ")
        self.processCommand(command, rest)

    def processCommand(self, command: bytes, *args: bytes) -> Any:
        rest = args[0] if args else b""
        try:
            name = command.upper().decode("ascii")
        except UnicodeDecodeError:
            name = ""
        f = getattr(self, "pop3_" + name, None) if name.isalpha() else None
        if f is None or (self.mbox is None and name.encode() not in self.AUTH_CMDS):
            return self.bad(b"Unknown command.")
        try:
            return f(rest)
        except Exception:
            self.log.failure("pop3 {command} failed", command=name)
            self.send(SYS_TEMP)
            return None

    def _unblock(self, _: Any) -> None:
        """Run the lines that waited, until one of them starts another long operation."""
        lines, self.blocked = self.blocked or [], None
        if len(lines) >= MAX_PIPELINED and not self._closed:
            self.transport.resumeProducing()
        while lines and self.blocked is None and not self._closed and not self._shutting_down:
            self._handle(lines.pop(0))
            if self._tls_started:
                lines.clear()  # RFC 2595 4: sent in the clear before the handshake
        if self.blocked is not None:
            self.blocked.extend(lines)
        elif self._shutting_down:
            self._goodbye()

    def _long(self, d: defer.Deferred) -> defer.Deferred:
        """Hold further commands until C{d} fires; the idle timeout keeps running."""
        self.blocked = []
        d.addErrback(self._unexpected)
        d.addCallback(self._unblock)
        return d

    def _unexpected(self, f: Failure) -> None:
        self.log.failure("pop3 session error for {client}", f, client=self.peer)
        self.send(SYS_TEMP)

    def _message_number(self, arg: bytes) -> int | None:
        """The 0-based index of a message number argument, or None after an -ERR."""
        arg = arg.strip()
        try:
            n = int(arg)
        except ValueError:
            self.bad(b"Invalid message number: " + arg[:40])
            return None
        try:
            self.mbox.info(n - 1)  # type: ignore[union-attr]
        except IndexError:
            self.error(NO_SUCH_MESSAGE % n)
            return None
        except KeyError:
            self.error(DELETED)
            return None
        return n - 1

    # --- AUTHORIZATION state (RFC 1939 4, RFC 2449, RFC 2595, RFC 5034) ---------

    def _cleartext_ok(self) -> bool:
        return self._tls.password_allowed()

    def _can_stls(self) -> bool:
        return self.mbox is None and self._tls.can_start()

    def capabilities(self) -> list[bytes]:
        """The RFC 2449 capability list for the current state."""
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.mbox is None:
            if self._cleartext_ok():
                caps += [b"USER", b"SASL " + b" ".join(sasl.MECHANISMS)]
            if self._can_stls():
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION " + IMPLEMENTATION)
        return caps

    listCapabilities = capabilities

    def pop3_CAPA(self, rest: bytes) -> None:
        self.send(b"+OK", *self.capabilities(), b".")

    def pop3_NOOP(self, rest: bytes) -> None:
        self.ok()

    def pop3_STLS(self, rest: bytes) -> None:
        if self.mbox is not None:
            return self.bad(b"Unknown command.")
        if self._tls.active():
            return self.error(b"TLS is already active.")
        if not self._can_stls():
            return self.error(b"TLS support isn't enabled.")
        self.ok(b"Begin TLS negotiation now.")
        self._tls.start()
        self.start_handshake_deadline(self.timeOut)
        self._tls_started = True
        self._userIs = None

    def pop3_USER(self, rest: bytes) -> None:
        if self.mbox is not None:
            return self.bad(b"Unknown command.")
        if not self._cleartext_ok():
            return self.error(PLAINTEXT_DISALLOWED)
        if not rest.strip():
            return self.bad(b"USER: no user name given.")
        self._userIs = rest.strip()
        self.ok()

    def pop3_PASS(self, rest: bytes) -> None:
        if self.mbox is not None:
            return self.bad(b"Unknown command.")
        if not self._cleartext_ok():
            return self.error(PLAINTEXT_DISALLOWED)
        user, self._userIs = self._userIs, None
        if user is None:
            return self.bad(b"No username given.")
        # Dovecot's pop3-login passes USER/PASS on as SASL PLAIN and logs method=PLAIN.
        self._login(sasl.Credentials(b"", user, rest), b"PLAIN")

    def pop3_AUTH(self, rest: bytes) -> None:
        if self.mbox is not None:
            return self.bad(b"Unknown command.")
        mechanism, _, initial = rest.strip().partition(b" ")
        if not mechanism:
            mechs = list(sasl.MECHANISMS) if self._cleartext_ok() else []
            return self.send(b"+OK", *mechs, b".")
        try:
            exchange = sasl.Exchange(mechanism)
        except sasl.UnknownMechanism:
            return self.error(b"Unsupported authentication mechanism.")
        if not self._cleartext_ok():
            return self.error(PLAINTEXT_DISALLOWED)
        self._sasl_step(exchange, lambda: exchange.start(initial or None))

    def _sasl_step(self, exchange: sasl.Exchange, step: Callable[[], Any]) -> None:
        """RFC 5034 4: one step of a SASL exchange: a C{+} challenge, an error, or the login."""
        try:
            answer = step()
        except sasl.Cancelled:
            return self.error(b"Authentication aborted by client.")  # RFC 5034 4
        except sasl.BadBase64:
            return self.bad(b"Invalid base64 data in continued response.")
        except sasl.SASLError:
            return self.bad(b"Invalid SASL " + exchange.mechanism + b" response.")
        if isinstance(answer, sasl.Credentials):
            return self._login(answer, exchange.mechanism)
        self._sasl = lambda line: self._sasl_step(exchange, lambda: exchange.respond(line))
        self.send(b"+ " + answer)

    def _login(self, credentials: sasl.Credentials, method: bytes) -> None:
        """Check the password (throttled, delayed on failure) and open the maildrop."""
        name = credentials.authcid  # as sent; the logger escapes it
        self._method = method.decode()
        d = self._authenticator.login(self.peer, credentials, IMailboxPOP3)
        d.addCallbacks(
            self._logged_in, self._login_failed, callbackArgs=(name,), errbackArgs=(name,)
        )
        self._long(d)

    def _logged_in(self, result: tuple[Any, Maildrop, Callable[[], None]], name: bytes) -> None:
        _, maildrop, logout = result
        if self._closed:  # the client left while we were checking
            logout()
            return
        self.mbox = maildrop
        self._onLogout = logout
        self._log_login(maildrop.user, "ok", count=len(maildrop.infos))
        self.ok(b"Logged in.")

    def _log_login(self, user: str | bytes, result: str, count: int | None = None) -> None:
        """The one line per login an administrator greps for (never the password)."""
        if result in ("failed", "throttled"):
            # The shape fail2ban's stock dovecot filter matches (mailsrv.loglines).
            self.log.info(
                loglines.LOGIN_FAILED if result == "failed" else loglines.LOGIN_THROTTLED,
                service="pop3",
                user=loglines.bracketed(user),
                method=self._method or "PLAIN",
                client=self.peer,
                local=loglines.local_host(self.transport),
            )
            return
        self.log.info(
            "pop3-login: {result}: user=<{user}>, method={method}, rip={client}, "
            "lip={local}, tls={tls}, messages={count}",
            user=loglines.bracketed(user),
            client=self.peer,
            local=loglines.local_host(self.transport),
            result="Login" if result == "ok" else result,
            method=self._method or "PLAIN",
            tls=is_tls(self.transport),
            count=count,
        )

    def _login_failed(self, f: Failure, name: bytes) -> None:
        result = sasl.outcome(f)
        if f.check(MaildropInUse):
            self._log_login(name, "in use")
            self.error(IN_USE)
        elif result == sasl.THROTTLED:
            self._log_login(name, "throttled")
            self.error(THROTTLED)  # at once, as SMTP and IMAP do: see mailsrv.auth.throttle
        elif result == sasl.FAILED:
            self._log_login(name, "failed")
            self.bad(AUTH_FAILED)
        else:
            self._log_login(name, "error")
            if result == sasl.UNAVAILABLE:
                self.log.error("pop3 login from {client}: {error}", client=self.peer, error=f.value)
            else:
                self.log.failure(
                    "pop3 login {user} from {client}: error", f, user=name, client=self.peer
                )
            self.send(SYS_TEMP)
