"""
APPEND (RFC 3501 6.3.11) with MULTIAPPEND (RFC 3502: several messages, all
stored or none), CATENATE (RFC 4469: a message made of literals and of
sections of messages already on the server, named by IMAP URLs), UIDPLUS's
APPENDUID (RFC 4315), LITERAL+ (RFC 7888), APPENDLIMIT (RFC 7889) and RFC
6855's UTF8 data item.

The arguments are read by L{AppendReader} (literals spooled to disk as they
arrive), the command then builds each CATENATE message into a spool of its
own (L{mailsrv.imap.catenate}, in the thread pool, never whole in memory),
checks the quota, and stores every message in one L{IFolder.append_many}.
A failure part way (a bad flag, a literal over the limit, a bad URL) is
answered once the client has sent what it was going to send anyway (its
LITERAL+ octets are read and dropped), and nothing is stored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4

from mailsrv.imap import catenate, twistedcompat
from mailsrv.imap.commands.base import CommandBase, command
from mailsrv.imap.commands.quota import quota_refuses
from mailsrv.imap.parsing import (
    STRING_LITERAL_LIMIT,
    CommandParser,
    DiscardLiteral,
    SpoolLiteral,
    mailbox_name,
    parse_date_time,
    parse_flags,
)
from mailsrv.interfaces import FolderError, NotSelectable
from mailsrv.spool import SPILL_AT, SpooledSource

# RFC 3502, RFC 4469; URL-PARTIAL (RFC 5550), which CATENATE honours too, is
# advertised with URLAUTH (commands.urlauth).
CAPABILITIES = [b"MULTIAPPEND", b"CATENATE"]

# What one APPEND may hold: every message keeps a spool (a file once large).
MAX_MESSAGES = 1000
MAX_PARTS = 1000  # CATENATE parts of one message
# Messages held in memory by one APPEND, at most; later ones go to disk at once.
_IN_MEMORY = 4 * SPILL_AT

_LITERAL_AT_END = re.compile(rb"(~?)\{(\d{1,18})(\+?)\}$")
_FLAGS = re.compile(rb"\(([^()]*)\)")
_DATE = re.compile(rb'"([^"]*)"')
_UTF8_NOT_ENABLED = b"UTF8 APPEND data needs ENABLE UTF8=ACCEPT"
_TOOBIG = b"[TOOBIG] Message too big"

arg_astring = CommandParser.arg_astring


@dataclass
class TextPart:
    """A CATENATE TEXT literal (RFC 4469 5), spooled; C{wire} is its size as sent."""

    source: SpooledSource
    wire: int


@dataclass
class UrlPart:
    """A CATENATE URL (RFC 4469 5), as the client sent it."""

    url: str


@dataclass
class AppendMessage:
    """One message of an APPEND: its flags, date, and octets (or CATENATE parts)."""

    flags: frozenset[str]
    date: float | None
    source: SpooledSource | None = None
    parts: list[TextPart | UrlPart] = field(default_factory=list)

    def spools(self) -> list[SpooledSource]:
        found = [] if self.source is None else [self.source]
        return found + [p.source for p in self.parts if isinstance(p, TextPart)]


class _Refused(Exception):
    """The APPEND is refused: C{kind} (NO or BAD) and the text, answered once the input is read."""

    def __init__(self, kind: bytes, text: bytes) -> None:
        super().__init__(text.decode("utf-8", "replace"))
        self.kind = kind
        self.text = text


class _SkipLiteral(DiscardLiteral):
    """Drops a LITERAL+ literal's octets, then hands the rest of its line on."""

    def __init__(self, size: int, then: Any) -> None:
        super().__init__(size)
        self._then = then

    def callback(self, line: bytes) -> None:
        self._then(line)


class AppendReader:
    """
    Reads APPEND's arguments after the mailbox name (RFC 3502 6.3.11,
    RFC 4469 5): ``1*(SP [flag-list SP] [date-time SP] append-data)``,
    append-data being a literal (or literal8), RFC 6855's ``UTF8 (literal8)``
    or ``CATENATE (cat-part *(SP cat-part))``. Fires with the messages, or,
    refused, answers the client itself once the command's octets are read
    and never fires.
    """

    def __init__(self, proto: Any, line: bytes) -> None:
        self.proto = proto
        self.limit = int(proto.factory.config.imap.max_literal_size)
        self.messages: list[AppendMessage] = []
        self.in_memory = 0
        self.done: defer.Deferred = defer.Deferred()
        self._next_message(line)

    # --- the grammar -----------------------------------------------------

    def _next_message(self, line: bytes) -> None:
        try:
            self._message(line)
        except _Refused as e:
            self._refuse(e, line)

    def _message(self, line: bytes) -> None:
        if len(self.messages) >= MAX_MESSAGES:
            raise _Refused(b"NO", b"[LIMIT] Too many messages in one APPEND")
        rest = line
        flags: frozenset[str] = frozenset()
        date = None
        m = _FLAGS.match(rest)
        if m is not None:
            flags = frozenset(self._checked(parse_flags, m.group(1).split()))
            rest = self._after_space(rest[m.end() :])
        m = _DATE.match(rest)
        if m is not None:
            date = self._checked(parse_date_time, m.group(1))
            rest = self._after_space(rest[m.end() :])
        message = AppendMessage(flags, date)
        self.messages.append(message)
        upper = rest[:10].upper()
        if upper.startswith(b"CATENATE ("):
            self._cat_part(message, rest[10:], first=True)
        elif upper.startswith(b"UTF8 (~{"):
            self._utf8_data(message, rest[6:])
        else:
            self._data(message, rest)

    def _data(self, message: AppendMessage, rest: bytes) -> None:
        size, nonsync = self._literal_marker(rest)

        def got(source: SpooledSource, after: bytes) -> None:
            message.source = source
            self._message_done(after)

        self._read_literal(size, nonsync, got)

    def _utf8_data(self, message: AppendMessage, rest: bytes) -> None:
        """RFC 6855 4: ``UTF8 (~{n}CRLF octets)``, only after ENABLE UTF8=ACCEPT."""
        size, nonsync = self._literal_marker(rest)
        if not self.proto.utf8_accept:
            # A NO; with a synchronizing literal, before the client sends it.
            raise _Refused(b"NO", _UTF8_NOT_ENABLED)

        def got(source: SpooledSource, after: bytes) -> None:
            message.source = source
            if after[:1] != b")":
                self._refuse(_Refused(b"BAD", b"Missing ) after UTF8 data"), after)
                return
            self._message_done(after[1:])

        self._read_literal(size, nonsync, got)

    def _cat_part(self, message: AppendMessage, rest: bytes, first: bool = False) -> None:
        """RFC 4469 5: cat-part = "TEXT" SP literal / "URL" SP astring; then SP or ")"."""
        if rest[:1] == b")":
            if first:
                raise _Refused(b"BAD", b"Empty CATENATE list")
            self._message_done(rest[1:])
            return
        if not first:
            if rest[:1] != b" ":
                raise _Refused(b"BAD", b"Invalid CATENATE list")
            rest = rest[1:]
        if len(message.parts) >= MAX_PARTS:
            raise _Refused(b"NO", b"[LIMIT] Too many CATENATE parts")
        word = rest[:5].upper()
        if word == b"TEXT ":
            size, nonsync = self._literal_marker(rest[5:])
            if sum(p.wire for p in message.parts if isinstance(p, TextPart)) + size > self.limit:
                raise _Refused(b"NO", _TOOBIG)

            def got(source: SpooledSource, after: bytes) -> None:
                message.parts.append(TextPart(source, size))
                self._next_part(message, after)

            self._read_literal(size, nonsync, got)
        elif rest[:4].upper() == b"URL ":
            self._url(message, rest[4:])
        else:
            raise _Refused(b"BAD", b"Invalid CATENATE part")

    def _url(self, message: AppendMessage, rest: bytes) -> None:
        """The URL of a cat-part: a quoted string, a literal or an atom (RFC 3501 astring)."""

        def got(value: bytes, after: bytes) -> None:
            message.parts.append(UrlPart(value.decode("utf-8", "replace")))
            self._next_part(message, after)

        if rest[:1] == b'"':
            value = bytearray()
            i = 1
            while i < len(rest) and rest[i : i + 1] != b'"':
                if rest[i : i + 1] == b"\\":
                    i += 1
                value += rest[i : i + 1]
                i += 1
            if i >= len(rest):
                raise _Refused(b"BAD", b"Unmatched quotes")
            got(bytes(value), rest[i + 1 :])
            return
        m = _LITERAL_AT_END.match(rest)
        if m is not None and not m.group(1):
            size = int(m.group(2))
            if size > STRING_LITERAL_LIMIT:
                raise _Refused(b"BAD", b"Literal too long")
            if size == 0:  # names nothing; Twisted's string literal reader needs an octet
                raise _Refused(b"BAD", b"Empty URL")
            d: defer.Deferred = defer.Deferred()
            d.addCallback(lambda result: got(*result))
            d.addErrback(self._internal_error)
            twistedcompat.set_pending_literal(self.proto, twistedcompat.LiteralString(size, d))
            if not m.group(3):
                self.proto.sendContinuationRequest(b"Ready for literal data")
            self.proto.setRawMode()
            return
        atom = re.match(rb'[^\s()"{\x00-\x1f\x7f]+', rest)
        if atom is None:
            raise _Refused(b"BAD", b"Invalid URL argument")
        got(atom.group(), rest[atom.end() :])

    def _next_part(self, message: AppendMessage, rest: bytes) -> None:
        try:
            self._cat_part(message, rest)
        except _Refused as e:
            self._refuse(e, rest)

    def _message_done(self, rest: bytes) -> None:
        if not rest:
            self.done.callback((self.messages, b""))
            return
        if rest[:1] != b" ":
            self._refuse(_Refused(b"BAD", b"Invalid arguments"), rest)
            return
        self._next_message(rest[1:])

    # --- pieces -------------------------------------------------------------

    @staticmethod
    def _checked(parse: Any, value: Any) -> Any:
        try:
            return parse(value)
        except imap4.IllegalClientResponse as e:
            raise _Refused(b"BAD", str(e).encode("utf-8", "replace")) from None

    @staticmethod
    def _after_space(rest: bytes) -> bytes:
        if rest[:1] != b" ":
            raise _Refused(b"BAD", b"Invalid arguments")
        return rest[1:]

    def _literal_marker(self, rest: bytes) -> tuple[int, bool]:
        """The size of the literal the line ends with, and whether it is LITERAL+."""
        m = _LITERAL_AT_END.match(rest)
        if m is None:
            raise _Refused(b"BAD", b"Missing literal")
        size = int(m.group(2))
        if size > self.limit:
            # RFC 7889: refused before the octets are sent (a LITERAL+
            # sender's are read and dropped).
            raise _Refused(b"NO", _TOOBIG)
        return size, bool(m.group(3))

    def _read_literal(self, size: int, nonsync: bool, then: Any) -> None:
        """Spool the literal the line ended with; C{then(source, rest of its line)}."""
        proto = self.proto
        spill = SPILL_AT if self.in_memory + size <= _IN_MEMORY else 0
        source = SpooledSource(proto.factory.spool_dir, spill_at=spill)
        if spill:
            self.in_memory += size
        d: defer.Deferred = defer.Deferred()
        d.addCallback(lambda result: then(*result))
        d.addErrback(self._internal_error)
        receiver = SpoolLiteral(size, d, source)
        twistedcompat.set_pending_literal(proto, receiver)
        if not nonsync:
            proto.sendContinuationRequest(b"Ready for literal data")
        proto.setRawMode()
        if size == 0:
            receiver.write(b"")

    # --- refusal --------------------------------------------------------------

    def _refuse(self, refusal: _Refused, rest: bytes) -> None:
        """
        Refuse the command: drop what was read, read and drop the rest of it
        (LITERAL+ literals, RFC 7888 4), then answer. A line that ends with a
        synchronizing literal ends the command: its octets are never asked for.
        """
        self.discard()

        def skip(line: bytes) -> None:
            m = _LITERAL_AT_END.search(line)
            if m is not None and m.group(3):
                twistedcompat.set_pending_literal(self.proto, _SkipLiteral(int(m.group(2)), skip))
                self.proto.setRawMode()
                return
            if self.proto._lost:
                return
            if refusal.kind == b"BAD":
                self.proto.sendBadResponse(self.proto._current_tag, refusal.text)
            else:
                self.proto.sendNegativeResponse(self.proto._current_tag, refusal.text)

        skip(rest)

    def _internal_error(self, failure: Any) -> None:
        self.discard()
        self.proto._command_failed(failure, self.proto._current_tag)

    def discard(self) -> None:
        """Drop every spooled message and part."""
        for message in self.messages:
            for source in message.spools():
                source.discard()


def arg_append_messages(proto: Any, line: bytes | None) -> defer.Deferred:
    """APPEND's messages (L{AppendReader}): a Deferred of (list of L{AppendMessage}, b"")."""
    return AppendReader(proto, line or b"").done


def uid_set(uids: Sequence[int]) -> bytes:
    """RFC 4315 3 uid-set: ascending UIDs as ranges (``2:4,7``)."""
    out: list[bytes] = []
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(b"%d" % uids[i] if i == j else b"%d:%d" % (uids[i], uids[j]))
        i = j + 1
    return b",".join(out)


class AppendCommand(CommandBase):
    """APPEND, with MULTIAPPEND and CATENATE."""

    @command
    def do_APPEND(self, tag: bytes, name: bytes, messages: list[AppendMessage]) -> Any:
        folder_name = None
        try:
            folder_name = mailbox_name(name)
            selected = self.mbox is not None and self.mbox.folder.name == folder_name
            if selected:
                target = self.mbox.folder
            else:
                try:
                    target = yield self.factory.store.open_folder(self._user, folder_name)
                except NotSelectable as e:
                    self.sendNegativeResponse(tag, str(e).encode())
                    return
                except FolderError:
                    self.sendNegativeResponse(tag, b"[TRYCREATE] Mailbox doesn't exist")
                    return
            try:
                uids = yield self._append(tag, target, messages)
                validity = target.uid_validity
            finally:
                if not selected:
                    target.close()
        finally:
            for message in messages:
                for source in message.spools():
                    source.discard()
        if uids is None:
            return
        self.log.info(
            "imap append {user} {folder} uid {uid}",  # a UID set after MULTIAPPEND
            user=self._user,
            folder=folder_name,
            uid=uid_set(uids).decode(),
        )
        if selected:
            yield self._sync()
        self.sendPositiveResponse(
            tag, b"[APPENDUID %d %s] APPEND completed" % (validity, uid_set(uids))
        )

    @defer.inlineCallbacks
    def _append(self, tag: bytes, target: Any, messages: list[AppendMessage]) -> Any:
        """Build the CATENATE messages, check the quota, store all; the UIDs, or None if answered."""
        limit = int(self.factory.config.imap.max_literal_size)
        items = []
        for message in messages:
            source = message.source
            if source is None:
                try:
                    source = yield catenate.build(self, message.parts, limit)
                except catenate.BadURL as e:
                    self.sendNegativeResponse(tag, e.response())
                    return None
                except catenate.TooBig:
                    self.sendNegativeResponse(tag, b"[TOOBIG] Composed message grows too big.")
                    return None
                message.source = source
            if source.error is not None:
                raise source.error  # the message could not be spooled (a full disk)
            items.append((source, message.flags, message.date))
        if (yield quota_refuses(self, tag, sum(s.size for s, _, _ in items))):  # RFC 9208 4.3
            return None
        uids = yield target.append_many(items)
        return uids

    auth_APPEND = select_APPEND = (do_APPEND, arg_astring, arg_append_messages)  # type: ignore[assignment]
