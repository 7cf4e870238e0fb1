"""
The IMAP4rev1 server (RFC 3501): Twisted's L{imap4.IMAP4Server}, extended
with UIDPLUS (RFC 4315), MOVE (RFC 6851), LITERAL+ (RFC 7888), SPECIAL-USE
(RFC 6154), ENABLE (RFC 5161), ID (RFC 2971), CHILDREN (RFC 3348), UNSELECT
(RFC 3691) and SASL-IR (RFC 4959), over our L{IMailStore}.

Twisted's server supplies the line and literal machinery, the command
dispatch by state and the argument parsers; the commands themselves are
re-done here so that every store call is asynchronous, FETCH streams from
disk with flow control, and responses are byte-exact.
"""

from __future__ import annotations

import bisect
import calendar
import functools
import inspect
import itertools
import re
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from twisted.internet import defer, protocol, task, threads
from twisted.internet.interfaces import IPushProducer
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.auth import sasl
from mailsrv.auth.policy import peer_host
from mailsrv.deadline import HandshakeDeadlineMixin
from mailsrv.imap import mime
from mailsrv.imap.account import (
    Account,
    SessionMailbox,
    Subscriptions,
    list_pattern,
    subscriptions_path,
)
from mailsrv.imap.fetch import (
    STREAM_AT,
    FetchRequest,
    FetchSyntaxError,
    Section,
    Stream,
    internal_date,
    parse_fetch,
    read_range,
    section_bytes,
    skip,
)
from mailsrv.imap.search import BadCharset, Literal, Matcher, SearchError, needs, parse, tokenize
from mailsrv.interfaces import (
    DELETED,
    SEEN,
    SYSTEM_FLAGS,
    FolderError,
    MessageInfo,
)
from mailsrv.logsafe import SafeLogger
from mailsrv.session import BadCommands, TLSGate
from mailsrv.spool import SpooledSource, disk_full
from mailsrv.store.infos import flag_sets
from mailsrv.store.names import DELIMITER, INBOX, fits_on_disk

_LITERAL_RE = re.compile(rb"\{(\d{1,18})(\+?)\}$")
# Literal octets that restart the idle timer: a literal must arrive at 16 KiB
# per idle timeout (55 bytes/s with the default 5 minutes) or better.
LITERAL_PROGRESS = 16 * 1024
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}
_STATES = ("unauth", "auth", "select", "logout")
_LIST_PIECE = 500  # LIST/LSUB lines written at a time
_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")


class _BoundedCache:
    """A least-recently-used map with a size bound (envelopes, MIME structures)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._limit:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class SeqSet:
    """An IMAP sequence-set (RFC 3501 9: ``1,3:5,7:*``); ``*`` resolved late."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._ranges: list[tuple[int | None, int | None]] = []
        for p in raw.split(b","):
            lo, sep, hi = p.partition(b":")
            a = self._num(lo)
            b = self._num(hi) if sep else a
            self._ranges.append((a, b))

    @staticmethod
    def _num(v: bytes) -> int | None:
        if v == b"*":
            return None
        if not v.isdigit() or int(v) < 1:
            raise imap4.IllegalClientResponse("Invalid message set")
        return int(v)

    def ranges(self, last: int) -> list[tuple[int, int]]:
        out = []
        for a, b in self._ranges:
            a = last if a is None else a
            b = last if b is None else b
            out.append((min(a, b), max(a, b)))
        return out

    def max_number(self) -> int:
        return max((max(a or 0, b or 0) for a, b in self._ranges), default=0)

    def __contains__(self, item: Any) -> bool:  # only with a resolved last; see contains
        raise TypeError("use contains()")

    def contains(self, n: int, last: int) -> bool:
        return any(a <= n <= b for a, b in self.ranges(last))


class _Contains:
    def __init__(self, s: SeqSet, last: int) -> None:
        self._r = s.ranges(last)

    def __contains__(self, n: int) -> bool:
        return any(a <= n <= b for a, b in self._r)


@implementer(IPushProducer)
class _Flow:
    """Flow control for a long response: wait() until the transport wants more."""

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
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d


class _Discard:
    """Swallows the octets of a refused non-synchronizing literal."""

    def __init__(self, size: int) -> None:
        self.size = size

    def write(self, data: bytes) -> bytes | None:
        if len(data) < self.size:
            self.size -= len(data)
            return None
        rest = data[self.size :]
        self.size = 0
        return rest

    def callback(self, line: bytes) -> None:
        pass


class _SpoolLiteral:
    """An APPEND literal spooled to a L{SpooledSource}, CRLF turned to LF."""

    def __init__(self, size: int, d: defer.Deferred, source: SpooledSource) -> None:
        self.size = size
        self.defer = d
        self.source = source
        self._cr = False

    def write(self, data: bytes) -> bytes | None:
        take, rest = data[: self.size], data[self.size :]
        self.size -= len(take)
        if self._cr:
            take = b"\r" + take
            self._cr = False
        if take.endswith(b"\r") and self.size > 0:
            take, self._cr = take[:-1], True
        self.source.write(take.replace(b"\r\n", b"\n"))
        if self.size > 0:
            return None
        return rest

    def callback(self, line: bytes) -> None:
        self.source.finish()
        self.defer.callback((self.source, line))


def _command(fn: Callable[..., Any]) -> Callable[..., None]:
    """Run a command handler (a generator: inlineCallbacks) and answer its failures."""
    gen = inspect.isgeneratorfunction(fn)
    run = defer.inlineCallbacks(fn) if gen else fn

    @functools.wraps(fn)
    def wrapper(self: IMAPServer, tag: bytes, *args: Any, **kw: Any) -> None:
        pending = self._sync_d
        if pending is not None:
            d = pending.addBoth(lambda _: None).addCallback(lambda _: run(self, tag, *args, **kw))
        else:
            d = defer.maybeDeferred(run, self, tag, *args, **kw)
        d.addErrback(self._command_failed, tag)

    return wrapper


def _mailbox_name(raw: bytes | str) -> str:
    """Decode a client's mailbox name (modified UTF-7, RFC 3501 5.1.3; or UTF-8)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    try:
        name = raw.decode("imap4-utf-7")
    except (UnicodeDecodeError, ValueError):
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FolderError("Invalid mailbox name")
    if not fits_on_disk(name):
        # RFC 5530 3: CANNOT, "the operation violates some invariant of the server".
        raise FolderError("[CANNOT] Mailbox name is too long")
    if name.upper() == INBOX:
        return INBOX
    if name[:6].upper() == INBOX + DELIMITER:
        return INBOX + name[5:]
    return name


def _encode_name(name: str) -> bytes:
    return mime.astring(name.encode("imap4-utf-7"))


def _parse_date_time(raw: bytes) -> float:
    """
    RFC 3501 date-time ``"dd-Mon-yyyy hh:mm:ss +zzzz"`` to seconds since the
    epoch; L{imap4.IllegalClientResponse} (a BAD) for a malformed or impossible
    one, such as 31-Feb or 25:61:61 or a zone of +9999.
    """
    m = re.match(
        rb"^\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$", raw
    )
    if not m or m.group(2).decode().lower() not in _MONTHS:
        raise imap4.IllegalClientResponse("Bad date-time")
    day, mon, year = int(m.group(1)), _MONTHS[m.group(2).decode().lower()], int(m.group(3))
    hh, mm, ss = int(m.group(4)), int(m.group(5)), int(m.group(6))
    zone_h, zone_m = int(m.group(8)), int(m.group(9))
    if (
        year < 1  # RFC 3501 date-year is 4DIGIT; there was no year 0
        or not 1 <= day <= calendar.monthrange(year, mon)[1]
        or hh > 23
        or mm > 59
        or ss > 60  # RFC 5322 3.3: 60 for a leap second
        or zone_h > 23
        or zone_m > 59
    ):
        raise imap4.IllegalClientResponse("Bad date-time")
    offset = (zone_h * 60 + zone_m) * 60
    if m.group(7) == b"-":
        offset = -offset
    return calendar.timegm((year, mon, day, hh, mm, ss)) - offset


def _list_lines(
    cmd: bytes, boxes: Iterable[tuple[str, Any]], subscribed: set[str] | None
) -> Iterator[bytes]:
    """The untagged LIST (or, given the subscriptions, LSUB) responses, without "* "."""
    for name, info in boxes:
        flags = info.getFlags()
        if subscribed is not None:
            if name not in subscribed:
                continue
            flags = [f for f in flags if f == "\\Noselect"]
        yield cmd + b" " + _flag_list(flags) + b' "/" ' + _encode_name(name)


def _flag_list(flags: Iterable[str]) -> bytes:
    return b"(" + b" ".join(f.encode("utf-8", "replace") for f in flags) + b")"


def _crlf_to_lf_source(folder: Any, uid: int, spool_dir: Any) -> SpooledSource:
    """Copy a stored message (CRLF) into a new spooled source (LF). Runs in a thread."""
    source = SpooledSource(spool_dir)
    carry = b""
    with folder.open_message(uid) as f:
        while True:
            chunk = f.read(256 * 1024)
            if not chunk:
                break
            chunk = carry + chunk
            carry = b""
            if chunk.endswith(b"\r"):
                chunk, carry = chunk[:-1], b"\r"
            source.write(chunk.replace(b"\r\n", b"\n"))
    if carry:
        source.write(carry)
    source.finish()
    return source


def _prepare_batch(
    folder: Any,
    job: list[tuple[int, MessageInfo, bytes, bytes | None, mime.Part | None]],
    items: list[Any],
    need_structure: bool,
) -> list[Any]:
    """
    Build the FETCH responses of a batch of messages: one entry per message,
    None if the message is gone, else (segments, new envelope, new structure)
    with segments a list of bytes and L{Stream}s. Runs in a thread.
    """
    out: list[Any] = []
    for seq, info, flags, env, root in job:
        try:
            header: bytes | None = None
            new_env = new_root = None
            if need_structure and root is None:
                with folder.open_message(info.uid) as f:
                    root = new_root = mime.scan(f)
            segments: list[Any] = []
            fields: list[bytes] = []

            for item in items:
                if item == "UID":
                    fields.append(b"UID %d" % info.uid)
                elif item == "FLAGS":
                    fields.append(b"FLAGS " + flags)
                elif item == "RFC822.SIZE":
                    fields.append(b"RFC822.SIZE %d" % info.size)
                elif item == "INTERNALDATE":
                    fields.append(b"INTERNALDATE " + internal_date(info.internal_date))
                elif item == "ENVELOPE":
                    if env is None:
                        if root is not None:
                            env = new_env = root.envelope
                        else:
                            if header is None:
                                header = folder.read_headers(info.uid)
                            env = new_env = mime.envelope(header)
                    fields.append(b"ENVELOPE " + env)
                elif item == "BODYSTRUCTURE":
                    assert root is not None
                    fields.append(b"BODYSTRUCTURE " + mime.body_structure(root, True))
                elif item == "BODY":
                    assert root is not None
                    fields.append(b"BODY " + mime.body_structure(root, False))
                elif isinstance(item, Section):
                    if header is None and item.text and not item.path and item.text != "MIME":
                        header = folder.read_headers(info.uid)
                    data, rng = section_bytes(folder, info.uid, info.size, item, root, header)
                    label = item.name
                    if item.partial is not None:
                        off, length = item.partial
                        label += b"<%d>" % off
                        if data is not None:
                            data = data[off : off + length]
                        elif rng is not None:
                            start = min(rng[0] + off, rng[1])
                            rng = (start, min(start + length, rng[1]))
                    if data is None and rng is None:
                        fields.append(label + b" NIL")
                    elif data is not None:
                        fields.append(label + b" {%d}\r\n" % len(data) + data)
                    elif rng is None:
                        raise AssertionError("unreachable")
                    elif rng[1] - rng[0] < STREAM_AT:
                        data = read_range(folder, info.uid, rng[0], rng[1])
                        fields.append(label + b" {%d}\r\n" % len(data) + data)
                    else:
                        fields.append(label + b" {%d}\r\n" % (rng[1] - rng[0]))
                        segments.append(b" ".join(fields))
                        fields.clear()
                        segments.append(Stream(info.uid, rng[0], rng[1]))
            if fields:
                segments.append(b" ".join(fields))
            # Join: fields are separated by spaces; a stream is followed by a space
            # only if more fields follow.
            body = bytearray(b"* %d FETCH (" % seq)
            pieces: list[Any] = []
            first = True
            for s in segments:
                if isinstance(s, Stream):
                    pieces.append(bytes(body))
                    body = bytearray()
                    pieces.append(s)
                    first = False
                    continue
                if not s:
                    continue
                if not first:
                    body += b" "
                body += s
                first = False
            body += b")\r\n"
            pieces.append(bytes(body))
            out.append((pieces, new_env, new_root))
        except KeyError:
            out.append(None)
    return out


class IMAPServer(HandshakeDeadlineMixin, imap4.IMAP4Server):
    """One IMAP connection."""

    log = SafeLogger()
    transport: Any
    callLater: Any
    _pendingLiteral: Any = None
    mbox: Any = None  # the selected SessionMailbox
    _auth_exchange: Any = None  # the SASL exchange an AUTHENTICATE continues
    account: Any = None  # the logged-in Account
    IDENT = b"mailsrv IMAP4rev1 ready"
    MAX_LENGTH = 64 * 1024
    _literalStringLimit = 64 * 1024

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
        self._lost = False
        self._discarding: bytes | None = None
        self._idle_tag: bytes | None = None
        self._sync_d: defer.Deferred | None = None
        self._sync_again = False
        self._user: str | None = None
        self._literal_progress = 0  # literal bytes since the idle timer last restarted

    # --- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass  # not TCP (tests), or TLS wrapping without the method
        self._tls.connected(self.transport)
        super().connectionMade()
        if self.factory.implicit_tls:
            self.start_handshake_deadline(self.timeOut)
        self.log.info("imap connection from {peer}", peer=peer_host(self.transport))

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        self.handshake_over()
        self._close_mailbox()
        super().connectionLost(reason)
        pending = self._pendingLiteral
        if isinstance(pending, _SpoolLiteral):
            pending.source.discard()

    def timeoutConnection(self) -> None:
        self.sendLine(b"* BYE Autologout; connection idle too long")
        self.transport.loseConnection()

    def _can_starttls(self) -> bool:
        return self._tls.can_start()

    def _cleartext_ok(self) -> bool:
        return self._tls.password_allowed()

    def listCapabilities(self) -> list[bytes]:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"NAMESPACE"]
        caps += [b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"CHILDREN", b"UNSELECT"]
        caps.append(b"APPENDLIMIT=%d" % self.factory.config.imap.max_literal_size)
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
            and self.parseState == "command"
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
            self._buffer = line[end + 2 :]
            if self._buffer:
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

    def dispatchCommand(self, tag: bytes, cmd: bytes, rest: bytes | None, uid: Any = None) -> None:
        if self.lookupCommand(cmd) is None:
            name = cmd.decode("ascii", "replace").upper()
            if any(getattr(self, f"{s}_{name}", None) for s in _STATES) and name.isalnum():
                self.sendBadResponse(tag, b"Command not valid in this state")
            else:
                self.sendBadResponse(tag, b"Unknown command")
            return
        handler, *parsers = self.lookupCommand(cmd)
        self._dispatch_args(tag, handler, [self, tag], parsers, rest, uid)

    def _dispatch_args(
        self, tag: bytes, handler: Any, args: list[Any], parsers: list[Any], line: Any, uid: Any
    ) -> None:
        """
        Parse a command's arguments one parser at a time (a parser may wait
        for a literal), then run the command. Twisted's own loop answers a
        parser's unexpected exception with its text and logs it as a server
        error; here any parser failure is the client's syntax error: a BAD.
        """
        for i, parser in enumerate(parsers):
            if not callable(parser):
                args.append(parser)
                continue
            d = defer.maybeDeferred(parser, self, line)
            d.addCallbacks(
                self._arg_parsed,
                self._arg_failed,
                callbackArgs=(tag, handler, args, parsers[i + 1 :], uid),
                errbackArgs=(tag,),
            )
            return
        if line:
            raise imap4.IllegalClientResponse("Too many arguments")
        if uid is not None:
            handler(*args, uid=uid)
        else:
            handler(*args)

    def _arg_parsed(
        self,
        result: tuple[Any, Any],
        tag: bytes,
        handler: Any,
        args: list[Any],
        parsers: list[Any],
        uid: Any,
    ) -> None:
        arg, rest = result
        args.append(arg)
        try:
            self._dispatch_args(tag, handler, args, parsers, rest, uid)
        except imap4.IllegalClientResponse as e:
            self.sendBadResponse(tag, b"Illegal syntax: " + str(e).encode("utf-8", "replace"))
        except Exception:
            self._command_failed(Failure(), tag)

    def _arg_failed(self, failure: Failure, tag: bytes) -> None:
        if self._lost:
            return
        if failure.check(imap4.IllegalClientResponse):
            self.sendBadResponse(
                tag, b"Illegal syntax: " + str(failure.value).encode("utf-8", "replace")
            )
            return
        self.log.info("imap arguments refused: {error}", error=failure.getErrorMessage()[:200])
        self.sendBadResponse(tag, b"Syntax error in arguments")

    def lookupCommand(self, cmd: bytes) -> Any:
        try:
            name = cmd.decode("ascii").upper()
        except UnicodeDecodeError:
            return None
        if not name.replace("-", "").isalnum():
            return None
        return getattr(self, f"{self.state}_{name}", None)

    def _respond(self, state: bytes, tag: bytes | None, message: bytes | str | None) -> None:
        if isinstance(message, str):
            message = message.encode("utf-8")
        super()._respond(state, tag, message)
        if state == b"BAD":
            if self._bad.bad() and not self._lost:
                self.sendLine(b"* BYE Too many invalid commands")
                self.transport.loseConnection()
                return
        elif tag and state in (b"OK", b"NO"):
            self._bad.good()
        if tag and tag != b"*" and tag == self._busy and state in (b"OK", b"NO", b"BAD"):
            self._busy = None
            if self.paused and not self._lost:
                self.callLater(0, self._resume)

    def _resume(self) -> None:
        if self.paused and self._busy is None and not self._lost:
            self.resumeProducing()

    def _command_failed(self, failure: Any, tag: bytes) -> None:
        if self._lost:
            return
        if failure.check(FolderError):
            self.sendNegativeResponse(tag, str(failure.value).encode("utf-8", "replace"))
        elif failure.check(imap4.IllegalClientResponse, SearchError, FetchSyntaxError):
            self.sendBadResponse(tag, str(failure.value).encode("utf-8", "replace"))
        elif failure.check(BadCharset):
            self.sendNegativeResponse(tag, b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        elif disk_full(failure.value):
            self.log.error("IMAP command {tag}: {error}", tag=tag, error=str(failure.value))
            self.sendNegativeResponse(tag, b"[OVERQUOTA] Not enough disk space")  # RFC 5530
        else:
            self.log.failure("IMAP command {tag} failed", failure, tag=tag)
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")

    def _run(self, f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        return self.factory.run(f, *args, **kw)

    # --- argument parsers (LITERAL+, quoted strings with escapes) -------------

    def arg_astring(self, line: bytes | None, final: bool = False) -> Any:
        line = (line or b"").lstrip(b" ")
        if not line:
            raise imap4.IllegalClientResponse("Missing argument")
        if line[:1] == b'"':
            buf = bytearray()
            i = 1
            while i < len(line) and line[i : i + 1] != b'"':
                if line[i : i + 1] == b"\\":
                    i += 1
                buf += line[i : i + 1]
                i += 1
            if i >= len(line):
                raise imap4.IllegalClientResponse("Unmatched quotes")
            rest = line[i + 1 :]
            if rest and rest[:1] != b" ":
                raise imap4.IllegalClientResponse("Garbage after string")
            return bytes(buf), rest[1:]
        m = _LITERAL_RE.match(line)
        if m:
            return self._stringLiteral(int(m.group(1)), bool(m.group(2)))
        if line[:1] == b"{":
            raise imap4.IllegalClientResponse("Malformed literal")
        arg, _, rest = line.partition(b" ")
        if any(c in b'"()' or c < 0x20 or c == 0x7F for c in arg):
            raise imap4.IllegalClientResponse("Bad atom")
        return arg, rest

    def arg_finalastring(self, line: bytes) -> Any:
        return self.arg_astring(line, final=True)

    def _stringLiteral(self, size: int, nonsync: bool = False) -> defer.Deferred:
        if size > self._literalStringLimit:
            if nonsync:
                self._expect_discard(size)
            raise imap4.IllegalClientResponse("Literal too long")
        d: defer.Deferred = defer.Deferred()
        self.parseState = "pending"
        self._pendingLiteral = imap4.LiteralString(size, d)
        if not nonsync:
            self.sendContinuationRequest(b"Ready for literal data")
        self.setRawMode()
        return d

    def _expect_discard(self, size: int) -> None:
        self.parseState = "pending"
        self._pendingLiteral = _Discard(size)
        self.setRawMode()

    def arg_literal(self, line: bytes | None) -> Any:
        m = _LITERAL_RE.match((line or b"").strip())
        if not m:
            raise imap4.IllegalClientResponse("Missing literal")
        size, nonsync = int(m.group(1)), bool(m.group(2))
        limit = self.factory.config.imap.max_literal_size
        if size > limit:
            # RFC 7889: refuse before the octets are sent; a LITERAL+ sender is
            # already sending them, so they are read and dropped.
            if nonsync:
                self._expect_discard(size)
            self.sendNegativeResponse(self._current_tag, b"[TOOBIG] Message too big")
            return defer.Deferred()  # never fires: the command is over
        d: defer.Deferred = defer.Deferred()
        self.parseState = "pending"
        source = SpooledSource(self.factory.spool_dir)
        self._pendingLiteral = _SpoolLiteral(size, d, source)
        if not nonsync:
            self.sendContinuationRequest(b"Ready for literal data")
        self.setRawMode()
        if size == 0:
            self._pendingLiteral.write(b"")
        return d

    def rawDataReceived(self, data: bytes) -> None:
        # A literal keeps the session alive only while it makes progress: one
        # trickled a byte at a time times out like an idle session.
        self._literal_progress += len(data)
        if self._literal_progress >= LITERAL_PROGRESS:
            self._literal_progress = 0
            self.resetTimeout()
        passon = self._pendingLiteral.write(data)
        if passon is not None:
            self.setLineMode(passon)

    def arg_seqset(self, line: bytes | None) -> tuple[SeqSet, bytes]:
        arg, _, rest = (line or b"").partition(b" ")
        if not arg:
            raise imap4.IllegalClientResponse("Missing message set")
        return SeqSet(arg), rest

    def arg_fetchatt(self, line: bytes | None) -> tuple[FetchRequest, bytes]:
        try:
            return parse_fetch(line or b""), b""
        except FetchSyntaxError as e:
            raise imap4.IllegalClientResponse(str(e))

    def opt_charset(self, line: bytes | None) -> tuple[str, bytes]:
        line = line or b""
        if line[:8].upper() == b"CHARSET ":
            charset, _, rest = line[8:].lstrip().partition(b" ")
            return charset.strip(b'"').decode("ascii", "replace"), rest
        return "utf-8", line

    def arg_searchkeys(self, line: bytes | None) -> Any:
        return self._collect_search(line or b"", [])

    def _collect_search(self, line: bytes, tokens: list[Any]) -> Any:
        m = re.search(rb"\{(\d{1,18})(\+?)\}$", line)
        try:
            if m is None:
                tokens.extend(tokenize(line))
                return tokens, b""
            tokens.extend(tokenize(line[: m.start()]))
        except SearchError as e:
            raise imap4.IllegalClientResponse(str(e))
        d = self._stringLiteral(int(m.group(1)), bool(m.group(2)))

        def got(result: tuple[bytes, bytes]) -> Any:
            data, rest = result
            tokens.append(Literal(data))
            return self._collect_search(rest, tokens)

        return d.addCallback(got)

    # --- any state ------------------------------------------------------------

    def do_ID(self, tag: bytes, line: bytes) -> None:
        self.sendUntaggedResponse(b'ID ("name" "mailsrv" "vendor" "mailsrv")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = (do_ID, imap4.IMAP4Server.arg_line)
    auth_ID = select_ID = unauth_ID

    def do_NOOP(self, tag: bytes) -> None:
        self._noop(tag)

    @_command
    def _noop(self, tag: bytes) -> Any:
        if self.mbox is not None:
            yield self._sync()
        self.sendPositiveResponse(tag, b"NOOP completed")

    unauth_NOOP = auth_NOOP = select_NOOP = (do_NOOP,)  # type: ignore[assignment]

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

    unauth_AUTHENTICATE = (do_AUTHENTICATE, imap4.IMAP4Server.arg_line)  # type: ignore[assignment]

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
            self._login(tag, answer)
            return
        self._auth_tag = tag
        self._auth_exchange = exchange
        self.parseState = "auth_sasl"
        self.sendLine(b"+ " + answer)

    def parse_auth_sasl(self, line: bytes) -> None:
        self.parseState = "command"
        exchange = self._auth_exchange
        self._auth_exchange = None
        self._sasl_step(self._auth_tag, exchange, lambda: exchange.respond(line))

    def _login(self, tag: bytes, creds: sasl.Credentials) -> None:
        host = peer_host(self.transport)
        user = creds.authcid
        d = self.factory.authenticator.login(host, creds, imap4.IAccount)

        def ok(result: tuple[Any, Any, Any]) -> None:
            _, avatar, logout = result
            if self._lost:
                logout()
                return
            self.account = avatar
            self._onLogout = logout
            self._user = avatar.address
            self.state = "auth"
            self.setTimeout(self.POSTAUTH_TIMEOUT)
            self.log.info("imap login {user} from {host}", user=self._user, host=host)
            self.sendPositiveResponse(
                tag, b"[CAPABILITY " + b" ".join(self.listCapabilities()) + b"] Logged in"
            )

        def failed(failure: Any) -> None:
            result = sasl.outcome(failure)
            if result == sasl.THROTTLED:
                self.log.info(
                    "imap login {user} from {host}: refused, too many failures",
                    user=user,
                    host=host,
                )
                if not self._lost:
                    self.sendNegativeResponse(
                        tag, b"[UNAVAILABLE] Too many failed logins; try later"
                    )
            elif result == sasl.FAILED:
                self.log.info("imap login {user} from {host}: failed", user=user, host=host)
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

    # --- authenticated --------------------------------------------------------

    def do_ENABLE(self, tag: bytes, line: bytes) -> None:
        # RFC 5161: nothing we offer needs enabling; say so.
        self.sendUntaggedResponse(b"ENABLED")
        self.sendPositiveResponse(tag, b"ENABLE completed")

    auth_ENABLE = (do_ENABLE, imap4.IMAP4Server.arg_line)
    select_ENABLE = auth_ENABLE

    def do_NAMESPACE(self, tag: bytes) -> None:
        self.sendUntaggedResponse(b'NAMESPACE (("" "/")) NIL NIL')
        self.sendPositiveResponse(tag, b"NAMESPACE completed")

    auth_NAMESPACE = select_NAMESPACE = (do_NAMESPACE,)  # type: ignore[assignment]

    def _close_mailbox(self) -> None:
        mbox, self.mbox = self.mbox, None
        if mbox is not None:
            try:
                mbox.folder.remove_listener(self._folder_changed)
                mbox.close()
            except Exception:
                self.log.failure("closing folder")

    @_command
    def do_SELECT(self, tag: bytes, name: bytes, rw: bool = True) -> Any:
        self._close_mailbox()
        self.state = "auth"
        folder_name = _mailbox_name(name)
        try:
            mbox = yield self.account.select(folder_name, rw)
        except FolderError:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] Mailbox doesn't exist")
            return
        if self._lost:
            mbox.close()
            return
        self.mbox = mbox
        mbox.folder.add_listener(self._folder_changed)
        flags = mbox.getFlags()
        first_unseen = next(
            (i for i, f in enumerate(flag_sets(mbox.infos), 1) if SEEN not in f), None
        )
        self.sendUntaggedResponse(b"FLAGS " + _flag_list(flags))
        permanent = [*flags, "\\*"] if mbox.isWriteable() else []
        self.sendUntaggedResponse(
            b"OK [PERMANENTFLAGS " + _flag_list(permanent) + b"] Flags permitted"
        )
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.getMessageCount())
        self.sendUntaggedResponse(b"0 RECENT")
        if first_unseen is not None:
            self.sendUntaggedResponse(b"OK [UNSEEN %d] First unseen" % first_unseen)
        self.sendUntaggedResponse(b"OK [UIDVALIDITY %d] UIDs valid" % mbox.getUIDValidity())
        self.sendUntaggedResponse(b"OK [UIDNEXT %d] Predicted next UID" % mbox.getUIDNext())
        self.state = "select"
        mode = b"[READ-WRITE]" if mbox.isWriteable() else b"[READ-ONLY]"
        self.sendPositiveResponse(tag, mode + (b" SELECT" if rw else b" EXAMINE") + b" completed")

    def do_EXAMINE(self, tag: bytes, name: bytes) -> None:
        self.do_SELECT(tag, name, False)

    auth_SELECT = select_SELECT = (do_SELECT, arg_astring)  # type: ignore[assignment]
    auth_EXAMINE = select_EXAMINE = (do_EXAMINE, arg_astring)  # type: ignore[assignment]

    @_command
    def do_CREATE(self, tag: bytes, name: bytes) -> Any:
        folder = _mailbox_name(name).rstrip(DELIMITER)
        if folder.upper() == INBOX:
            self.sendNegativeResponse(tag, b"[ALREADYEXISTS] INBOX always exists")
            return
        yield self.account.create(folder)
        self.sendPositiveResponse(tag, b"CREATE completed")

    auth_CREATE = select_CREATE = (do_CREATE, arg_finalastring)  # type: ignore[assignment]

    @_command
    def do_DELETE(self, tag: bytes, name: bytes) -> Any:
        folder = _mailbox_name(name)
        if folder == INBOX:
            self.sendNegativeResponse(tag, b"INBOX cannot be deleted")
            return
        if self.mbox is not None and self.mbox.folder.name == folder:
            self._close_mailbox()
            self.state = "auth"
        yield self.account.delete(folder)
        self.sendPositiveResponse(tag, b"DELETE completed")

    auth_DELETE = select_DELETE = (do_DELETE, arg_finalastring)  # type: ignore[assignment]

    @_command
    def do_RENAME(self, tag: bytes, old: bytes, new: bytes) -> Any:
        src, dst = _mailbox_name(old), _mailbox_name(new)
        if dst == INBOX:
            self.sendNegativeResponse(tag, b"Cannot rename to INBOX")
            return
        if src != INBOX and (dst == src or dst.startswith(src + DELIMITER)):
            # RFC 3501 6.3.5: a mailbox cannot become its own inferior (INBOX
            # can: its messages move, its inferiors stay). RFC 5530 3: CANNOT.
            self.sendNegativeResponse(tag, b"[CANNOT] Cannot rename a mailbox into itself")
            return
        yield self.account.rename(src, dst)
        self.sendPositiveResponse(tag, b"RENAME completed")

    auth_RENAME = select_RENAME = (do_RENAME, arg_astring, arg_finalastring)  # type: ignore[assignment]

    @_command
    def do_SUBSCRIBE(self, tag: bytes, name: bytes) -> Any:
        yield self.account.subscribe(_mailbox_name(name))
        self.sendPositiveResponse(tag, b"SUBSCRIBE completed")

    auth_SUBSCRIBE = select_SUBSCRIBE = (do_SUBSCRIBE, arg_finalastring)  # type: ignore[assignment]

    @_command
    def do_UNSUBSCRIBE(self, tag: bytes, name: bytes) -> Any:
        yield self.account.unsubscribe(_mailbox_name(name))
        self.sendPositiveResponse(tag, b"UNSUBSCRIBE completed")

    auth_UNSUBSCRIBE = select_UNSUBSCRIBE = (do_UNSUBSCRIBE, arg_finalastring)  # type: ignore[assignment]

    @_command
    def do_LIST(self, tag: bytes, ref: bytes, pattern: bytes, lsub: bool = False) -> Any:
        cmd = b"LSUB" if lsub else b"LIST"
        try:
            ref_s, pat_s = ref.decode("imap4-utf-7"), pattern.decode("imap4-utf-7")
        except (UnicodeDecodeError, ValueError):
            self.sendBadResponse(tag, b"Invalid mailbox name")
            return
        if not pat_s and not lsub:
            # RFC 3501 6.3.8: the delimiter and root name.
            self.sendUntaggedResponse(b'LIST (\\Noselect) "/" ""')
            self.sendPositiveResponse(tag, b"LIST completed")
            return
        boxes = yield self.account.listMailboxes(ref_s, pat_s)
        if lsub and not self._lost:
            # As the file has them now: other sessions of the user may have
            # changed them since this one last read or wrote it.
            yield self.account.subscriptions.load()
        if self._lost:
            return
        subscribed = self.account.subscriptions.names
        lines: Iterable[bytes] = _list_lines(cmd, boxes, subscribed if lsub else None)
        if lsub:
            # RFC 3501 6.3.9: subscribed names that no longer exist are listed too.
            existing = {n for n, _ in boxes}
            rx = list_pattern(ref_s + pat_s)
            gone = [n for n in sorted(subscribed - existing) if rx.match(n)]
            lines = itertools.chain(lines, (b'LSUB () "/" ' + _encode_name(n) for n in gone))
        # Tens of thousands of lines go out a piece at a time, as the client reads.
        flow = _Flow()
        self.transport.registerProducer(flow, True)
        try:
            it = iter(lines)
            while piece := list(itertools.islice(it, _LIST_PIECE)):
                self.transport.write(b"".join(b"* " + line + b"\r\n" for line in piece))
                yield flow.wait()
                if self._lost or flow.stopped:
                    return
                yield self.factory.cooperate()
        finally:
            if not self._lost:
                self.transport.unregisterProducer()
        self.sendPositiveResponse(tag, cmd + b" completed")

    def do_LSUB(self, tag: bytes, ref: bytes, pattern: bytes) -> None:
        self.do_LIST(tag, ref, pattern, True)

    auth_LIST = select_LIST = (do_LIST, arg_astring, arg_finalastring)  # type: ignore[assignment]
    auth_LSUB = select_LSUB = (do_LSUB, arg_astring, arg_finalastring)  # type: ignore[assignment]

    @_command
    def do_STATUS(self, tag: bytes, name: bytes, names: list[Any]) -> Any:
        folder = _mailbox_name(name)
        wanted = [
            n.decode("ascii", "replace").upper() if isinstance(n, bytes) else str(n).upper()
            for n in names
        ]
        bad = [n for n in wanted if n not in _STATUS_ITEMS]
        if bad or not wanted:
            self.sendBadResponse(tag, b"Unknown STATUS item")
            return
        try:
            st = yield self.factory.store.folder_status(self._user, folder)
        except FolderError:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] Mailbox doesn't exist")
            return
        values = {
            "MESSAGES": st["messages"],
            "RECENT": 0,
            "UIDNEXT": st["uid_next"],
            "UIDVALIDITY": st["uid_validity"],
            "UNSEEN": st["unseen"],
        }
        items = b" ".join(b"%s %d" % (n.encode(), values[n]) for n in wanted)
        self.sendUntaggedResponse(b"STATUS " + _encode_name(folder) + b" (" + items + b")")
        self.sendPositiveResponse(tag, b"STATUS completed")

    auth_STATUS = select_STATUS = (do_STATUS, arg_astring, imap4.IMAP4Server.arg_plist)  # type: ignore[assignment]

    @_command
    def do_APPEND(
        self, tag: bytes, name: bytes, flags: list[Any] | None, date: bytes | None, message: Any
    ) -> Any:
        source, _ = message if isinstance(message, tuple) else (message, b"")
        try:
            error = getattr(source, "error", None)
            if error is not None:
                raise error  # the literal could not be spooled (a full disk)
            folder_name = _mailbox_name(name)
            flag_set = self._parse_flags(flags or [])
            when = None if date is None else _parse_date_time(date)
            selected = self.mbox is not None and self.mbox.folder.name == folder_name
            if selected:
                target = self.mbox.folder
            else:
                try:
                    target = yield self.factory.store.open_folder(self._user, folder_name)
                except FolderError:
                    self.sendNegativeResponse(tag, b"[TRYCREATE] Mailbox doesn't exist")
                    return
            try:
                uid = yield target.append(source, frozenset(flag_set), when)
                validity = target.uid_validity
            finally:
                if not selected:
                    target.close()
        finally:
            source.discard()
        self.log.info(
            "imap append {user} {folder} uid {uid}", user=self._user, folder=folder_name, uid=uid
        )
        if selected:
            yield self._sync()
        self.sendPositiveResponse(tag, b"[APPENDUID %d %d] APPEND completed" % (validity, uid))

    auth_APPEND = select_APPEND = (  # type: ignore[assignment]
        do_APPEND,
        arg_astring,
        imap4.IMAP4Server.opt_plist,
        imap4.IMAP4Server.opt_datetime,
        arg_literal,
    )

    def _parse_flags(self, flags: Iterable[Any]) -> set[str]:
        out = set()
        for f in flags:
            s = f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f)
            if s.startswith("\\"):
                match = [x for x in SYSTEM_FLAGS if x.lower() == s.lower()]
                if s.lower() == "\\recent":
                    continue
                if not match:
                    raise imap4.IllegalClientResponse(f"Invalid system flag {s}")
                out.add(match[0])
            else:
                if not s or any(c in s for c in '(){%*"\\] ') or any(ord(c) < 33 for c in s):
                    raise imap4.IllegalClientResponse("Invalid keyword")
                out.add(s)
        return out

    def do_IDLE(self, tag: bytes) -> None:
        # RFC 2177
        self._idle_tag = tag
        self.parseState = "idle"
        self.sendContinuationRequest(b"idling")
        self.setTimeout(self.factory.config.imap.idle_timeout)
        if self.mbox is not None:
            self._start_sync()

    def parse_idle(self, line: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        self.parseState = "command"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        if line.strip().upper() == b"DONE":
            self.sendPositiveResponse(tag, b"IDLE terminated")
        else:
            self.sendBadResponse(tag, b"Expected DONE")

    auth_IDLE = select_IDLE = (do_IDLE,)  # type: ignore[assignment]

    # --- changes by others -------------------------------------------------

    def _folder_changed(self) -> None:
        if self._idle_tag is not None and not self._lost:
            self._start_sync()

    def _start_sync(self) -> None:
        if self._sync_d is not None:
            self._sync_again = True
            return
        d = self._sync()
        if not d.called:
            self._sync_d = d

            def done(_: Any) -> None:
                self._sync_d = None
                if self._sync_again:
                    self._sync_again = False
                    if self._idle_tag is not None:
                        self._start_sync()

            d.addBoth(done)

    @defer.inlineCallbacks
    def _sync(self) -> Any:
        """Catch up with the folder; tell the client what changed (EXPUNGE, FETCH, EXISTS)."""
        mbox = self.mbox
        if mbox is None:
            return
        try:
            changes = yield mbox.folder.refresh()
        except FolderError as e:
            # Deleted or renamed by another session meanwhile: the session keeps
            # the view it has; what it can no longer read is reported as such.
            self.log.info("refresh of {folder}: {error}", folder=mbox.folder.name, error=e)
            return
        except Exception:
            self.log.failure("refresh failed")
            return
        if mbox is not self.mbox or self._lost:
            return
        if changes.uid_validity_changed:
            self.sendLine(b"* BYE [UIDVALIDITY changed] Mailbox changed; reconnect")
            self.transport.loseConnection()
            return
        lines = []
        uids = list(mbox.uids)
        for uid in changes.expunged:
            i = bisect.bisect_left(uids, uid)
            if i < len(uids) and uids[i] == uid:
                lines.append(b"* %d EXPUNGE\r\n" % (i + 1))
                del uids[i]
        mbox.reload()
        for info in changes.added:
            mbox.recent.add(info.uid)
        for info in changes.flags:
            seq = mbox.seq_of(info.uid)
            if seq is not None:
                lines.append(b"* %d FETCH (FLAGS %s)\r\n" % (seq, _flag_list(mbox.flags_of(info))))
        if changes.added or changes.expunged:
            lines.append(b"* %d EXISTS\r\n" % mbox.getMessageCount())
        if changes.added:
            lines.append(b"* %d RECENT\r\n" % mbox.getRecentCount())
        if lines:
            self.transport.write(b"".join(lines))

    # --- selected -------------------------------------------------------------

    @_command
    def do_CHECK(self, tag: bytes) -> Any:
        yield self._sync()
        self.sendPositiveResponse(tag, b"CHECK completed")

    select_CHECK = (do_CHECK,)

    @_command
    def do_CLOSE(self, tag: bytes) -> Any:
        mbox = self.mbox
        if mbox.isWriteable():
            # RFC 3501 6.4.2: what is \Deleted now, not what this session last saw
            # (another session may have cleared the flag); no untagged EXPUNGE here.
            yield mbox.folder.refresh()
            mbox.reload()
            uids = _deleted_uids(mbox)
            if uids:
                yield mbox.folder.expunge(uids)
        self._close_mailbox()
        self.state = "auth"
        self.sendPositiveResponse(tag, b"CLOSE completed")

    select_CLOSE = (do_CLOSE,)

    def do_UNSELECT(self, tag: bytes) -> None:
        self._close_mailbox()
        self.state = "auth"
        self.sendPositiveResponse(tag, b"UNSELECT completed")

    select_UNSELECT = (do_UNSELECT,)

    def _expunged_lines(self, removed: Iterable[int]) -> bytes:
        uids = list(self.mbox.uids)
        lines = []
        for uid in removed:
            i = bisect.bisect_left(uids, uid)
            if i < len(uids) and uids[i] == uid:
                lines.append(b"* %d EXPUNGE\r\n" % (i + 1))
                del uids[i]
        return b"".join(lines)

    @_command
    def do_EXPUNGE(self, tag: bytes, uid_set: SeqSet | None = None) -> Any:
        mbox = self.mbox
        if not mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        # RFC 3501 6.4.3: catch up first, so a \Deleted flag another session has
        # since cleared does not get its message removed.
        yield self._sync()
        if mbox is not self.mbox or self._lost or self.transport.disconnecting:
            return  # e.g. UIDVALIDITY changed: the UIDs seen no longer name the same mail
        uids = _deleted_uids(mbox)
        if uid_set is not None:
            last = mbox.uids[-1] if mbox.uids else 0
            uids = [u for u in uids if uid_set.contains(u, last)]
        removed = yield mbox.folder.expunge(uids) if uids else defer.succeed([])
        out = self._expunged_lines(removed)
        mbox.reload()
        if out:
            self.transport.write(out)
        yield self._sync()
        self.sendPositiveResponse(tag, b"EXPUNGE completed")

    select_EXPUNGE = (do_EXPUNGE,)

    def _resolve(self, messages: SeqSet, uid: bool) -> Sequence[int]:
        """
        Sequence numbers (ascending, each once) named by a set of sequence numbers
        or UIDs: a C{range} when they are contiguous (C{1:*} on 100k messages makes
        no list), else a list.
        """
        mbox = self.mbox
        uids = mbox.uids
        spans: list[tuple[int, int]] = []  # [first, last] sequence numbers
        if uid:
            if not uids:
                return []
            for lo, hi in messages.ranges(uids[-1]):
                i = bisect.bisect_left(uids, lo)
                j = bisect.bisect_right(uids, hi)
                if j > i:
                    spans.append((i + 1, j))
        else:
            count = len(uids)
            # RFC 3501 9: BAD for a number past the last message, "including "*"
            # if the selected mailbox is empty".
            if messages.max_number() > count or not count:
                raise imap4.IllegalClientResponse("Invalid message sequence number")
            spans = [(lo, hi) for lo, hi in messages.ranges(count) if lo <= hi]
        merged: list[list[int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        if len(merged) == 1:
            return range(merged[0][0], merged[0][1] + 1)
        return [n for lo, hi in merged for n in range(lo, hi + 1)]

    def do_FETCH(self, tag: bytes, messages: SeqSet, req: FetchRequest, uid: int = 0) -> None:
        self._fetch(tag, messages, req, uid)

    select_FETCH = (do_FETCH, arg_seqset, arg_fetchatt)  # type: ignore[assignment]

    @_command
    def _fetch(self, tag: bytes, messages: SeqSet, req: FetchRequest, uid: int = 0) -> Any:
        mbox = self.mbox
        seqs = self._resolve(messages, bool(uid))
        items: list[Any] = list(req.order)
        if uid and "UID" not in items:
            items.insert(0, "UID")
        seen_now: set[int] = set()
        if req.marks_seen and mbox.isWriteable():
            changes = {}
            for seq in seqs:
                info = mbox.infos[seq - 1]
                if SEEN not in info.flags:
                    changes[info.uid] = info.flags | {SEEN}
            if changes:
                try:
                    yield mbox.folder.set_flags(changes)
                except Exception as e:
                    if not disk_full(e):
                        raise
                    # The message is still read on a full disk, only not marked \Seen.
                    self.log.warn("FETCH: cannot set \\Seen: {error}", error=str(e))
                else:
                    seen_now = set(changes)
                mbox.reload()
        try:
            missing = yield self._fetch_loop(mbox, seqs, items, req, seen_now)
        except Exception:
            # Part of a response may be on the wire: the session cannot go on.
            self.log.failure("FETCH failed mid-response; closing the connection")
            if not self._lost:
                self.sendLine(b"* BYE Internal error")
                self.transport.loseConnection()
            return
        if self._lost:
            return
        if missing:
            self.sendNegativeResponse(tag, b"[EXPUNGEISSUED] Some messages no longer exist")
        else:
            self.sendPositiveResponse(tag, b"FETCH completed")

    @defer.inlineCallbacks
    def _fetch_loop(
        self,
        mbox: SessionMailbox,
        seqs: Sequence[int],
        items: list[Any],
        req: FetchRequest,
        seen_now: set[int],
    ) -> Any:
        factory = self.factory
        flow = _Flow()
        self.transport.registerProducer(flow, True)
        missing = 0
        key = (self._user, mbox.folder.name, mbox.folder.uid_validity)
        pending: Any = None
        try:
            if not req.needs_disk:
                for start in range(0, len(seqs), 2000):
                    out = []
                    for seq in seqs[start : start + 2000]:
                        info = mbox.infos[seq - 1]
                        its = items
                        if info.uid in seen_now and "FLAGS" not in items:
                            its = items + ["FLAGS"]
                        out.append(self._simple_fetch(seq, info, its, mbox))
                    self.transport.write(b"".join(out))
                    yield flow.wait()
                    if self._lost or flow.stopped:
                        return missing
                    if start + 2000 < len(seqs):
                        yield factory.cooperate()
                return missing
            need_structure = req.needs_structure
            batch = 200 if need_structure or req.sections else 500
            its = items
            if seen_now and "FLAGS" not in items:
                its = items + ["FLAGS"]
            memory_only = not need_structure and not req.sections

            def submit(start: int) -> tuple[list[Any], defer.Deferred]:
                job = []
                for seq in seqs[start : start + batch]:
                    info = mbox.infos[seq - 1]
                    env = factory.envelopes.get(key + (info.uid,))
                    root = factory.structures.get(key + (info.uid,)) if need_structure else None
                    job.append((seq, info, _flag_list(mbox.flags_of(info)), env, root))
                if memory_only and all(j[3] is not None for j in job):
                    # Everything is cached: format here, no trip to a thread.
                    return job, factory.cooperate().addCallback(
                        lambda _: _prepare_batch(mbox.folder, job, its, False)
                    )
                return job, self._run(_prepare_batch, mbox.folder, job, its, need_structure)

            # The next batch is read while this one is written.
            pending = submit(0) if seqs else None
            for start in range(0, len(seqs), batch):
                job, d = pending
                results = yield d
                pending = submit(start + batch) if start + batch < len(seqs) else None
                if self._lost:
                    return missing
                buf: list[bytes] = []
                for (_seq, info, *_), result in zip(job, results, strict=True):
                    if result is None:
                        missing += 1
                        continue
                    pieces, new_env, new_root = result
                    if new_env is not None:
                        factory.envelopes.put(key + (info.uid,), new_env)
                    if new_root is not None:
                        factory.structures.put(key + (info.uid,), new_root)
                    for piece in pieces:
                        if isinstance(piece, Stream):
                            self.transport.write(b"".join(buf))
                            buf = []
                            yield self._stream(mbox.folder, piece, flow)
                            if self._lost or flow.stopped:
                                return missing
                        else:
                            buf.append(piece)
                self.transport.write(b"".join(buf))
                yield flow.wait()
                if self._lost or flow.stopped:
                    return missing
            return missing
        finally:
            if pending is not None:
                pending[1].addErrback(lambda _: None)  # abandoned read-ahead
            if not self._lost:
                self.transport.unregisterProducer()

    def _simple_fetch(
        self, seq: int, info: MessageInfo, items: list[Any], mbox: SessionMailbox
    ) -> bytes:
        fields = []
        for item in items:
            if item == "UID":
                fields.append(b"UID %d" % info.uid)
            elif item == "FLAGS":
                fields.append(b"FLAGS " + _flag_list(mbox.flags_of(info)))
            elif item == "RFC822.SIZE":
                fields.append(b"RFC822.SIZE %d" % info.size)
            elif item == "INTERNALDATE":
                fields.append(b"INTERNALDATE " + internal_date(info.internal_date))
        return b"* %d FETCH (%s)\r\n" % (seq, b" ".join(fields))

    @defer.inlineCallbacks
    def _stream(self, folder: Any, s: Stream, flow: _Flow) -> Any:
        left = s.end - s.start
        try:
            f = yield self._run(folder.open_message, s.uid)
        except KeyError:
            f = None
        try:
            if f is not None:
                yield self._run(skip, f, s.start)
            while left > 0 and f is not None:
                chunk = yield self._run(f.read, min(left, 256 * 1024))
                if not chunk or self._lost:
                    break
                self.transport.write(chunk)
                left -= len(chunk)
                yield flow.wait()
                if flow.stopped:
                    return
            if left > 0 and not self._lost:
                self.transport.write(b" " * left)  # keep the literal's promised length
        finally:
            if f is not None:
                f.close()

    @_command
    def do_STORE(
        self, tag: bytes, messages: SeqSet, mode: bytes, flags: list[bytes], uid: int = 0
    ) -> Any:
        mbox = self.mbox
        m = mode.upper()
        silent = m.endswith(b".SILENT")
        base = m[: -len(b".SILENT")] if silent else m
        if base not in (b"FLAGS", b"+FLAGS", b"-FLAGS"):
            self.sendBadResponse(tag, b"Invalid STORE mode")
            return
        new = self._parse_flags(flags)
        seqs = self._resolve(messages, bool(uid))
        if not mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        changes = {}
        for seq in seqs:
            info = mbox.infos[seq - 1]
            if base == b"+FLAGS":
                changes[info.uid] = info.flags | new
            elif base == b"-FLAGS":
                changes[info.uid] = info.flags - new
            else:
                changes[info.uid] = frozenset(new)
        if changes:
            yield mbox.folder.set_flags(changes)
            mbox.reload()
        if not silent:
            out = []
            for seq in seqs:
                info = mbox.infos[seq - 1]
                extra = b" UID %d" % info.uid if uid else b""
                out.append(
                    b"* %d FETCH (FLAGS %s%s)\r\n" % (seq, _flag_list(mbox.flags_of(info)), extra)
                )
            self.transport.write(b"".join(out))
        self.sendPositiveResponse(tag, b"STORE completed")

    select_STORE = (  # type: ignore[assignment]
        do_STORE,
        arg_seqset,
        imap4.IMAP4Server.arg_atom,
        imap4.IMAP4Server.arg_flaglist,
    )

    @_command
    def do_COPY(
        self, tag: bytes, messages: SeqSet, name: bytes, uid: int = 0, move: bool = False
    ) -> Any:
        mbox = self.mbox
        if move and not mbox.isWriteable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        folder_name = _mailbox_name(name)
        seqs = self._resolve(messages, bool(uid))
        try:
            target = yield self.factory.store.open_folder(self._user, folder_name)
        except FolderError:
            self.sendNegativeResponse(tag, b"[TRYCREATE] Mailbox doesn't exist")
            return
        src_uids, dst_uids = [], []
        try:
            for seq in seqs:
                info = mbox.infos[seq - 1]
                try:
                    source = yield self._run(
                        _crlf_to_lf_source, mbox.folder, info.uid, self.factory.spool_dir
                    )
                except KeyError:
                    continue
                try:
                    new_uid = yield target.append(source, info.flags, info.internal_date)
                finally:
                    source.discard()
                src_uids.append(info.uid)
                dst_uids.append(new_uid)
            validity = target.uid_validity
        finally:
            target.close()
        code = b""
        if src_uids:
            code = b"[COPYUID %d %s %s] " % (validity, _uid_set(src_uids), _uid_set(dst_uids))
        if move:
            if code:
                self.sendUntaggedResponse(b"OK " + code + b"Moved")
            removed = yield mbox.folder.expunge(src_uids) if src_uids else defer.succeed([])
            out = self._expunged_lines(removed)
            mbox.reload()
            if out:
                self.transport.write(out)
            if folder_name == mbox.folder.name:
                yield self._sync()  # the copies: EXISTS before the client may name them
            self.sendPositiveResponse(tag, b"MOVE completed")
            return
        if folder_name == mbox.folder.name:
            yield self._sync()
        self.sendPositiveResponse(tag, code + b"COPY completed")

    def do_MOVE(self, tag: bytes, messages: SeqSet, name: bytes, uid: int = 0) -> None:
        self.do_COPY(tag, messages, name, uid, True)

    select_COPY = (do_COPY, arg_seqset, arg_finalastring)  # type: ignore[assignment]
    select_MOVE = (do_MOVE, arg_seqset, arg_finalastring)

    @_command
    def do_SEARCH(self, tag: bytes, charset: str, tokens: list[Any], uid: int = 0) -> Any:
        mbox = self.mbox
        tree = parse(tokens, charset)
        infos = mbox.infos  # replaced, never changed, by a reload: safe to walk in a thread
        last_uid = mbox.uids[-1] if mbox.uids else 0
        matcher = Matcher(
            tree,
            len(infos),
            last_uid,
            set(mbox.recent),
            lambda raw, last: _Contains(SeqSet(raw), last),
        )
        folder = mbox.folder

        def run() -> array:
            hits = array("q")  # 8 bytes a hit, not an int object each
            for seq, info in enumerate(infos, 1):
                try:
                    if matcher.match(
                        seq,
                        info,
                        functools.partial(folder.read_headers, info.uid),
                        functools.partial(_search_body, folder, info),
                    ):
                        hits.append(info.uid if uid else seq)
                except KeyError:
                    continue
            return hits

        if needs(tree):
            hits = yield self._run(run)
        else:
            hits = run()
        self.sendUntaggedResponse(b"SEARCH" + _number_list(hits))
        self.sendPositiveResponse(tag, b"SEARCH completed")

    select_SEARCH = (do_SEARCH, opt_charset, arg_searchkeys)  # type: ignore[assignment]

    def do_UID(self, tag: bytes, command: bytes, line: bytes) -> None:
        command = command.upper()
        if command == b"EXPUNGE":
            seqset, rest = self.arg_seqset(line)
            if rest:
                raise imap4.IllegalClientResponse("Too many arguments")
            self.do_EXPUNGE(tag, seqset)
            return
        if command not in (b"COPY", b"FETCH", b"STORE", b"SEARCH", b"MOVE"):
            raise imap4.IllegalClientResponse("Invalid UID command")
        self.dispatchCommand(tag, command, line, uid=1)

    select_UID = (do_UID, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)  # type: ignore[assignment]


SEARCH_WHOLE_UP_TO = 4 * 1024 * 1024


def _search_body(folder: Any, info: MessageInfo) -> Any:
    """The message for BODY/TEXT search: bytes if small, else a chunk-iterator factory."""
    if info.size <= SEARCH_WHOLE_UP_TO:
        return _read_all(folder, info.uid)

    def chunks() -> Any:
        with folder.open_message(info.uid) as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    return
                yield chunk

    return chunks


def _read_all(folder: Any, uid: int) -> bytes:
    with folder.open_message(uid) as f:
        return f.read()


def _number_list(numbers: Sequence[int], piece: int = 4096) -> bytes:
    """C{b" 1 2 3"}: formatted a piece at a time (a 100k-hit SEARCH makes no 100k-item list)."""
    return b"".join(
        b"".join(b" %d" % n for n in numbers[i : i + piece]) for i in range(0, len(numbers), piece)
    )


def _deleted_uids(mbox: SessionMailbox) -> list[int]:
    """UIDs of the messages flagged \\Deleted (without making a MessageInfo for each)."""
    return [u for u, f in zip(mbox.uids, flag_sets(mbox.infos), strict=True) if DELETED in f]


def _uid_set(uids: list[int]) -> bytes:
    """Compress UIDs (in the order given) into an RFC 4315 uid-set, keeping order."""
    runs: list[list[int]] = []
    for u in uids:
        if runs and u == runs[-1][1] + 1:
            runs[-1][1] = u
        else:
            runs.append([u, u])
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in runs)


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
    ) -> None:
        self.config = config
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
        self.envelopes = _BoundedCache(100_000)  # ~45 MB at most
        self.structures = _BoundedCache(5_000)
        self.cooperate = cooperate or (lambda: task.deferLater(reactor, 0, lambda: None))

    def buildProtocol(self, addr: Any) -> IMAPServer:
        p = IMAPServer(self)
        p.factory = self
        return p


def account_factory(
    config: Any, store: Any, run: Callable[..., defer.Deferred]
) -> Callable[[str], defer.Deferred]:
    """The realm's factory for L{imap4.IAccount} avatars."""

    def make(address: str) -> defer.Deferred:
        subs = Subscriptions(subscriptions_path(config.server.data_dir, address), run)
        return Account(address, store, subs, config.imap.special_folders, run).prepare()

    return make


def imap_factory(ctx: Any, implicit_tls: bool = False) -> IMAPServerFactory:
    """The IMAP listener's factory for a L{ServerContext} (service.py wraps implicit TLS)."""

    def run(f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        return threads.deferToThreadPool(ctx.reactor, ctx.threadpool, f, *args, **kw)

    ctx.portal.realm.register(imap4.IAccount, account_factory(ctx.config, ctx.store, run))
    return IMAPServerFactory(
        config=ctx.config,
        store=ctx.store,
        portal=ctx.portal,
        reactor=ctx.reactor,
        run=run,
        tls=ctx.tls,
        throttle=ctx.throttle,
        implicit_tls=implicit_tls,
    )
