"""
One SMTP session to one remote host, on Twisted's ESMTPClient: EHLO,
STARTTLS when offered (or required), AUTH for a smarthost, MAIL FROM, one
RCPT per recipient, DATA streamed from the queue file. Ends with a
L{SessionResult} saying what happened to each recipient. Idle connections
wait for the next message in L{mailsrv.outbound.connections}; the message is
streamed by L{mailsrv.outbound.body}.

SMTPUTF8 (RFC 6531): a message that needs it (a UTF-8 local part in its
envelope, or a UTF-8 header received with SMTPUTF8) goes with
C{MAIL FROM:<...> SMTPUTF8} to a server that offers it; to one that does not,
the recipients that need it fail permanently (RFC 6531 3.4: no downgrade
here), and the others go in ASCII, domains as A-labels (RFC 6531 3.2).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailsrv.logsafe import SafeLogger
from mailsrv.outbound import smtputf8
from mailsrv.outbound.body import _BodySender
from mailsrv.outbound.connections import ConnectionCache
from mailsrv.outbound.mx import Hop

COMMAND_TIMEOUT = 300  # RFC 5321 4.5.3.2: 5 minutes for most replies

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})\b")


# Stages of a session, in order; a failure before MAIL means "try the next host".
CONNECT, GREETING, STARTTLS, AUTH, MAIL, RCPT, DATA, DOT, DONE = (
    "connect",
    "greeting",
    "starttls",
    "auth",
    "mail",
    "rcpt",
    "data",
    "end of data",
    "done",
)
_STAGE_COMMAND = {
    GREETING: "initial greeting",
    STARTTLS: "STARTTLS",
    AUTH: "AUTH",
    MAIL: "MAIL FROM",
    RCPT: "RCPT TO",
    DATA: "DATA",
    DOT: "end of DATA",
}


@dataclass(frozen=True)
class RemoteReply:
    """A remote server's reply, or our own reason when it gave none (code 0)."""

    code: int
    text: str
    command: str = ""  # the command it answered, for the DSN ("in reply to ...")

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        if self.code == 0:  # our own reason: its status says (5.6.7: never deliverable)
            return self.status.startswith("5.")
        return 500 <= self.code < 600

    @property
    def status(self) -> str:
        """The RFC 3463 status: the one in the reply text, or derived from the code."""
        m = _ENHANCED.match(self.text.encode("utf-8", "replace"))
        if m and (self.code == 0 or m.group(1).decode() == str(self.code)[0]):
            return m.group(0).decode()
        if self.accepted:
            return "2.0.0"
        return "5.0.0" if self.permanent else "4.0.0"

    def __str__(self) -> str:
        text = " ".join(self.text.split())
        if self.code:
            return f"{self.code} {text}"
        return text


@dataclass
class SessionResult:
    """What one session did: a reply per recipient, and how it ended."""

    hop: Hop
    replies: dict[str, RemoteReply] = field(default_factory=dict)
    stage: str = CONNECT
    tls: bool = False
    tls_failed: bool = False  # the TLS handshake failed (a plain-text retry may work)
    reused: bool = False  # ran on a connection kept from an earlier message

    @property
    def stale_connection(self) -> bool:
        """A kept connection that turned out to be closed: retry on a new one."""
        return (
            self.reused and self.stage == MAIL and all(r.code == 0 for r in self.replies.values())
        )

    @property
    def before_transaction(self) -> bool:
        """The session failed before MAIL FROM: another host may do better."""
        return self.stage in (CONNECT, GREETING, STARTTLS, AUTH)


def _text(resp: Any) -> str:
    if isinstance(resp, bytes):
        return resp.decode("utf-8", "replace")
    return str(resp or "")


class RelayClient(smtp.ESMTPClient):
    """Twisted's ESMTP client, reporting per-recipient results to a L{Session}."""

    debug = False

    def __init__(
        self,
        session: Session,
        identity: bytes,
        context: Any,
        secret: bytes | None,
        username: bytes | None,
    ) -> None:
        super().__init__(secret, context, identity)
        self.session = session
        self.result = SessionResult(session.hop)
        self.requireTransportSecurity = session.require_tls
        self.requireAuthentication = secret is not None
        self.heloFallback = not (session.require_tls or secret is not None)
        self._sent_from = False
        if secret is not None and username is not None:
            # Strongest first; the server's AUTH list decides (RFC 4954).
            self.registerAuthenticator(smtp.CramMD5ClientAuthenticator(username))
            self.registerAuthenticator(smtp.LOGINAuthenticator(username))
            self.registerAuthenticator(smtp.PLAINAuthenticator(username))

    # --- stage tracking ---------------------------------------------------

    def connectionMade(self) -> None:
        self.result.stage = GREETING
        # Each command, and the body's last chunk then "." are separate writes:
        # with Nagle's algorithm on, the second waits for the peer's delayed ACK.
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        super().connectionMade()

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        self.result.stage = STARTTLS
        super().esmtpState_starttls(code, resp)
        self.result.tls = self._tlsMode

    def authenticate(self, code: int, resp: bytes, items: dict) -> None:
        if self.secret:
            self.result.stage = AUTH
        super().authenticate(code, resp, items)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        # RFC 2920: the server's EHLO (again after STARTTLS) says whether it pipelines.
        keywords = {line.split(None, 1)[0].upper() for line in resp.splitlines() if line.strip()}
        self._pipelining = b"PIPELINING" in keywords
        self._offers_utf8 = b"SMTPUTF8" in keywords  # RFC 6531 3.1
        super().esmtpState_serverConfig(code, resp)

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Twisted's, with the SMTPUTF8 plan first and our paths (L{_path})."""
        if not self._sent_from:
            self.result.stage = MAIL
            if not self._plan_smtputf8():
                return
            if self._pipelining:
                self._pipeline()
                return
        self._from = self.getMailFrom()
        self._failresponse = self.smtpTransferFailed
        if self._from is not None:
            self.sendLine(self._mail_from_line(self._from))
            self._expected = [250]
            self._okresponse = self.smtpState_to
        else:
            self._disconnectFromServer()

    # --- RFC 6531 SMTPUTF8 ------------------------------------------------

    _offers_utf8 = False  # the server's EHLO offered SMTPUTF8
    _utf8 = False  # this transaction uses it
    _to: list[str] | None = None  # the recipients sent in this transaction

    def _plan_smtputf8(self) -> bool:
        """
        Decide whether this transaction uses SMTPUTF8 (L{smtputf8.plan}); fail
        the recipients that need it where it is not offered. False: none is
        left to send, the session is over.
        """
        s = self.session
        plan = smtputf8.plan(s.sender, s.recipients, s.utf8_header, self._offers_utf8, s.hop.host)
        self._utf8 = plan.utf8
        for addr, why in plan.refused.items():
            self.result.replies[addr] = RemoteReply(0, why, "EHLO")
        self._to = [a for a in s.recipients if a not in plan.refused]
        if self._to:
            return True
        self.result.stage = DONE  # no transaction: the connection stays usable
        if self.cache is not None:
            self._park()
            self.session.finish(self.result)
        else:
            self.session.finish(self.result)
            self._disconnectFromServer()
        return False

    def _path(self, address: str) -> bytes:
        return smtputf8.path(address, self._utf8)

    def _mail_from_line(self, sender: str) -> bytes:
        line = b"MAIL FROM:" + self._path(sender)
        return line + b" SMTPUTF8" if self._utf8 else line  # RFC 6531 3.4

    # --- RFC 2920 PIPELINING: MAIL, every RCPT and DATA in one write ---------

    _pipelining = False

    def _pipeline(self) -> None:
        sender = self.getMailFrom()
        if sender is None:
            self._disconnectFromServer()
            return
        self._from = sender
        rcpts = self.getMailTo()
        self.toAddressesResult = []
        self.successAddresses = []
        self._mail_reply: tuple[int, bytes] | None = None
        self._awaiting = [(b"MAIL", None)] + [(b"RCPT", r) for r in rcpts] + [(b"DATA", None)]
        lines = [self._mail_from_line(sender)]
        lines += [b"RCPT TO:" + self._path(r) for r in rcpts]
        lines.append(b"DATA")
        transport: Any = self.transport
        transport.write(b"".join(line + b"\r\n" for line in lines))
        # Twisted's SMTPClient only tests ``code in self._expected`` and sets
        # ranges and dicts there itself; its annotation says list[int].
        self._expected = range(0, 1000)  # type: ignore[assignment]
        self._okresponse = self._failresponse = self._pipelined_reply

    def _pipelined_reply(self, code: int, resp: bytes) -> None:
        """The replies to a pipelined group, in order (RFC 2920 3.1)."""
        command, rcpt = self._awaiting.pop(0)
        if command == b"MAIL":
            self._mail_reply = (code, resp)
            if code == 250:
                self.result.stage = RCPT
            return
        if command == b"RCPT":
            self.toAddressesResult.append((rcpt, code, resp))
            if code in smtp.SUCCESS:
                self.successAddresses.append(rcpt)
            return
        # DATA, the last of the group: every reply is in.
        assert self._mail_reply is not None
        mail_code, mail_resp = self._mail_reply
        if mail_code != 250:
            # MAIL refused: its reply is every recipient's; the RCPT and DATA
            # replies only say there was no transaction.
            self.toAddressesResult = []
            self.smtpTransferFailed(mail_code, mail_resp)
        elif not self.successAddresses:
            # RFC 2920 3.1: DATA must then fail; any 354 is ended by the disconnect.
            self.smtpState_msgSent(code, "No recipients accepted")
        else:
            self.result.stage = DATA
            if code == 354:
                self.smtpState_data(code, resp)
            else:
                self.smtpTransferFailed(code, resp)

    def smtpState_to(self, code: int, resp: bytes) -> None:
        self.result.stage = RCPT
        return super().smtpState_to(code, resp)

    def smtpState_toOrData(self, code: int, resp: bytes) -> None:
        """Twisted's, with our paths (L{_path}) in RCPT TO."""
        if self.lastAddress is not None:
            self.toAddressesResult.append((self.lastAddress, code, resp))
            if code in smtp.SUCCESS:
                self.successAddresses.append(self.lastAddress)
        try:
            self.lastAddress = next(self.toAddresses)
        except StopIteration:
            if self.successAddresses:
                self.sendLine(b"DATA")
                self._expected = [354]
                self._okresponse = self.smtpState_data
                self.result.stage = DATA
            else:
                self.smtpState_msgSent(code, "No recipients accepted")
        else:
            self.sendLine(b"RCPT TO:" + self._path(self.lastAddress))

    # --- the transaction --------------------------------------------------

    def getMailFrom(self) -> str | None:
        if self._sent_from:
            return None
        self._sent_from = True
        return self.session.sender

    def getMailTo(self) -> Sequence[str]:
        return list(self.session.recipients if self._to is None else self._to)

    def getMailData(self) -> Any:
        return self.session.message

    def smtpState_data(self, code: int, resp: bytes) -> None:
        sender = _BodySender(
            self.session.message,
            self.transport,
            self.session.reactor,
            self.session.pool,
            self.resetTimeout,
        )

        def sent(last: bytes) -> None:
            self.result.stage = DOT
            self.finishedFileTransfer(last)

        def failed(f: Failure) -> None:
            if self.result.stage != DONE and self.transport is not None:
                self.transport.loseConnection()  # type: ignore[misc]

        sender.start().addCallbacks(sent, failed)
        self._expected = smtp.SUCCESS  # type: ignore[assignment]
        self._okresponse = self.smtpState_msgSent

    def smtpState_msgSent(self, code: int, resp: Any) -> None:
        stage = self.result.stage
        reply = RemoteReply(code, _text(resp), _STAGE_COMMAND.get(stage, stage))
        for addr, rcode, rresp in self.toAddressesResult:
            addr = addr.decode() if isinstance(addr, bytes) else str(addr)
            if not (200 <= rcode < 300):
                self.result.replies[addr] = RemoteReply(rcode, _text(rresp), "RCPT TO")
        for addr in self.session.recipients:
            if addr not in self.result.replies and stage in (MAIL, DATA, DOT):
                self.result.replies[addr] = reply
        self.result.stage = DONE if stage == DOT else stage
        self.toAddressesResult = []
        self._from = None
        if self.cache is not None and self.result.stage == DONE:
            # The transaction is complete (RFC 5321 3.3): keep the connection for
            # the next message to this destination, parked before the result is
            # reported, so the next session finds it instead of connecting anew.
            self._park()
            self.session.finish(self.result)
        else:
            self.session.finish(self.result)
            self._disconnectFromServer()

    # --- connection reuse ---------------------------------------------------

    cache: ConnectionCache[RelayClient] | None = None
    _idle_call: Any = None

    def _park(self) -> None:
        assert self.cache is not None
        # A reply while idle (a 421 before the server closes): give the connection up.
        self._expected = range(0, 1000)  # type: ignore[assignment]
        self._okresponse = self._failresponse = lambda code, resp: self.quit_idle()
        self._idle_call = self.session.reactor.callLater(self.cache.idle_time, self.quit_idle)
        self.cache.park(self)

    def quit_idle(self) -> None:
        """Close an idle connection (the cache's time is up, or we are stopping)."""
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self.cache is not None:
            self.cache.forget(self)
        self._disconnectFromServer()

    def start_transaction(self, session: Session) -> None:
        """Run C{session}'s transaction on this idle connection."""
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        session.protocol_instance = self
        self.session = session
        self.result = SessionResult(session.hop, stage=MAIL, tls=self._tlsMode, reused=True)
        self._sent_from = False
        self.smtpState_from(250, b"")

    def sendError(self, exc: Exception) -> None:
        code = getattr(exc, "code", -1)
        resp = getattr(exc, "resp", None) or str(exc)
        stage = self.result.stage
        if isinstance(exc, smtp.TLSRequiredError):
            text = "TLS is required, but was not offered by host"
            reply = RemoteReply(0, f"4.7.4 {text}", "EHLO")
        elif code is not None and code > 0:
            reply = RemoteReply(code, _text(resp), _STAGE_COMMAND.get(stage, stage))
        else:
            reply = RemoteReply(0, f"4.4.2 {_text(resp)}", _STAGE_COMMAND.get(stage, stage))
        if (
            isinstance(
                exc, smtp.AUTHDeclinedError | smtp.AuthenticationError | smtp.AUTHRequiredError
            )
            and reply.permanent
        ):
            # A refused login is our configuration's fault: retry, do not bounce.
            reply = RemoteReply(0, f"4.7.0 {str(reply)}", "AUTH")
        if isinstance(exc, smtp.TLSError) or stage == STARTTLS:
            self.result.tls_failed = True
        for addr in self.session.recipients:
            self.result.replies.setdefault(addr, reply)
        self.session.finish(self.result)
        super().sendError(exc)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        super().connectionLost(reason)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        if self.cache is not None:
            self.cache.forget(self)
        if self.session.finished:
            return
        stage = self.result.stage
        if stage == STARTTLS:
            self.result.tls_failed = True
        why = reason.getErrorMessage() if reason is not None else "connection lost"
        reply = RemoteReply(
            0,
            f"4.4.2 lost connection with {self.session.hop.host} while "
            f"sending {_STAGE_COMMAND.get(stage, stage)}: {why}",
            "",
        )
        for addr in self.session.recipients:
            self.result.replies.setdefault(addr, reply)
        self.session.finish(self.result)


class Session(protocol.ClientFactory):
    """
    One attempt to hand C{recipients} of a message to one L{Hop}; C{result}
    fires with the L{SessionResult} (it never fails).
    """

    log = SafeLogger()
    noisy = False

    def __init__(
        self,
        *,
        reactor: Any,
        pool: Any,
        hop: Hop,
        helo: str,
        sender: str,
        recipients: Sequence[str],
        message: Any,
        tls_context: Any = None,
        require_tls: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
        cache: ConnectionCache[RelayClient] | None = None,
        cache_key: Any = None,
        utf8_header: bool = False,
    ) -> None:
        """
        C{utf8_header}: the message's header holds UTF-8 and it was received
        with SMTPUTF8, so it needs a next hop that offers SMTPUTF8 (RFC 6532).
        """
        self.reactor = reactor
        self.pool = pool
        self.hop = hop
        self.helo = helo.encode("idna") if not helo.isascii() else helo.encode()
        self.sender = sender
        self.recipients = list(recipients)
        self.message = message
        self.tls_context = tls_context
        self.require_tls = require_tls
        self.username = username
        self.password = password
        self.timeout = timeout
        self.cache = cache
        self.cache_key = cache_key
        self.utf8_header = utf8_header
        self.finished = False
        self.result: defer.Deferred = defer.Deferred()
        self.protocol_instance: RelayClient | None = None

    def run_on(self, client: RelayClient) -> defer.Deferred:
        """Run the transaction on an idle kept connection; fires with the L{SessionResult}."""
        client.start_transaction(self)
        return self.result

    def buildProtocol(self, addr: Any) -> RelayClient:
        p = RelayClient(
            self,
            self.helo,
            self.tls_context,
            None if self.password is None else self.password.encode(),
            None if self.username is None else self.username.encode(),
        )
        p.factory = self
        p.cache = self.cache
        if self.cache is not None:
            self.cache.key_for(p, self.cache_key)
        p.timeout = self.timeout  # type: ignore[assignment]
        p.callLater = self.reactor.callLater  # type: ignore[method-assign]  # our clock
        self.protocol_instance = p
        return p

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        result = SessionResult(self.hop, stage=CONNECT)
        reply = RemoteReply(0, f"4.4.1 connect to {self.hop}: {reason.getErrorMessage()}", "")
        for addr in self.recipients:
            result.replies[addr] = reply
        self.finish(result)

    def finish(self, result: SessionResult) -> None:
        if not self.finished:
            self.finished = True
            self.result.callback(result)

    def connect(self, connect_timeout: float) -> defer.Deferred:
        """Connect and run the session; fires with the L{SessionResult}."""
        self.reactor.connectTCP(self.hop.address, self.hop.port, self, timeout=connect_timeout)
        return self.result
