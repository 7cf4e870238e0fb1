"""
What SORT and THREAD need of a message's header (RFC 5256, RFC 5957): the
base subject, the sent date, the first From/To/Cc address and display name,
Message-ID and the references, read from the header block once and kept in
L{SortFieldCache} (per folder, by UID and UIDVALIDITY) so that later SORT and
THREAD commands on the folder read nothing from disk.
"""

from __future__ import annotations

import calendar
import email.utils
import gc
import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mailsrv.imap.basesubject import base_subject, casemap, header_text

_WANTED = frozenset(
    [b"subject", b"from", b"to", b"cc", b"date", b"references", b"in-reply-to", b"message-id"]
)
# RFC 5322 3.6.4: msg-id = "<" id-left "@" id-right ">".
_MSG_ID = re.compile(rb"<([^<>\s@]+@[^<>\s]+)>")
_SPECIALS = '<>,:;@."()'
# RFC 5322 3.3: [day-of-week ","] day month year hour ":" minute [":" second] zone.
_DATE = re.compile(
    rb"[ \t]*(?:[A-Za-z]{3}[ \t]*,[ \t]*)?(\d{1,2})[ \t]+([A-Za-z]{3})[ \t]+(\d{4})[ \t]+"
    rb"(\d{1,2}):(\d{2})(?::(\d{2}))?[ \t]+([+-])(\d{2})(\d{2})[ \t]*(?:\([^()]*\)[ \t]*)?$"
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        [
            b"jan",
            b"feb",
            b"mar",
            b"apr",
            b"may",
            b"jun",
            b"jul",
            b"aug",
            b"sep",
            b"oct",
            b"nov",
            b"dec",
        ],
        1,
    )
}
# The first address in its common forms (RFC 5322 3.4), followed by nothing or a comma:
# `[phrase] <addr@host>`, `"quoted" <addr@host>`, `addr@host`.
_ADDR = r'([^\s"<>()\[\],:;@\\]+)@([^\s"<>()\[\],:;@\\]+)'
_ANGLE_ADDRESS = re.compile(
    r'[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^"<>()\[\],:;@\\]*?))[ \t]*<' + _ADDR + r">[ \t]*(?:,|$)"
)
_BARE_ADDRESS = re.compile(r"[ \t]*" + _ADDR + r"[ \t]*(?:,|$)")
_QUOTED_PAIR = re.compile(r"\\(.)")


class MessageKeys:
    """The sort and thread keys of one message (strings as i;ascii-casemap keys)."""

    __slots__ = (
        "subject",
        "reply",
        "sent",
        "from_mailbox",
        "from_display",
        "to_mailbox",
        "to_display",
        "cc_mailbox",
        "message_id",
        "references",
    )

    def __init__(self) -> None:
        self.subject = b""  # the base subject (RFC 5256 2.1)
        self.reply = False  # the base subject came from a reply or forward
        self.sent: float | None = None  # the Date field in UTC seconds, if valid
        self.from_mailbox = b""  # addr-mailbox of the first From address
        self.from_display = b""  # RFC 5957 3: display name, else the addr-spec
        self.to_mailbox = b""
        self.to_display = b""
        self.cc_mailbox = b""
        self.message_id: bytes | None = None
        self.references: tuple[bytes, ...] = ()


def _tokens(text: str) -> list[tuple[str, str]]:
    """RFC 5322 3.2 lexical tokens: ("a", atom), ("q", quoted), ("c", comment), ("s", special)."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == '"':
            buf = []
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(text[i])
                i += 1
            out.append(("q", "".join(buf)))
            i += 1
        elif c == "(":
            depth, buf = 1, []
            i += 1
            while i < n and depth:
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                elif text[i] == "(":
                    depth += 1
                elif text[i] == ")":
                    depth -= 1
                    if not depth:
                        break
                buf.append(text[i])
                i += 1
            out.append(("c", "".join(buf).strip()))
            i += 1
        elif c in _SPECIALS:
            out.append(("s", c))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIALS and text[j] not in " \t\r\n":
                j += 1
            out.append(("a", text[i:j]))
            i = j
    return out


def first_address(raw: bytes) -> tuple[str, str, str]:
    """
    The first address of an address list field as the IMAP envelope shows it:
    (display name, addr-mailbox, host); a group is its name as addr-mailbox.
    An address with no display name but a comment takes the comment as its
    name, as Dovecot's envelope does.
    """
    text = raw.decode("utf-8", "replace")
    m = _ANGLE_ADDRESS.match(text)
    if m is not None:  # the common forms, without the tokenizer
        quoted, phrase, local, host = m.groups()
        if quoted is not None:
            name = _QUOTED_PAIR.sub(r"\1", quoted)
        else:
            name = " ".join(phrase.split()).replace(" .", ".")
        return decode_phrase(name), local, host
    m = _BARE_ADDRESS.match(text)
    if m is not None:
        return "", m.group(1), m.group(2)
    words: list[tuple[str, str]] = []
    comment = ""
    toks = _tokens(text)
    i = 0
    while i < len(toks):
        kind, value = toks[i]
        i += 1
        if kind == "c":
            comment = comment or value
        elif kind == "s" and value == ":":
            # RFC 3501 7.4.2: a group starts as (NIL NIL "group name" NIL) in the
            # envelope; Dovecot sorts on that as the first address.
            return "", " ".join(v for _, v in words), ""
        elif kind == "s" and value == "<":
            inner: list[tuple[str, str]] = []
            while i < len(toks) and toks[i] != ("s", ">"):
                if toks[i][0] != "c":
                    inner.append(toks[i])
                i += 1
            if ("s", ":") in inner:  # RFC 5322 4.4: an obsolete source route
                inner = inner[inner.index(("s", ":")) + 1 :]
            local, host = _addr_spec(inner)
            name = " ".join(v for k, v in words if k != "s" or v == ".").replace(" .", ".")
            return decode_phrase(name), local, host
        elif kind == "s" and value in ",;":
            if words:
                break
        else:
            words.append((kind, value))
    local, host = _addr_spec(words)
    return decode_phrase(comment), local, host


def _addr_spec(toks: list[tuple[str, str]]) -> tuple[str, str]:
    text = "".join(v for _, v in toks)
    if "@" not in text:
        return text, ""
    local, _, host = text.rpartition("@")
    return local, host


def decode_phrase(name: str) -> str:
    """A display name with its encoded-words decoded (RFC 2047 5(3))."""
    return header_text(name.encode("utf-8")).strip() if "=?" in name else name.strip()


def _display(raw: bytes) -> tuple[bytes, bytes]:
    """(addr-mailbox key, RFC 5957 display key) of a From or To field."""
    name, local, host = first_address(raw)
    shown = name or (f"{local}@{host}" if host else local)
    return casemap(local), casemap(shown)


def _sent(raw: bytes) -> float | None:
    """RFC 5256 2.2: the Date field in UTC; None if it is not a valid date."""
    m = _DATE.match(raw)
    month = _MONTHS.get(m.group(2).lower()) if m is not None else None
    if m is not None and month is not None:  # RFC 5322 3.3, the usual form
        day, _, year, hour, minute, second, sign, zh, zm = m.groups()
        t = calendar.timegm((int(year), month, int(day), int(hour), int(minute), int(second or 0)))
        offset = int(zh) * 3600 + int(zm) * 60
        return float(t - offset if sign == b"+" else t + offset)
    try:
        parsed = email.utils.parsedate_tz(raw.decode("latin-1"))
        return None if parsed is None else float(email.utils.mktime_tz(parsed))
    except (ValueError, OverflowError, TypeError, IndexError):
        return None


def message_keys(block: bytes, interned: dict[bytes, bytes] | None = None) -> MessageKeys:
    """The L{MessageKeys} of a header block; C{interned} shares equal strings between messages."""
    fields: dict[bytes, bytes] = {}
    current = b""
    for line in block.split(b"\n"):
        if line[:1] in (b" ", b"\t"):  # RFC 5322 2.2.3: a folded line continues the field
            if current:
                fields[current] += line.rstrip(b"\r")
            continue
        name, colon, value = line.partition(b":")
        name = name.rstrip(b" \t").lower()
        if colon and name in _WANTED and name not in fields:  # the first of each counts
            fields[name] = value.rstrip(b"\r")
            current = name
        else:
            current = b""
    keys = MessageKeys()
    share = (lambda b: interned.setdefault(b, b)) if interned is not None else (lambda b: b)
    subject = fields.get(b"subject")
    if subject is not None:
        base, keys.reply = base_subject(subject)
        keys.subject = share(casemap(base))
    date = fields.get(b"date")
    if date is not None:
        keys.sent = _sent(date)
    if b"from" in fields:
        mailbox, display = _display(fields[b"from"])
        keys.from_mailbox, keys.from_display = share(mailbox), share(display)
    if b"to" in fields:
        mailbox, display = _display(fields[b"to"])
        keys.to_mailbox, keys.to_display = share(mailbox), share(display)
    if b"cc" in fields:
        keys.cc_mailbox = share(casemap(first_address(fields[b"cc"])[1]))
    mid = _MSG_ID.search(fields.get(b"message-id", b""))
    if mid is not None:
        keys.message_id = mid.group(1)
    # RFC 5256 3 (REFERENCES 1): the References field, else the first msg-id of In-Reply-To.
    refs = _MSG_ID.findall(fields.get(b"references", b""))
    if not refs:
        refs = _MSG_ID.findall(fields.get(b"in-reply-to", b""))[:1]
    keys.references = tuple(refs)
    return keys


@contextmanager
def collector_paused() -> Iterator[None]:
    """
    The cyclic garbage collector paused while a pool thread builds the keys or
    the thread tree of a big folder: those are 100,000s of new objects, and
    each collection they set off walks every object the server holds (the
    key cache among them), which tripled the time of a THREAD on 100,000
    messages. Whatever was paused, it runs again afterwards (if another job
    paused it first, that job resumes it).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class SortFieldCache:
    """
    L{MessageKeys} per folder (user, name, UIDVALIDITY) and UID, shared by all
    sessions, bounded by the number of messages held: the folders used least
    recently go first. Changed on the reactor thread only; a pool thread may
    look UIDs up in a folder's map (never iterate it) while it sorts.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._folders: OrderedDict[Any, dict[int, MessageKeys]] = OrderedDict()
        self._count = 0

    def folder(self, key: Any) -> dict[int, MessageKeys]:
        """The map of C{key}'s folder (empty if none is cached), marked as used."""
        got = self._folders.get(key)
        if got is None:
            return {}
        self._folders.move_to_end(key)
        return got

    def add(self, key: Any, new: dict[int, MessageKeys], live: int) -> None:
        """
        Keep C{new} for the folder; C{live} is its message count now: a map that
        grew to twice that holds mostly expunged UIDs and is started afresh.
        """
        if not new:
            return
        held = self._folders.get(key)
        if held is None or len(held) + len(new) > 2 * live + 1000:
            if held is not None:
                self._count -= len(held)
            held = {}
        before = len(held)
        held.update(new)  # lookups from a pool thread stay safe (no iteration)
        self._folders[key] = held
        self._folders.move_to_end(key)
        self._count += len(held) - before
        while self._count > self._limit and len(self._folders) > 1:
            _, dropped = self._folders.popitem(last=False)
            self._count -= len(dropped)

    def __len__(self) -> int:
        return self._count
