"""
The IMAP4rev1 server (RFC 3501): Twisted's L{imap4.IMAP4Server}, extended
with UIDPLUS (RFC 4315), MOVE (RFC 6851), LITERAL+ (RFC 7888), SPECIAL-USE
(RFC 6154), ENABLE (RFC 5161), ID (RFC 2971), CHILDREN (RFC 3348), UNSELECT
(RFC 3691) and SASL-IR (RFC 4959), over our L{IMailStore}.

Twisted's server supplies the line and literal machinery, the command
dispatch by state and the argument parsers; the commands themselves are
re-done in L{mailsrv.imap.commands} so that every store call is
asynchronous, FETCH streams from disk with flow control, and responses are
byte-exact. This module is the connection: its state, the command loop,
login and STARTTLS, and the factory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol, task, threads
from twisted.mail import imap4

from mailsrv import loglines
from mailsrv.auth import sasl
from mailsrv.auth.policy import peer_host
from mailsrv.deadline import HandshakeDeadlineMixin
from mailsrv.imap import twistedcompat
from mailsrv.imap.account import Account, Subscriptions, subscriptions_path
from mailsrv.imap.commands.append import CAPABILITIES as APPEND_CAPABILITIES
from mailsrv.imap.commands.append import AppendCommand
from mailsrv.imap.commands.context import CAPABILITIES as CONTEXT_CAPABILITIES
from mailsrv.imap.commands.fetch import BoundedCache, FetchCommand
from mailsrv.imap.commands.general import UTF8_ACCEPT, GeneralCommands
from mailsrv.imap.commands.idle import IdleCommand
from mailsrv.imap.commands.mailboxes import MailboxCommands
from mailsrv.imap.commands.notify import CAPABILITIES as NOTIFY_CAPABILITIES
from mailsrv.imap.commands.notify import NotifyCommands
from mailsrv.imap.commands.quota import CAPABILITIES as QUOTA_CAPABILITIES
from mailsrv.imap.commands.quota import QuotaCommands
from mailsrv.imap.commands.selected import SelectedCommands
from mailsrv.imap.commands.sort import CAPABILITIES as SORT_CAPABILITIES
from mailsrv.imap.commands.sort import SORT_CACHE_MESSAGES, SortCommands
from mailsrv.imap.commands.urlauth import CAPABILITIES as URLAUTH_CAPABILITIES
from mailsrv.imap.commands.urlauth import UrlauthCommands
from mailsrv.imap.condstore import CAPABILITIES as CONDSTORE_CAPABILITIES
from mailsrv.imap.parsing import CommandParser
from mailsrv.imap.parsing import SpoolLiteral as _SpoolLiteral
from mailsrv.imap.rev2 import CAPABILITIES as REV2_CAPABILITIES
from mailsrv.imap.sortfields import SortFieldCache
from mailsrv.imap.twistedcompat import PARSE_COMMAND, ResponseHook
from mailsrv.logsafe import SafeLogger
from mailsrv.session import BadCommands, IdleClose, OpenSessions, TLSGate
from mailsrv.store.userfeed import UserFeed

# Literal octets that restart the idle timer: a literal must arrive at 16 KiB
# per idle timeout (55 bytes/s with the default 5 minutes) or better.
LITERAL_PROGRESS = 16 * 1024

# The parsers the LOGIN entry of the command table below names (parsing.py).
arg_astring = CommandParser.arg_astring
arg_finalastring = CommandParser.arg_finalastring


class IMAPServer(
    HandshakeDeadlineMixin,
    GeneralCommands,
    MailboxCommands,
    AppendCommand,
    SortCommands,
    SelectedCommands,
    NotifyCommands,
    FetchCommand,
    IdleCommand,
    QuotaCommands,
    UrlauthCommands,
    CommandParser,
    ResponseHook,
    imap4.IMAP4Server,
):
    """
    One IMAP connection. The commands are mixins (L{mailsrv.imap.commands})
    over Twisted's server, which keeps only CAPABILITY and LOGOUT of its own.
    """

    log = SafeLogger()
    transport: Any
    callLater: Any
    mbox: Any = None  # the selected SessionMailbox
    _auth_exchange: Any = None  # the SASL exchange an AUTHENTICATE continues
    account: Any = None  # the logged-in Account
    IDENT = b"mailsrv IMAP4rev1 ready"
    MAX_LENGTH = 64 * 1024

    def __init__(self, factory: IMAPServerFactory) -> None:
        super().__init__(contextFactory=factory.tls)
        self.factory = factory
        self.callLater = factory.reactor.callLater  # TimeoutMixin, on our clock
        self.timeOut = factory.config.limits.timeout
        self.POSTAUTH_TIMEOUT = max(30 * 60, factory.config.limits.timeout)
        self._busy: bytes | None = None
        self._current_tag: bytes | None = None
        self._bad = BadCommands(factory.config.limits.max_errors)
        self._tls = TLSGate(factory.tls, factory.config.auth.cleartext, factory.implicit_tls)
        self._idle = IdleClose(factory.reactor)
        self._lost = False
        self._discarding: bytes | None = None
        self._idle_tag: bytes | None = None
        self._sync_d: defer.Deferred | None = None
        self._sync_again = False
        self._user: str | None = None
        self._literal_progress = 0  # literal bytes since the idle timer last restarted
        self._shutting_down = False

    # --- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass  # not TCP (tests), or TLS wrapping without the method
        self._tls.connected(self.transport)
        self.factory.open_sessions.opened(self)
        super().connectionMade()
        if self.factory.implicit_tls:
            self.start_handshake_deadline(self.timeOut)
        self.log.info("imap connection from {peer}", peer=peer_host(self.transport))

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        self.handshake_over()
        self._idle.connection_lost()
        self._close_mailbox()
        super().connectionLost(reason)
        self.factory.open_sessions.closed(self)
        pending = twistedcompat.pending_literal(self)
        if isinstance(pending, _SpoolLiteral):
            pending.source.discard()

    def timeoutConnection(self) -> None:
        self._idle.expire(
            self.transport, lambda: self.sendLine(b"* BYE Autologout; connection idle too long")
        )

    def _can_starttls(self) -> bool:
        return self._tls.can_start()

    def _cleartext_ok(self) -> bool:
        return self._tls.password_allowed()

    def listCapabilities(self) -> list[bytes]:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"NAMESPACE"]
        caps += [b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"CHILDREN", b"UNSELECT"]
        caps += SORT_CAPABILITIES
        caps += [b"ESEARCH", b"SEARCHRES"]  # RFC 4731, RFC 5182 (commands.selected)
        caps += CONTEXT_CAPABILITIES  # RFC 5267 4 (commands.context)
        caps.append(b"WITHIN")  # RFC 5032: OLDER, YOUNGER (imap.search)
        caps.append(b"APPENDLIMIT=%d" % self.factory.config.imap.max_literal_size)
        caps += QUOTA_CAPABILITIES  # RFC 9208
        caps += [b"LIST-EXTENDED", b"LIST-STATUS"]  # RFC 5258, RFC 5819
        caps.append(UTF8_ACCEPT)  # RFC 6855
        caps.append(b"BINARY")  # RFC 3516
        caps += CONDSTORE_CAPABILITIES  # RFC 7162 (mailsrv.imap.condstore)
        caps += URLAUTH_CAPABILITIES  # RFC 4467, RFC 5550 URL-PARTIAL
        caps += NOTIFY_CAPABILITIES  # RFC 5465
        caps += APPEND_CAPABILITIES  # RFC 3502 MULTIAPPEND, RFC 4469 CATENATE
        caps += REV2_CAPABILITIES  # RFC 9051 (mailsrv.imap.rev2), RFC 8438
        if self.state == "unauth":
            if self._can_starttls():
                caps.append(b"STARTTLS")
            if self._cleartext_ok():
                caps += [b"AUTH=" + m for m in sasl.MECHANISMS]
            else:
                caps.append(b"LOGINDISABLED")
        return caps

    # --- the command loop ---------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._discarding is not None:
            tag, self._discarding = self._discarding, None
            self._current_tag = self._busy = tag
            self.sendBadResponse(tag, b"Command line too long")
            return
        super().lineReceived(line)
        if (
            self._busy is not None
            and self.parseState == PARSE_COMMAND
            and not self.paused
            and not self._lost
            and not self.transport.disconnecting
        ):
            self.pauseProducing()  # one command at a time; the rest wait in the buffer

    def lineLengthExceeded(self, line: bytes) -> None:
        tag = line.split(b" ", 1)[0][:64] or b"*"
        end = line.find(b"\r\n")
        if end >= 0:
            self._current_tag = self._busy = tag
            self.sendBadResponse(tag, b"Command line too long")
            if twistedcompat.set_unread(self, line[end + 2 :]):
                self.callLater(0, self.dataReceived, b"")
        else:
            self._discarding = tag

    def parse_command(self, line: bytes) -> None:
        parts = line.split(None, 1)
        if parts:
            self._current_tag = self._busy = parts[0]
        try:
            super().parse_command(line)
        except Exception:
            self.log.failure("IMAP command failed")
            self.sendBadResponse(self._current_tag, b"Internal server error")

    def responded(self, state: bytes, tag: bytes | None) -> None:
        if state == b"BAD":
            if self._bad.bad() and not self._lost:
                self.sendLine(b"* BYE Too many invalid commands")
                self.transport.loseConnection()
                return
        elif tag and state in (b"OK", b"NO"):
            self._bad.good()
        if tag and tag != b"*" and tag == self._busy and state in (b"OK", b"NO", b"BAD"):
            self._busy = None
            self.command_done()  # what NOTIFY held back during the command
            if self._shutting_down:
                self._goodbye()
            elif self.paused and not self._lost:
                self.callLater(0, self._resume)

    def shut_down(self) -> None:
        """
        The server is stopping: C{* BYE} and close (RFC 3501 7.1.5), now
        (between commands, or in IDLE) or once the command under way has
        been answered (an APPEND being stored gets its OK first).
        """
        self._shutting_down = True
        if self._busy is None or self._idle_tag is not None:
            self._goodbye()

    def _goodbye(self) -> None:
        if self._lost or self.transport.disconnecting:
            return
        self.sendLine(b"* BYE Server shutting down.")
        self.transport.loseConnection()

    def _resume(self) -> None:
        if self.paused and self._busy is None and not self._lost:
            self.resumeProducing()

    def rawDataReceived(self, data: bytes) -> None:
        # A literal keeps the session alive only while it makes progress: one
        # trickled a byte at a time times out like an idle session.
        self._literal_progress += len(data)
        if self._literal_progress >= LITERAL_PROGRESS:
            self._literal_progress = 0
            self.resetTimeout()
        passon = twistedcompat.pending_literal(self).write(data)
        if passon is not None:
            self.setLineMode(passon)

    # --- not authenticated ----------------------------------------------------

    def do_STARTTLS(self, tag: bytes) -> None:
        if not self._can_starttls():
            self.sendBadResponse(tag, b"TLS is not available or already active")
            return
        # RFC 3501 6.2.1: nothing sent before the handshake counts afterwards.
        self.clearLineBuffer()
        self.sendPositiveResponse(tag, b"Begin TLS negotiation now")
        self._tls.start()
        self.startedTLS = True
        self.start_handshake_deadline(self.timeOut)

    unauth_STARTTLS = (do_STARTTLS,)  # type: ignore[assignment]

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        if not self._cleartext_ok():
            self.sendNegativeResponse(
                tag, b"[PRIVACYREQUIRED] Plaintext authentication disallowed without TLS"
            )
            return
        self._login(tag, sasl.Credentials(b"", user, passwd))

    unauth_LOGIN = (do_LOGIN, arg_astring, arg_finalastring)  # type: ignore[assignment]

    def do_AUTHENTICATE(self, tag: bytes, line: bytes | None) -> None:
        mech, _, initial = (line or b"").strip().partition(b" ")
        try:
            exchange = sasl.Exchange(mech)
        except sasl.UnknownMechanism:
            self.sendNegativeResponse(tag, b"Unsupported authentication mechanism")
            return
        if not self._cleartext_ok():
            self.sendNegativeResponse(
                tag, b"[PRIVACYREQUIRED] Plaintext authentication disallowed without TLS"
            )
            return
        self._sasl_step(tag, exchange, lambda: exchange.start(initial.strip() or None))

    unauth_AUTHENTICATE = (do_AUTHENTICATE, twistedcompat.arg_line)  # type: ignore[assignment]

    def _sasl_step(self, tag: bytes, exchange: sasl.Exchange, step: Callable[[], Any]) -> None:
        """One step of a SASL exchange: a C{+} challenge (RFC 3501 6.2.2), a BAD, or the login."""
        try:
            answer = step()
        except sasl.Cancelled:
            self.sendBadResponse(tag, b"Authentication cancelled")
            return
        except sasl.SASLError:
            self.sendBadResponse(
                tag, b"Malformed AUTHENTICATE " + exchange.mechanism + b" response"
            )
            return
        if isinstance(answer, sasl.Credentials):
            self._login(tag, answer, exchange.mechanism.decode("ascii", "replace"))
            return
        self._auth_tag = tag
        self._auth_exchange = exchange
        self.parseState = "auth_sasl"
        self.sendLine(b"+ " + answer)

    def parse_auth_sasl(self, line: bytes) -> None:
        self.parseState = PARSE_COMMAND
        exchange = self._auth_exchange
        self._auth_exchange = None
        self._sasl_step(self._auth_tag, exchange, lambda: exchange.respond(line))

    def _login(self, tag: bytes, creds: sasl.Credentials, method: str = "PLAIN") -> None:
        host = peer_host(self.transport)
        user = creds.authcid
        d = self.factory.authenticator.login(host, creds, imap4.IAccount)

        def ok(result: tuple[Any, Any, Any]) -> None:
            _, avatar, logout = result
            if self._lost:
                logout()
                return
            self.account = avatar
            twistedcompat.set_logout(self, logout)
            self._user = avatar.address
            self.state = "auth"
            self.setTimeout(self.POSTAUTH_TIMEOUT)
            self.log.info(
                loglines.LOGIN_OK,
                service="imap",
                user=loglines.bracketed(self._user),
                method=method,
                client=host,
                local=loglines.local_host(self.transport),
            )
            self.sendPositiveResponse(
                tag, b"[CAPABILITY " + b" ".join(self.listCapabilities()) + b"] Logged in"
            )

        def failed(failure: Any) -> None:
            result = sasl.outcome(failure)
            if result == sasl.THROTTLED:
                self.log.info(
                    loglines.LOGIN_THROTTLED,
                    service="imap",
                    user=loglines.bracketed(user),
                    method=method,
                    client=host,
                    local=loglines.local_host(self.transport),
                )
                if not self._lost:
                    self.sendNegativeResponse(
                        tag, b"[UNAVAILABLE] Too many failed logins; try later"
                    )
            elif result == sasl.FAILED:
                self.log.info(
                    loglines.LOGIN_FAILED,
                    service="imap",
                    user=loglines.bracketed(user),
                    method=method,
                    client=host,
                    local=loglines.local_host(self.transport),
                )
                if not self._lost:
                    self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
            else:
                if result == sasl.UNAVAILABLE:
                    self.log.error(
                        "imap login from {host}: {error}", host=host, error=failure.value
                    )
                else:
                    self.log.failure("imap login error", failure)
                if not self._lost:
                    self.sendNegativeResponse(
                        tag, b"[UNAVAILABLE] Temporary authentication failure"
                    )

        d.addCallbacks(ok, failed)


class IMAPServerFactory(protocol.Factory):
    """Builds L{IMAPServer}s; holds what they share (caches, store, portal)."""

    protocol = IMAPServer  # type: ignore[assignment]

    def __init__(
        self,
        *,
        config: Any,
        store: Any,
        portal: Any,
        reactor: Any,
        run: Callable[..., defer.Deferred],
        tls: Any = None,
        throttle: Any = None,
        implicit_tls: bool = False,
        cooperate: Callable[[], defer.Deferred] | None = None,
        training: Any = None,
        quota: Any = None,
    ) -> None:
        self.quota = quota  # the users' storage limits (mailsrv.store.quota), or None
        self.config = config
        self.training = training  # a TrainingQueue (mailsrv.filter.learn), or None
        self.store = store
        self.portal = portal
        self.reactor = reactor
        self.run = run
        self.tls = None if implicit_tls else tls
        self.throttle = throttle
        self.authenticator = sasl.Authenticator(
            portal, throttle, reactor, config.auth.failure_delay
        )
        self.implicit_tls = implicit_tls
        self.spool_dir = config.spool_dir
        self.envelopes = BoundedCache(100_000)  # ~45 MB at most
        self.structures = BoundedCache(5_000)
        self.sort_fields = SortFieldCache(SORT_CACHE_MESSAGES)  # SORT/THREAD header keys
        self.cooperate = cooperate or (lambda: task.deferLater(reactor, 0, lambda: None))
        self.open_sessions = OpenSessions(reactor)

    def shut_down(self) -> defer.Deferred:
        """The server stops: every session hears C{* BYE} and closes (a Deferred)."""
        return self.open_sessions.shut_down()

    def buildProtocol(self, addr: Any) -> IMAPServer:
        p = IMAPServer(self)
        p.factory = self
        return p


def account_factory(
    config: Any, store: Any, run: Callable[..., defer.Deferred], feed: UserFeed | None = None
) -> Callable[[str], defer.Deferred]:
    """
    The realm's factory for L{imap4.IAccount} avatars; C{feed} carries every
    session's subscription changes (NOTIFY), the server's for as long as it
    runs (across reloads), or one of this factory's own.
    """
    subscription_feed = feed if feed is not None else UserFeed()

    def make(address: str) -> defer.Deferred:
        path = subscriptions_path(config.server.data_dir, address)
        subs = Subscriptions(path, run, subscription_feed, address)
        return Account(address, store, subs, config.imap.special_folders, run).prepare()

    return make


def imap_factory(ctx: Any, implicit_tls: bool = False) -> IMAPServerFactory:
    """The IMAP listener's factory for a L{ServerContext} (service.py wraps implicit TLS)."""

    def run(f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        return threads.deferToThreadPool(ctx.reactor, ctx.threadpool, f, *args, **kw)

    feed = getattr(ctx, "subscriptions", None)
    ctx.portal.realm.register(imap4.IAccount, account_factory(ctx.config, ctx.store, run, feed))
    return IMAPServerFactory(
        config=ctx.config,
        store=ctx.store,
        portal=ctx.portal,
        reactor=ctx.reactor,
        run=run,
        tls=ctx.tls,
        throttle=ctx.throttle,
        implicit_tls=implicit_tls,
        training=ctx.training,
        quota=getattr(ctx, "quota", None),
    )
