"""
The POP3 server: Twisted's L{pop3.POP3} over our store.

RFC 1939 (POP3), RFC 2449 (CAPA, response codes), RFC 2595 (STLS),
RFC 3206 (SYS and AUTH response codes), RFC 5034 (SASL AUTH), RFC 4616 (PLAIN).

Twisted's server lacks STLS, names PIPELINING wrongly, advertises joke
capabilities, does not hold pipelined commands during a login, byte-stuffs
only inside each chunk and sends a message in pieces over several reactor
turns. This subclass keeps its timeouts, its logout-on-disconnect and the
IMailboxPOP3 avatar contract, and replaces the command handling: each reply
is one write, handed to the socket at once, and a sequential download finds
its next messages already read (off the reactor thread).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.cred.error import LoginDenied
from twisted.internet import defer, protocol, threads
from twisted.mail import pop3
from twisted.mail.interfaces import IMailboxPOP3
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.auth import sasl
from mailsrv.auth.policy import is_tls, peer_host
from mailsrv.deadline import HandshakeDeadlineMixin
from mailsrv.eager import send_now
from mailsrv.interfaces import SEEN, FolderError, MessageInfo
from mailsrv.logsafe import SafeLogger
from mailsrv.session import BadCommands, IdleClose, OutputFlow, TLSGate
from mailsrv.store.names import INBOX, normalize_user

IMPLEMENTATION = b"mailsrv"
MAX_LINE = 8192  # RFC 2449 4: 255 octets for commands; SASL responses need more
WHOLE_MESSAGE = 256 * 1024  # messages up to this size are read and sent in one piece
CHUNK = 64 * 1024
MAX_PIPELINED = 64  # stop reading while this many commands wait
READ_AHEAD = 48  # messages held ready ahead of a sequential RETR download
READ_AHEAD_MAX_SIZE = 64 * 1024  # larger ones are read when asked for (<= 3 MB ahead)
LISTING_PIECE = 2048  # LIST/UIDL lines per write (~50 KB)
OPEN_PER_RETR = 2  # messages chosen to read ahead after each RETR
READ_BATCH = 16  # messages read per trip to the pool

# Replies, worded like Dovecot's where clients may match on them.
GREETING = b"+OK mailsrv ready."
AUTH_FAILED = b"-ERR [AUTH] Authentication failed"
PLAINTEXT_DISALLOWED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections"
THROTTLED = b"-ERR [AUTH] Too many failed logins from your address, try again later."
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
SYS_TEMP = b"-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information."
TOO_MANY_ERRORS = b"-ERR Too many invalid commands."
TIMED_OUT = b"-ERR Disconnected for inactivity."
NO_SUCH_MESSAGE = b"-ERR There's no message %d."
DELETED = b"-ERR Message is deleted."
GONE = b"-ERR Message no longer exists."


class MaildropInUse(LoginDenied):
    """Another POP3 session holds this maildrop (RFC 2449 8.1.1 IN-USE)."""


class MaildropLocks:
    """
    Which maildrops have a POP3 session, so that a second one is refused.
    One object is shared by the pop3 and pop3s listeners.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()

    def acquire(self, user: str) -> bool:
        if user in self._held:
            return False
        self._held.add(user)
        return True

    def release(self, user: str) -> None:
        self._held.discard(user)

    def held(self, user: str) -> bool:
        return user in self._held


def uidl(info: MessageInfo, uid_validity: int) -> bytes:
    """The unique-id listing of a message: Dovecot's C{%08Xu%08Xv}, stable while UIDs are."""
    return b"%08X%08X" % (info.uid, uid_validity)


def dot_stuff(data: bytes, at_line_start: bool = True) -> bytes:
    """RFC 1939 3: double a leading '.' on each line of CRLF text."""
    if at_line_start and data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def terminator(last: bytes) -> bytes:
    """The end of a multi-line reply after data ending in C{last}."""
    return b".\r\n" if last.endswith(b"\r\n") else b"\r\n.\r\n"


def top_of(data: bytes, lines: int) -> bytes:
    """The header block and the first C{lines} body lines of a CRLF message (RFC 1939 7 TOP)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    pos = end + 4
    for _ in range(lines):
        nl = data.find(b"\r\n", pos)
        if nl < 0:
            return data
        pos = nl + 2
    return data[:pos]


@implementer(IMailboxPOP3)
class Maildrop:
    """
    One POP3 session's maildrop: the INBOX as it was at login, with the
    messages marked for deletion. Mail delivered later is neither shown nor
    touched; QUIT expunges the marked messages by UID.
    """

    log = SafeLogger()

    def __init__(self, folder: Any, release: Callable[[], None]) -> None:
        self.folder = folder  # IFolder
        self.user: str = folder.user
        self.uid_validity: int = folder.uid_validity
        self.infos: list[MessageInfo] = folder.messages()
        self.deleted: set[int] = set()  # 0-based indexes
        self.retrieved: set[int] = set()  # 0-based indexes of messages sent by RETR
        self._release: Callable[[], None] | None = release
        self._busy: defer.Deferred | None = None

    # --- our API --------------------------------------------------------------

    def info(self, index: int) -> MessageInfo:
        """The message at 0-based C{index}; IndexError if none, KeyError if deleted."""
        if index < 0:
            raise IndexError(index)
        info = self.infos[index]
        if index in self.deleted:
            raise KeyError(index)
        return info

    def numbered(self, column: str) -> Any:
        """(1-based number, C{uid} or C{size}) of the messages not marked deleted (an iterator)."""
        infos = self.infos
        values = getattr(infos, column + "s", None)  # an InfoList's array: no MessageInfo made
        if values is None:
            values = [getattr(m, column) for m in infos]
        deleted = self.deleted
        return ((i + 1, v) for i, v in enumerate(values) if not deleted or i not in deleted)

    def live(self) -> list[tuple[int, MessageInfo]]:
        """(1-based number, info) of the messages not marked deleted."""
        return [(i + 1, m) for i, m in enumerate(self.infos) if i not in self.deleted]

    def commit(self) -> defer.Deferred:
        """
        The UPDATE state: expunge the marked messages, then flag the retrieved
        ones \\Seen (as Dovecot does, so IMAP shows them read). Fires with the
        UIDs removed.
        """
        uids = [self.infos[i].uid for i in sorted(self.deleted)]
        seen = {self.infos[i].uid for i in self.retrieved if i not in self.deleted}

        def expunge(_: Any) -> Any:
            # A rebuilt index renumbers the folder: the UIDs of the login no
            # longer name the messages DELE'd, so remove nothing (RFC 1939 6: -ERR).
            if self.folder.uid_validity != self.uid_validity:
                raise FolderError("UIDVALIDITY changed since login")
            return self.folder.expunge(uids)

        d: defer.Deferred = (
            defer.maybeDeferred(self.folder.refresh).addCallback(expunge)
            if uids
            else defer.succeed([])
        )
        if seen:
            d.addCallback(self._mark_seen, seen)
        self._busy = d

        def done(result: Any) -> Any:
            self._busy = None
            return result

        return d.addBoth(done)

    def _mark_seen(self, removed: list[int], uids: set[int]) -> defer.Deferred:
        def changes(_: Any) -> Any:
            # Flags as they are now: an IMAP session may have changed them meanwhile.
            new = {
                m.uid: m.flags | {SEEN}
                for m in self.folder.messages()
                if m.uid in uids and SEEN not in m.flags
            }
            return self.folder.set_flags(new) if new else None

        def failed(f: Failure) -> None:
            # The deletions are done; a flag is not worth an -ERR.
            self.log.failure("pop3 could not flag messages seen for {user}", f, user=self.user)

        d = defer.maybeDeferred(self.folder.refresh).addCallback(changes)
        return d.addErrback(failed).addCallback(lambda _: removed)

    def logout(self) -> None:
        """End the session: close the folder and free the maildrop, after any expunge."""
        if self._busy is not None:
            self._busy.addBoth(self._close_after)
        else:
            self._close()

    def _close_after(self, result: Any) -> Any:
        self._close()
        return result

    def _close(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        try:
            self.folder.close()
        finally:
            release()

    # --- twisted.mail's IMailboxPOP3 ------------------------------------------

    def listMessages(self, index: int | None = None) -> Any:
        if index is None:
            return [0 if i in self.deleted else m.size for i, m in enumerate(self.infos)]
        try:
            return self.info(index).size
        except KeyError:
            return 0
        except IndexError:
            raise ValueError(index)

    def getMessage(self, index: int) -> Any:
        try:
            return self.folder.open_message(self.info(index).uid)
        except (IndexError, KeyError):
            raise ValueError(index)

    def getUidl(self, index: int) -> bytes:
        try:
            return uidl(self.info(index), self.uid_validity)
        except (IndexError, KeyError):
            raise ValueError(index)

    def deleteMessage(self, index: int) -> None:
        try:
            self.info(index)
        except (IndexError, KeyError):
            raise ValueError(index)
        self.deleted.add(index)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> defer.Deferred:
        return self.commit()


def open_maildrop(store: Any, locks: MaildropLocks, user: str) -> defer.Deferred:
    """The realm's POP3 avatar factory: lock the user's maildrop and open the INBOX."""
    user = normalize_user(user)
    if not locks.acquire(user):
        return defer.fail(MaildropInUse("maildrop in use"))
    d = defer.maybeDeferred(store.open_folder, user, INBOX)

    def opened(folder: Any) -> Maildrop:
        return Maildrop(folder, partial(locks.release, user))

    def failed(f: Failure) -> Failure:
        locks.release(user)
        return f

    return d.addCallbacks(opened, failed)


class POP3Server(HandshakeDeadlineMixin, pop3.POP3):
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
        while lines and self.blocked is None and not self._closed:
            self._handle(lines.pop(0))
            if self._tls_started:
                lines.clear()  # RFC 2595 4: sent in the clear before the handshake
        if self.blocked is not None:
            self.blocked.extend(lines)

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
        self._login(sasl.Credentials(b"", user, rest), b"USER")

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
        self.log.info(
            "pop3 login {user} from {client}: {result} (method={method}, tls={tls}, "
            "messages={count})",
            user=user,
            client=self.peer,
            result=result,
            method=self._method,
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

    # --- TRANSACTION state (RFC 1939 5) -----------------------------------------

    def pop3_STAT(self, rest: bytes) -> None:
        count = total = 0
        for _n, size in self.mbox.numbered("size"):
            count += 1
            total += size
        self.ok(b"%d %d" % (count, total))

    def _send_listing(self, first: bytes, lines: Any) -> None:
        """
        A multi-line reply of C{lines} (an iterator), written a piece at a time as
        the client reads (a 100,000-message UIDL is not built in memory at once);
        later pipelined commands wait for it.
        """
        d = self._write_listing(first, lines)
        if not d.called:
            self._long(d)

    @defer.inlineCallbacks
    def _write_listing(self, first: bytes, lines: Any) -> Any:
        producer = OutputFlow()
        self.transport.registerProducer(producer, True)
        try:
            piece = [first]
            for line in lines:
                piece.append(line)
                if len(piece) >= LISTING_PIECE:
                    self.send(*piece)
                    piece = []
                    if producer.paused:
                        yield producer.wait()
                    if producer.stopped or self._closed:
                        return
            piece.append(b".")
            self.send(*piece)
        finally:
            if not self._closed:
                self.transport.unregisterProducer()

    def pop3_LIST(self, rest: bytes) -> None:
        if rest.strip():
            i = self._message_number(rest)
            if i is not None:
                self.ok(b"%d %d" % (i + 1, self.mbox.infos[i].size))
            return
        count = len(self.mbox.infos) - len(self.mbox.deleted)
        self._send_listing(
            b"+OK %d messages:" % count, (b"%d %d" % nv for nv in self.mbox.numbered("size"))
        )

    def pop3_UIDL(self, rest: bytes) -> None:
        v = self.mbox.uid_validity
        if rest.strip():
            i = self._message_number(rest)
            if i is not None:
                self.ok(b"%d %s" % (i + 1, uidl(self.mbox.infos[i], v)))
            return
        self._send_listing(
            b"+OK", (b"%d %08X%08X" % (n, uid, v) for n, uid in self.mbox.numbered("uid"))
        )

    def pop3_DELE(self, rest: bytes) -> None:
        i = self._message_number(rest)
        if i is not None:
            self.mbox.deleteMessage(i)
            self.ok(b"Marked to be deleted.")

    def pop3_RSET(self, rest: bytes) -> None:
        self.mbox.undeleteMessages()
        self.ok()

    def pop3_RETR(self, rest: bytes) -> Any:
        i = self._message_number(rest)
        if i is None:
            return None
        info = self.mbox.infos[i]
        self.mbox.retrieved.add(i)
        if info.size > WHOLE_MESSAGE:
            return self._long(self._stream(info))
        first = b"+OK %d octets" % info.size
        data = self._cache.pop(i, None)
        if data is not None:  # read ahead: answer at once
            self._send_whole(data, first)
            self._read_ahead(i)
            return None
        d = self._read(i)
        d.addCallback(self._send_whole, first)
        d.addCallback(lambda _: self._read_ahead(i))
        return self._long(d)

    def pop3_TOP(self, rest: bytes) -> Any:
        number, _, count = rest.strip().partition(b" ")
        try:
            lines = int(count)
            if lines < 0:
                raise ValueError
        except ValueError:
            return self.bad(b"Invalid number of lines: " + count[:40])
        i = self._message_number(number)
        if i is None:
            return None
        d = self._read_now([i], lines).addCallback(lambda got: got.get(i))
        d.addCallback(self._send_whole, b"+OK")
        return self._long(d)

    def pop3_QUIT(self, rest: bytes) -> Any:
        if self.mbox is None:
            self.ok(b"Logging out.")
            self.transport.loseConnection()
            return None
        deleting = len(self.mbox.deleted)
        d = self.mbox.commit()

        def done(removed: list[int]) -> None:
            self.log.info(
                "pop3 logout {user} from {client}: {count} deleted",
                user=self.mbox.user,
                client=self.peer,
                count=len(removed),
            )
            self.ok(b"Logging out, messages deleted." if deleting else b"Logging out.")
            self.transport.loseConnection()

        def failed(f: Failure) -> None:
            # RFC 1939 6: -ERR when some deleted messages were not removed.
            self.log.failure("pop3 expunge for {user} failed", f, user=self.mbox.user)
            self.send(SYS_TEMP)
            self.transport.loseConnection()

        d.addCallbacks(done, failed)
        return self._long(d)

    # --- sending messages ---------------------------------------------------------

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(self.ctx.reactor, self.ctx.threadpool, f, *args)

    def _read(self, index: int) -> defer.Deferred:
        """Fire with message C{index}'s CRLF bytes, or None if it is gone."""
        data = self._cache.pop(index, None)
        if data is not None:
            return defer.succeed(data)
        if any(i == index for i, _, _ in self._opened):
            self._submit()
        if index in self._batch:
            d: defer.Deferred = defer.Deferred()
            self._batch_waiters.append((index, d))
            return d
        return self._read_now([index], None).addCallback(lambda got: got.get(index))

    def _read_now(self, indexes: list[int], top: int | None) -> defer.Deferred:
        """Read messages in one trip to the pool; fire with index -> bytes (gone ones left out)."""
        infos = self.mbox.infos
        wanted = [(i, infos[i].uid, infos[i].size) for i in indexes]
        return self._in_thread(_read_files, self.mbox.folder, wanted, top)

    def _read_ahead(self, index: int) -> None:
        """
        After RETR C{index}, get the messages a sequential download asks for
        next: choose a couple per RETR and read them in batches, one trip to
        the pool per batch (the message bytes are never read on the reactor
        thread), so that most RETRs find their message in memory.
        """
        mbox = self.mbox
        if self._closed or mbox is None:
            return
        if self._ahead_until <= index:  # the first RETR, or the client jumped ahead
            self._ahead_until = index + 1
        if len(self._cache) > READ_AHEAD:  # the client skipped around: drop what it passed
            for i in [i for i in self._cache if i <= index]:
                del self._cache[i]
        limit = min(len(mbox.infos), index + 1 + READ_AHEAD)
        opened = 0
        while opened < OPEN_PER_RETR and self._ahead_until < limit:
            i = self._ahead_until
            info = mbox.infos[i]
            if info.size > READ_AHEAD_MAX_SIZE:
                break  # read when asked for
            self._ahead_until += 1
            if i in mbox.deleted or i in self._cache:
                continue
            self._opened.append((i, info.uid, info.size))
            opened += 1
        if self._opened and (
            len(self._opened) >= READ_BATCH
            or self._opened[0][0] <= index + READ_BATCH  # needed soon
        ):
            self._submit()

    def _submit(self) -> None:
        """Read the messages chosen to read ahead in one trip to the pool."""
        wanted, self._opened = self._opened, []
        indexes = {i for i, _, _ in wanted}
        self._batch |= indexes
        d = self._in_thread(_read_files, self.mbox.folder, wanted, None)
        d.addBoth(self._batch_done, indexes)

    def _batch_done(self, result: dict[int, bytes] | Failure, indexes: set[int]) -> None:
        self._batch -= indexes
        waiters = [(i, d) for i, d in self._batch_waiters if i in indexes]
        self._batch_waiters = [(i, d) for i, d in self._batch_waiters if i not in indexes]
        if isinstance(result, Failure):
            # Read each again on its own, so that its RETR reports the error.
            for i, d in waiters:
                self._read(i).chainDeferred(d)
            return
        if not self._closed:
            self._cache.update(result)
        for i, d in waiters:
            d.callback(self._cache.pop(i, None))

    def _send_whole(self, data: bytes | None, first: bytes) -> None:
        """The status line, the stuffed message and the terminator, in one write."""
        if data is None:
            return self.error(GONE)
        if not self._closed:
            send_now(self.transport, first + b"\r\n" + dot_stuff(data) + terminator(data))
        return None

    @defer.inlineCallbacks
    def _stream(self, info: MessageInfo) -> Any:
        """Send a large message chunk by chunk, reading each off the reactor thread."""
        try:
            fp = yield self._in_thread(self.mbox.folder.open_message, info.uid)
        except KeyError:
            self.error(GONE)
            return
        if self._closed:
            yield self._in_thread(fp.close)
            return
        producer = OutputFlow()
        self.transport.registerProducer(producer, True)
        try:
            head = b"+OK %d octets\r\n" % info.size
            tail = b"\r\n"
            left = info.size
            while left > 0:
                try:
                    chunk = yield self._in_thread(fp.read, min(CHUNK, left))
                except Exception:
                    if head:  # nothing sent yet: the client gets an -ERR
                        raise
                    # Half a message is out: only closing tells the client it is incomplete.
                    self.log.failure(
                        "pop3 {user}: reading message {uid} failed",
                        user=self.mbox.user,
                        uid=info.uid,
                    )
                    self.transport.loseConnection()
                    return
                if not chunk or producer.stopped or self._closed:
                    break
                left -= len(chunk)
                out = dot_stuff(tail + chunk, at_line_start=False)[len(tail) :]
                tail = (tail + chunk)[-2:]
                self.transport.write(head + out)
                head = b""
                self.resetTimeout()
                yield producer.wait()
            if left > 0 and not self._closed:
                # The message shrank under us: the client cannot trust what it got.
                self.log.error(
                    "pop3 {user}: message {uid} truncated on disk",
                    user=self.mbox.user,
                    uid=info.uid,
                )
                self.transport.loseConnection()
                return
            if not self._closed:
                self.transport.write(terminator(tail))
        finally:
            if not self._closed:
                self.transport.unregisterProducer()
            yield self._in_thread(fp.close)


def _read_files(
    folder: Any, wanted: list[tuple[int, int, int]], top: int | None
) -> dict[int, bytes]:
    """
    Open and read messages (in a pool thread: opening reads message bytes too):
    index -> bytes, messages gone left out; for TOP, only enough lines.
    """
    out = {}
    for index, uid, size in wanted:
        try:
            fp = folder.open_message(uid)
        except KeyError:
            continue
        try:
            out[index] = fp.read(size) if top is None else _read_top(fp, top)
        finally:
            fp.close()
    return out


def _read_top(fp: Any, top: int) -> bytes:
    data = b""
    while True:
        chunk = fp.read(CHUNK)
        data += chunk
        if not chunk:
            return top_of(data, top)
        cut = top_of(data, top)
        if len(cut) < len(data):
            return cut


class POP3Factory(protocol.ServerFactory):
    """Builds L{POP3Server} sessions sharing one context and one set of maildrop locks."""

    noisy = False

    def __init__(self, ctx: Any, locks: MaildropLocks, implicit_tls: bool = False) -> None:
        self.ctx = ctx
        self.locks = locks
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> POP3Server:
        p = POP3Server(self.ctx, self.locks, self.implicit_tls)
        p.factory = self
        return p


def pop3_factory(ctx: Any, implicit_tls: bool = False) -> POP3Factory:
    """
    The POP3 factory for a listener; service.py wraps it in TLS for pop3s.
    The first call registers the POP3 avatar with the realm and puts the
    maildrop locks on C{ctx.pop3_locks}, shared by every listener.
    """
    locks = getattr(ctx, "pop3_locks", None)
    if locks is None:
        locks = MaildropLocks()
        ctx.pop3_locks = locks
        ctx.portal.realm.register(IMailboxPOP3, partial(open_maildrop, ctx.store, locks))
    return POP3Factory(ctx, locks, implicit_tls)
