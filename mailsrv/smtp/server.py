"""
The ESMTP server for the MX (port 25) and for submission (587 with
STARTTLS, 465 with implicit TLS): Twisted's L{smtp.ESMTP} with the
extensions, limits, replies and policy a mail server needs.

Twisted's ESMTP advertises only AUTH and STARTTLS, ignores MAIL parameters,
drops the connection on a long line, and runs pipelined commands before the
replies to earlier ones are known. This subclass reads lines itself
(L{mailsrv.smtp.lines}), one command at a time, and answers with RFC 3463
codes; AUTH is L{mailsrv.smtp.auth}, the session's log lines
L{mailsrv.smtp.sessionlog}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailsrv import replies
from mailsrv.auth import sasl
from mailsrv.deadline import HandshakeDeadlineMixin
from mailsrv.eager import send_now
from mailsrv.logsafe import SafeLogger
from mailsrv.policy.client import ClientChecked
from mailsrv.policy.greylist import SessionGreylist
from mailsrv.policy.rates import SessionRates
from mailsrv.replies import (
    BYE,
    CANNOT_VRFY,
    HELP,
    NO_VALID_RECIPIENTS,
    NOT_IMPLEMENTED,
    TLS_READY,
    TLS_UNAVAILABLE,
    Reply,
    SMTPReplyError,
)
from mailsrv.session import SHUTDOWN_GRACE, BadCommands, IdleClose, TLSGate
from mailsrv.smtp import received
from mailsrv.smtp.address import (
    AddressError,
    ArgumentError,
    mail_parameters_refusal,
    parse_mail_from,
    parse_rcpt_to,
)
from mailsrv.smtp.auth import AuthCommand, register_avatars
from mailsrv.smtp.delivery import (
    BaseDelivery,
    InboundDelivery,
    IncomingMessage,
)
from mailsrv.smtp.lines import LineReader
from mailsrv.smtp.refusallog import log_rejected, syntax_refusal
from mailsrv.smtp.sessionlog import SessionLog
from mailsrv.smtp.shutdown import stop_sessions

COMMAND, DATA = smtp.COMMAND, smtp.DATA

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND = 510

# Postfix's smtpd_forbidden_commands: a web client, not a mail client.
FORBIDDEN = frozenset({b"CONNECT", b"GET", b"POST", b"HEAD", b"PUT"})

_VERBS = frozenset(
    {
        b"HELO",
        b"EHLO",
        b"MAIL",
        b"RCPT",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"QUIT",
        b"VRFY",
        b"EXPN",
        b"HELP",
        b"STARTTLS",
        b"AUTH",
    }
)


class SMTPServer(HandshakeDeadlineMixin, LineReader, AuthCommand, ClientChecked, smtp.ESMTP):
    """One SMTP session on the MX or on submission."""

    log = SafeLogger()
    transport: Any
    portal: Any

    def __init__(self, context: Any, submission: bool = False, implicit_tls: bool = False) -> None:
        super().__init__(chal={}, contextFactory=None if implicit_tls else context.tls)
        self.context = context
        self.submission = submission
        self.implicit_tls = implicit_tls
        self.timeout = context.config.limits.timeout
        self.portal = context.portal
        self._authenticator = sasl.authenticator(context)
        self.host = context.config.server.hostname.encode("ascii", "replace")
        self._buffer = b""
        self._pos = 0
        self._discarding = False
        self._draining = False
        self._waiting = False
        self._paused_transport = False
        self._write_blocked = False
        self._lost = False
        self._shutting_down = False
        self._storing = False
        self.ended: defer.Deferred = defer.Deferred()  # fires at connectionLost
        self._bad = BadCommands(context.config.limits.max_errors)
        self._tls = TLSGate(context.tls, context.config.auth.cleartext, implicit_tls)
        self._idle = IdleClose(context.reactor)
        self._client_ip = "unknown"
        self._session_log = SessionLog(self._client_ip, None)  # connect, TLS, disconnect lines
        self._helo_name: str | None = None
        self._esmtp = False
        self._user: str | None = None
        self._delivery: BaseDelivery | None = None
        self._logout: Any = None
        self._sender: str | None = None
        self._smtputf8 = False  # this transaction's MAIL had SMTPUTF8 (RFC 6531 3.4)
        self._recipients: list[str] = []
        self._message: IncomingMessage | None = None
        self._auth_step: Any = None

    # connection

    def callLater(self, period, func):
        """TimeoutMixin's timer, on the reactor we were given."""
        return self.context.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)  # replies are written in pieces
        except (AttributeError, NotImplementedError, OSError):
            pass
        self._client_ip = str(getattr(self.transport.getPeer(), "host", "local"))
        self._session_log = SessionLog(self._client_ip, self.client_name)
        self._session_log.connected()
        self._tls.connected(self.transport)
        self._rates = SessionRates(self.context, self._client_ip)  # [policy] rate limits
        self._greylist = SessionGreylist(self.context, self._client_ip, self)  # after RCPT checks
        if not self.submission:
            self._delivery = InboundDelivery(self.context)
        # Stop reading while the client does not read our replies.
        self.transport.registerProducer(self, True)
        sessions = getattr(self.factory, "open_sessions", None)
        if sessions is not None:
            sessions.add(self)
        super().connectionMade()  # 220 greeting, idle timer
        if self.implicit_tls:
            self.start_handshake_deadline(self.timeout)

    def greeting(self) -> bytes:
        return self.host + b" ESMTP mailsrv"

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._lost = True
        self.setTimeout(None)
        self.handshake_over()
        self._idle.connection_lost()
        if self._message is not None:
            self._message.connectionLost()
            self._message = None
        self._do_logout()
        sessions = getattr(self.factory, "open_sessions", None)
        if sessions is not None:
            sessions.discard(self)
        self._session_log.disconnected()
        if not self.ended.called:
            self.ended.callback(None)

    def shut_down(self) -> None:
        """The server is stopping: 421 now, or once answered (L{mailsrv.smtp.shutdown})."""
        self._shutting_down = True
        if not (self._waiting or self.receiving_message):
            self._goodbye()

    @property
    def receiving_message(self) -> bool:
        """Whether the client is sending a message (after 354, before the final dot)."""
        return self.mode == DATA and self._message is not None

    @property
    def storing(self) -> bool:
        """Whether a message the client ended is being stored (its 250 not sent yet)."""
        return self._storing

    def _goodbye(self) -> None:
        if self._lost or self.transport.disconnecting:
            return
        self._reply(replies.SHUTTING_DOWN)
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        if not self._idle.expire(self.transport, self._timed_out, self._write_blocked):
            # The client reads nothing, not even our goodbye: dropped.
            self.log.info("client {client} stopped reading, dropping", client=self._client_ip)

    def _timed_out(self) -> None:
        self._reply(replies.TIMEOUT)  # RFC 5321 4.5.3.2.7
        self.log.info("timeout, closing connection from {client}", client=self._client_ip)

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        self._session_log.tls_established(self.transport)

    @property
    def tls_active(self) -> bool:
        """Whether this session is encrypted (implicit TLS or STARTTLS)."""
        return self._tls.active()

    def _auth_allowed(self) -> bool:
        return self._tls.password_allowed()

    def _command(self, line: bytes) -> None:
        parts = line.strip().split(None, 1)
        verb = parts[0].upper() if parts else b""
        rest = parts[1] if len(parts) > 1 else b""
        if len(line) > MAX_COMMAND and verb != b"AUTH":
            self._reply(replies.LINE_TOO_LONG)
            return
        if verb in FORBIDDEN:
            self.log.info("web request from {client}, closing", client=self._client_ip)
            self._reply(replies.TOO_MANY_ERRORS)
            self.transport.loseConnection()
            return
        if verb not in _VERBS:
            self._reply(replies.SYNTAX_ERROR)
            return
        self._session_log.command(verb)
        method = getattr(self, "do_" + verb.decode(), None) or getattr(self, "ext_" + verb.decode())
        result = method(rest)
        if isinstance(result, defer.Deferred):
            self._wait(result)

    # output

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """
        Send a reply (every line of it) as one write: at once when no
        further command waits in the input, else with the replies to the
        commands that follow (PIPELINING: one segment for the lot).
        """
        lines = message.splitlines() or [b""]
        prefix = b"%03d-" % code
        out = [prefix + line for line in lines[:-1]]
        out.append(b"%03d %s" % (code, lines[-1]))
        data = b"\r\n".join(out) + b"\r\n"
        self._session_log.replied(code)
        if self._draining and self._buffer.find(b"\r\n", self._pos) >= 0:
            self.transport.write(data)
        else:
            send_now(self.transport, data)

    def _reply(self, reply: Reply, text: str | None = None) -> None:
        """Send C{reply}; count it if it is an error and drop the client after too many."""
        body = text or reply.text
        if reply.enhanced:
            body = f"{reply.enhanced} {body}"
        self.sendCode(reply.code, body.encode("utf-8", "replace"))
        self._count(reply.code)

    def _reply_error(self, error: SMTPReplyError) -> None:
        self.sendCode(error.code, str(error.resp).encode("utf-8", "replace"))
        self._count(error.code)

    def _count(self, code: int) -> None:
        if code < 500 or code == replies.MESSAGE_TOO_BIG.code:
            return
        if self._bad.bad():
            self.log.info("too many errors from {client}, closing", client=self._client_ip)
            self.sendCode(
                replies.TOO_MANY_ERRORS.code,
                replies.TOO_MANY_ERRORS.line(),
            )
            self.transport.loseConnection()

    # session

    def _reset_transaction(self) -> None:
        self._sender = None
        self._smtputf8 = False
        self._recipients = []

    def _do_logout(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            try:
                logout()
            except Exception:
                self.log.failure("logout failed")

    def do_HELO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=False)

    def do_EHLO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=True)

    def _greet(self, rest: bytes, esmtp: bool) -> None:
        name = rest.strip()
        if not name or len(name.split()) != 1:
            self._reply(replies.BAD_ARGUMENTS, "HELO/EHLO requires a domain name")
            return
        self._helo_name = name.decode("ascii", "replace")
        self._helo = (name, self._client_ip.encode("ascii", "replace"))
        self._esmtp = esmtp
        self._reset_transaction()
        greeting = self.host + b" Hello " + name
        if not esmtp:
            self.sendCode(250, greeting)
            return
        self.sendCode(250, b"\n".join([greeting] + self.extension_lines()))

    def extension_lines(self) -> list[bytes]:
        """The EHLO keywords on offer in the current state (RFC 5321 4.1.1.1)."""
        out = [
            b"PIPELINING",  # RFC 2920
            b"SIZE %d" % self.context.config.limits.max_message_size,  # RFC 1870
            b"8BITMIME",  # RFC 6152
            b"SMTPUTF8",  # RFC 6531
            b"ENHANCEDSTATUSCODES",  # RFC 2034
        ]
        if self._tls.can_start():
            out.append(b"STARTTLS")  # RFC 3207
        if self.submission and self._user is None and self._auth_allowed():
            out.append(b"AUTH PLAIN LOGIN")  # RFC 4954
        return out

    def do_NOOP(self, rest: bytes) -> None:
        self._reply(replies.OK)

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self._reply(replies.OK)

    def do_QUIT(self, rest: bytes) -> None:
        self._reply(BYE)
        self.transport.loseConnection()

    def do_VRFY(self, rest: bytes) -> None:
        self._reply(CANNOT_VRFY)  # RFC 5321 3.5.3: no address harvesting

    def do_EXPN(self, rest: bytes) -> None:
        self._reply(NOT_IMPLEMENTED)

    def do_HELP(self, rest: bytes) -> None:
        self._reply(HELP)

    # the transaction

    def do_MAIL(self, rest: bytes) -> defer.Deferred | None:
        if self._helo_name is None:
            self._reply(replies.BAD_SEQUENCE, "Send HELO/EHLO first")
            return None
        if self._sender is not None:
            self._reply(replies.BAD_SEQUENCE, "Nested MAIL command")
            return None
        if self.submission and self._user is None:  # RFC 4954 6; a reject line, as Postfix's
            self._refused(Failure(SMTPReplyError(replies.AUTH_REQUIRED)), "sender", "")
            return None
        try:
            arg = parse_mail_from(rest)
        except (AddressError, ArgumentError) as e:
            self._reject(syntax_refusal(e, "MAIL"), "MAIL")
            return None
        refusal = mail_parameters_refusal(
            arg.params, self.context.config.limits.max_message_size, self.submission
        )
        if arg.params and not self._esmtp:
            refusal = replies.BAD_PARAMETER  # RFC 1869 6: only after EHLO
        if refusal is not None:
            self._reject(refusal, "MAIL")
            return None
        delivery = self._delivery
        assert delivery is not None
        return self._check(
            lambda: self._rates.mail(delivery, self._helo, arg.address),
            lambda _: self._sender_ok(_, arg.address, arg.smtputf8),
            lambda f: self._refused(f, "sender", arg.address),
        )

    def _sender_ok(self, _: Any, address: str, smtputf8: bool = False) -> None:
        sender = getattr(self._delivery, "sender", None)
        self._sender = address if sender is None else sender
        self._smtputf8 = smtputf8
        self._recipients = []
        self._reply(replies.SENDER_OK)

    def _reject(self, reply: Reply, where: str) -> None:
        """Refuse MAIL or RCPT before its checks, with Postfix's C{NOQUEUE: reject:} line."""
        sender, helo = self._sender, self._helo_name
        log_rejected(self._session_log, where, reply, sender, helo, self._esmtp)
        self._reply(reply)

    def _refused(self, failure: Failure, what: str, address: str | None = None) -> None:
        error = failure.value
        if isinstance(error, SMTPReplyError):
            line = "reject {what} <{address}> from {client}: {reply}; sender=<{sender}>"
            if error.cause:
                line += " ({cause})"  # for the log only: the client is told the reply
            self.log.info(
                line,
                what=what,
                address=address,
                client=self._client_ip,
                reply=f"{error.code} {error.resp}",
                sender=self._sender,
                cause=error.cause,
            )
            self._reply_error(error)
        else:
            self.log.failure("checking a {what} failed", failure=failure, what=what)
            self._reply(replies.LOCAL_ERROR)

    def do_RCPT(self, rest: bytes) -> defer.Deferred | None:
        if self._sender is None:
            self._reply(replies.BAD_SEQUENCE, "Need MAIL before RCPT")
            return None
        try:
            arg = parse_rcpt_to(rest, self.context.config.server.domains[0], self._smtputf8)
        except (AddressError, ArgumentError) as e:
            self._reject(syntax_refusal(e, "RCPT"), "RCPT")
            return None
        if arg.params:
            self._reject(replies.BAD_PARAMETER, "RCPT")
            return None
        if arg.address in self._recipients:
            self._reply(replies.RECIPIENT_OK)
            return None
        if len(self._recipients) >= self.context.config.limits.max_recipients:
            self._reply(replies.TOO_MANY_RECIPIENTS)  # RFC 5321 4.5.3.1.10
            return None
        if self.client is not None and self.client.rcpt_refusal is not None:
            self._refused(Failure(self.client.rcpt_refusal), "recipient", arg.address)
            return None  # [policy] reject_unknown_client
        delivery = self._delivery
        assert delivery is not None
        return self._check(
            lambda: self._rates.rcpt(self._greylist.delivery(delivery, self._sender), arg.address),
            lambda _: self._recipient_ok(_, arg.address),
            lambda f: self._refused(f, "recipient", arg.address),
        )

    def _check(self, check: Any, ok: Any, refused: Any) -> defer.Deferred | None:
        """Run a policy check that may answer now or later (a Deferred)."""
        try:
            result = check()
        except Exception:
            refused(Failure())
            return None
        if isinstance(result, defer.Deferred):
            result.addCallbacks(ok, refused)
            return result
        ok(result)
        return None

    def _recipient_ok(self, accepted: Any, address: str) -> None:
        if self._sender is None:
            return  # the transaction was reset meanwhile
        # A local user's stored spelling: Alice@ and alice@ are one mailbox.
        address = getattr(accepted, "address", address)
        if address not in self._recipients:
            self._recipients.append(address)
        self._reply(replies.RECIPIENT_OK)

    def do_DATA(self, rest: bytes) -> None:
        if self._sender is None:
            self._reply(replies.BAD_SEQUENCE, "Need MAIL command")
            return
        if not self._recipients:
            self._reply(NO_VALID_RECIPIENTS)
            return
        if rest.strip():
            self._reply(replies.BAD_ARGUMENTS)
            return
        delivery = self._delivery
        assert delivery is not None
        now = self.context.reactor.seconds()
        queue_id = received.new_queue_id(now)
        trace = received.received_header(
            helo=self._helo_name or "unknown",
            client_ip=self._client_ip,
            client_name=self.client_name,
            hostname=self.context.config.server.hostname,
            protocol=received.with_protocol(
                self._esmtp, self.tls_active, self._user is not None, self._smtputf8
            ),
            queue_id=queue_id,
            recipient=self._recipients[0] if len(self._recipients) == 1 else None,
            tls_info=received.tls_description(self.transport) if self.tls_active else None,
            now=now,
        )
        self._message = delivery.new_message(
            self._sender,
            list(self._recipients),
            trace,
            self._client_ip,
            queue_id,
            helo=self._helo_name,
            client_name=self.client_name,
        )
        # Kept with the message through to the queue (RFC 6531 3.4: the next hop
        # must offer SMTPUTF8 for it).
        self._message.smtputf8 = self._smtputf8
        self._reset_transaction()
        self.mode = DATA
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _end_data(self) -> None:
        self.mode = COMMAND
        message, self._message = self._message, None
        assert message is not None
        self._storing = True
        d = message.eomReceived()
        d.addCallbacks(self._accepted, self._not_accepted, errbackArgs=(message,))
        d.addBoth(self._stored)
        self._wait(d)

    def _stored(self, result: Any) -> Any:
        self._storing = False
        return result

    def _accepted(self, queue_id: str) -> None:
        self._reply(replies.QUEUED, f"Ok: queued as {queue_id}")

    def _not_accepted(self, failure: Failure, message: IncomingMessage) -> None:
        self._refused(failure, f"message {message.queue_id}", message.sender)

    # RFC 3207 STARTTLS

    def ext_STARTTLS(self, rest: bytes) -> None:
        if rest.strip():
            self._reply(replies.BAD_ARGUMENTS)
        elif self.tls_active:
            self._reply(replies.BAD_SEQUENCE, "TLS already active")
        elif not self._tls.can_start():
            self._reply(TLS_UNAVAILABLE)
        else:
            self._reply(TLS_READY)
            # RFC 3207 4.2: forget everything, including commands the client
            # sent after STARTTLS in the clear (CVE-2011-0411).
            self._buffer, self._pos = b"", 0
            self._helo_name = None
            self._helo = (None, self._client_ip.encode("ascii", "replace"))
            self._esmtp = False
            self._reset_transaction()
            if self._user is not None:
                self._user = None
                self._delivery = None
                self._do_logout()
            self._tls.start()
            self.startedTLS = True
            self.start_handshake_deadline(self.timeout)


class SMTPFactory(smtp.SMTPFactory):
    """Builds L{SMTPServer} sessions for one listener."""

    noisy = False

    def __init__(self, context: Any, submission: bool, implicit_tls: bool) -> None:
        super().__init__(context.portal)
        self.context = context
        self.submission = submission
        self.implicit_tls = implicit_tls
        self.domain = context.config.server.hostname.encode("ascii", "replace")
        self.open_sessions: set[SMTPServer] = set()

    def buildProtocol(self, addr) -> SMTPServer:
        p = SMTPServer(self.context, self.submission, self.implicit_tls)
        p.factory = self
        return p

    def shut_down(self, grace: float = SHUTDOWN_GRACE) -> defer.Deferred:
        """Stop every session (L{mailsrv.smtp.shutdown}); fire once all have closed."""
        return stop_sessions(self.open_sessions, self.context.reactor, grace)


def smtp_factory(context: Any, submission: bool = False, implicit_tls: bool = False) -> SMTPFactory:
    """The protocol factory for the MX (C{submission=False}) or a submission listener."""
    if submission:
        register_avatars(context)
    return SMTPFactory(context, submission, implicit_tls)
