"""
Reading IMAP commands (RFC 3501 9): the dispatch of a command line to its
handler with its arguments parsed one at a time (an argument may be a
literal that has yet to arrive), the argument parsers (quoted strings with
escapes, LITERAL+ literals spooled to disk, sequence sets, FETCH attributes,
SEARCH keys), and the values they stand for: mailbox names, date-times,
flags, the messages a sequence set names.
"""

from __future__ import annotations

import bisect
import calendar
import re
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4
from twisted.python.failure import Failure

from mailsrv.imap import mutf7, twistedcompat
from mailsrv.imap.commands.base import CommandBase
from mailsrv.imap.fetch import FetchRequest, FetchSyntaxError, parse_fetch
from mailsrv.imap.search import Literal, SearchError, tokenize
from mailsrv.interfaces import SYSTEM_FLAGS, FolderError
from mailsrv.spool import SpooledSource
from mailsrv.store.names import DELIMITER, INBOX, fits_on_disk

_LITERAL_RE = re.compile(rb"\{(\d{1,18})(\+?)\}$")
# The largest literal taken for a string argument (a name, a search key).
STRING_LITERAL_LIMIT = 64 * 1024
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}


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


class SeqSetMembers:
    """The numbers of a L{SeqSet} with C{*} resolved to C{last}, for C{in}."""

    def __init__(self, s: SeqSet, last: int) -> None:
        self._r = s.ranges(last)

    def __contains__(self, n: int) -> bool:
        return any(a <= n <= b for a, b in self._r)


class SavedResult(SeqSet):
    """
    C{$} (RFC 5182 2.1): the messages the last SEARCH with SAVE found, held
    as UIDs, so that expunges since do not change what it names; in a
    command that is not a UID command it names them by sequence number.
    """

    def __init__(self, uids: Sequence[int]) -> None:
        self.raw = b"$"
        self.uids = uids  # ascending
        self._ranges = []
        for u in uids:
            last = self._ranges[-1][1] if self._ranges else None
            if last is not None and u == last + 1:
                self._ranges[-1] = (self._ranges[-1][0], u)
            else:
                self._ranges.append((u, u))


def resolve(messages: SeqSet, uids: Sequence[int], uid: bool) -> Sequence[int]:
    """
    Sequence numbers (ascending, each once) named by a set of sequence numbers
    or UIDs, in a mailbox of the messages C{uids}: a C{range} when they are
    contiguous (C{1:*} on 100k messages makes no list), else a list.
    """
    spans: list[tuple[int, int]] = []  # [first, last] sequence numbers
    if uid or isinstance(messages, SavedResult):  # "$" holds UIDs (RFC 5182 2.1)
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


def mailbox_name(raw: bytes | str) -> str:
    """
    Decode a client's mailbox name (modified UTF-7, RFC 3501 5.1.3); a name
    that is not valid modified UTF-7 (8-bit octets among them) is a NO.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    try:
        name = mutf7.decode(raw)
    except mutf7.InvalidName as e:
        raise FolderError(f"Mailbox name is not valid modified UTF-7: {e}") from None
    if not fits_on_disk(name):
        # RFC 5530 3: CANNOT, "the operation violates some invariant of the server".
        raise FolderError("[CANNOT] Mailbox name is too long")
    if name.upper() == INBOX:
        return INBOX
    if name[:6].upper() == INBOX + DELIMITER:
        return INBOX + name[5:]
    return name


def utf8_name(parsed: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """A parsed UTF-8 astring (RFC 6855 3) as modified UTF-7; BAD if it is not UTF-8."""
    value, rest = parsed
    try:
        return mutf7.from_utf8(value), rest
    except mutf7.InvalidName:
        # RFC 6855 3: "MUST reject, with a BAD response" octets that are not UTF-8.
        raise imap4.IllegalClientResponse("String is not valid UTF-8") from None


def parse_date_time(raw: bytes) -> float:
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


def parse_flags(flags: Iterable[Any]) -> set[str]:
    """A client's flag list (STORE, APPEND): system flags in their case, keywords; no \\Recent."""
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


class DiscardLiteral:
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


class SpoolLiteral:
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


class CommandParser(CommandBase):
    """
    The command dispatch and argument parsers of an IMAP session (replacing
    Twisted's: a parser failure is the client's syntax error, and literals
    follow LITERAL+ and the APPEND size limit).
    """

    def dispatchCommand(self, tag: bytes, cmd: bytes, rest: bytes | None, uid: Any = None) -> None:
        if self.lookupCommand(cmd) is None:
            name = cmd.decode("ascii", "replace").upper()
            if (
                any(twistedcompat.command_entry(self, s, name) for s in twistedcompat.STATES)
                and name.isalnum()
            ):
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
        return twistedcompat.command_entry(self, self.state, name)

    # --- argument parsers (LITERAL+, quoted strings with escapes) -------------

    def arg_astring(self, line: bytes | None, final: bool = False) -> Any:
        """
        An astring. A session that enabled UTF8=ACCEPT sends UTF-8 (RFC 6855
        3), and its astrings in the authenticated and selected states are
        mailbox names and LIST patterns (or US-ASCII charsets and quota
        roots): each is handed on as the same name in modified UTF-7, the
        spelling that L{mailbox_name} and LIST's pattern decoding read.
        """
        arg = self._astring(line)
        if not self.utf8_names:
            return arg
        if isinstance(arg, defer.Deferred):
            return arg.addCallback(utf8_name)
        return utf8_name(arg)

    def _astring(self, line: bytes | None) -> Any:
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
            return self._string_literal(int(m.group(1)), bool(m.group(2)))
        if line[:1] == b"{":
            raise imap4.IllegalClientResponse("Malformed literal")
        arg, _, rest = line.partition(b" ")
        if any(c in b'"()' or c < 0x20 or c == 0x7F for c in arg):
            raise imap4.IllegalClientResponse("Bad atom")
        return arg, rest

    def arg_finalastring(self, line: bytes) -> Any:
        return self.arg_astring(line, final=True)

    def _string_literal(self, size: int, nonsync: bool = False) -> defer.Deferred:
        if size > STRING_LITERAL_LIMIT:
            if nonsync:
                self._expect_discard(size)
            raise imap4.IllegalClientResponse("Literal too long")
        d: defer.Deferred = defer.Deferred()
        twistedcompat.set_pending_literal(self, twistedcompat.LiteralString(size, d))
        if not nonsync:
            self.sendContinuationRequest(b"Ready for literal data")
        self.setRawMode()
        return d

    def _expect_discard(self, size: int) -> None:
        twistedcompat.set_pending_literal(self, DiscardLiteral(size))
        self.setRawMode()

    def arg_literal(self, line: bytes | None) -> Any:
        line = (line or b"").strip()
        if line[:1] == b"~":  # RFC 3516 4.4: APPEND takes a literal8, stored as sent
            line = line[1:]
        m = _LITERAL_RE.match(line)
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
        source = SpooledSource(self.factory.spool_dir)
        receiver = SpoolLiteral(size, d, source)
        twistedcompat.set_pending_literal(self, receiver)
        if not nonsync:
            self.sendContinuationRequest(b"Ready for literal data")
        self.setRawMode()
        if size == 0:
            receiver.write(b"")
        return d

    def arg_seqset(self, line: bytes | None) -> tuple[SeqSet, bytes]:
        arg, _, rest = (line or b"").partition(b" ")
        if not arg:
            raise imap4.IllegalClientResponse("Missing message set")
        if arg == b"$":  # RFC 5182 2.2: the saved search result
            return self.saved_result(), rest
        return SeqSet(arg), rest

    def saved_result(self) -> SavedResult:
        """What C{$} names (RFC 5182 2.1); empty until a SEARCH saves (commands.selected)."""
        return SavedResult(())

    def arg_fetchatt(self, line: bytes | None) -> tuple[FetchRequest, bytes]:
        try:
            return parse_fetch(line or b""), b""
        except FetchSyntaxError as e:
            raise imap4.IllegalClientResponse(str(e))

    def opt_charset(self, line: bytes | None) -> tuple[str, bytes]:
        line = line or b""
        if line[:8].upper() == b"CHARSET ":
            if self.utf8_accept:
                # RFC 6855 3: after ENABLE UTF8=ACCEPT, SEARCH with a charset is a BAD.
                raise imap4.IllegalClientResponse("CHARSET is not allowed after UTF8=ACCEPT")
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
        d = self._string_literal(int(m.group(1)), bool(m.group(2)))

        def got(result: tuple[bytes, bytes]) -> Any:
            data, rest = result
            tokens.append(Literal(data))
            return self._collect_search(rest, tokens)

        return d.addCallback(got)
