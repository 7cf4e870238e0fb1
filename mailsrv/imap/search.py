"""
IMAP SEARCH (RFC 3501 6.4.4): the search keys parsed into a tree, and the
tree evaluated against a folder's messages. Keys that need only the index
(flags, sizes, dates, UIDs) never touch the disk; header keys read only the
header block; BODY and TEXT read the message.
"""

from __future__ import annotations

import calendar
import email.header
import email.parser
import email.policy
import email.utils
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from mailsrv.imap import searchmask
from mailsrv.imap.addrtext import address_text
from mailsrv.imap.mime import header_values, split_header_fields
from mailsrv.imap.searchmask import FLAG_KEYS
from mailsrv.interfaces import SEEN, MessageInfo


class SearchError(Exception):
    """The search program is malformed (answered with BAD)."""


class BadCharset(Exception):
    """RFC 3501 6.4.4: NO [BADCHARSET]."""


@dataclass(frozen=True)
class Literal:
    """A string that came as a quoted string or a literal (not an atom)."""

    value: bytes


_MONTHS = {
    m: i
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}


def tokenize(line: bytes) -> list[Any]:
    """Split search text into "(", ")", atoms (bytes) and L{Literal} strings."""
    out: list[Any] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i : i + 1]
        if c in (b" ", b"\t"):
            i += 1
        elif c in (b"(", b")"):
            out.append(c.decode())
            i += 1
        elif c == b'"':
            buf = bytearray()
            i += 1
            while i < n and line[i : i + 1] != b'"':
                if line[i : i + 1] == b"\\" and i + 1 < n:
                    i += 1
                buf += line[i : i + 1]
                i += 1
            if i >= n:
                raise SearchError("Unbalanced quotes")
            i += 1
            out.append(Literal(bytes(buf)))
        else:
            j = i
            while j < n and line[j : j + 1] not in (b" ", b"(", b")", b'"'):
                j += 1
            out.append(line[i:j])
            i = j
    return out


def _date(tok: Any) -> tuple[int, int, int]:
    raw = tok.value if isinstance(tok, Literal) else tok
    try:
        d, m, y = raw.decode("ascii").split("-")
        return int(y), _MONTHS[m.lower()], int(d)
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError):
        raise SearchError(f"Bad date {raw!r}")


def _string(tok: Any, charset: str) -> str:
    raw = tok.value if isinstance(tok, Literal) else tok
    if not isinstance(raw, bytes) or raw in ("(", ")"):
        raise SearchError("Missing string")
    try:
        return raw.decode(charset).casefold()
    except (UnicodeDecodeError, LookupError):
        raise BadCharset(charset)


# How deep parentheses, NOT and OR may nest. RFC 3501 sets no limit; real
# clients stay within a few levels, and the tree is evaluated recursively.
MAX_NESTING = 64


def parse(tokens: list[Any], charset: str = "utf-8", saved: Collection[int] | None = None) -> tuple:
    """
    Parse tokens into a tree: ("and", [...]), ("or", a, b), ("not", a), (key,
    args...). C{saved}: the UIDs C{$} names (RFC 5182 2.2), None where C{$}
    cannot be used.
    """
    if charset.lower() in ("us-ascii", "ascii"):
        charset = "ascii"
    elif charset.lower() not in ("utf-8", "utf8"):
        raise BadCharset(charset)
    pos = 0
    depth = 0

    def take() -> Any:
        nonlocal pos
        if pos >= len(tokens):
            raise SearchError("Missing search key")
        tok = tokens[pos]
        pos += 1
        return tok

    def value() -> Any:
        """A key's argument: an atom or a string, not a parenthesis."""
        tok = take()
        if tok in ("(", ")"):
            raise SearchError("Missing argument")
        return tok

    def one() -> tuple:
        nonlocal depth
        depth += 1
        try:
            return key_of(take())
        finally:
            depth -= 1

    def saved_key() -> tuple:
        # RFC 5182 2.2: "$" (alone or after UID) is the saved result, by UID.
        if saved is None:
            raise SearchError("$ cannot be used here")
        return ("saved", frozenset(saved))

    def key_of(tok: Any) -> tuple:
        if depth > MAX_NESTING:
            raise SearchError("Search keys nested too deeply")
        if tok == "(":
            items = []
            while pos < len(tokens) and tokens[pos] != ")":
                items.append(one())
            if take() != ")":
                raise SearchError("Unbalanced parentheses")
            if not items:
                raise SearchError("Empty parentheses")
            return ("and", items)
        if tok == ")":
            raise SearchError("Unbalanced parentheses")
        if isinstance(tok, Literal):
            raise SearchError("Unexpected string")
        key = tok.decode("ascii", "replace").upper()
        if key == "$":
            return saved_key()
        if key[:1].isdigit() or key[:1] == "*":
            return ("seqset", tok)
        if key in ("ALL", "NEW", "OLD", "RECENT") or key in FLAG_KEYS:
            return (key,)
        if key in ("BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"):
            return (key, _string(take(), charset))
        if key == "HEADER":
            name = _string(take(), "ascii")
            return (key, name.encode(), _string(take(), charset))
        if key in ("KEYWORD", "UNKEYWORD"):
            t = value()
            return (key, (t.value if isinstance(t, Literal) else t).decode("utf-8", "replace"))
        if key in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
            return (key, _date(take()))
        if key in ("LARGER", "SMALLER"):
            t = value()
            try:
                return (key, int(t.value if isinstance(t, Literal) else t))
            except (ValueError, TypeError):
                raise SearchError("Bad number")
        if key == "UID":
            t = value()
            return saved_key() if t == b"$" else (key, t)
        if key == "MODSEQ":
            # RFC 7162 3.1.5: MODSEQ [entry-name entry-type-req] mod-sequence-valzer;
            # the entry (a flag's own mod-sequence) may be ignored, as the RFC allows.
            t = value()
            if isinstance(t, Literal):
                kind = value()
                if not isinstance(kind, bytes) or kind.lower() not in (b"priv", b"shared", b"all"):
                    raise SearchError("Bad MODSEQ entry type")
                t = value()
            if isinstance(t, Literal) or not t.isdigit() or len(t) > 19 or int(t) >= 1 << 63:
                raise SearchError("Bad mod-sequence value")
            return (key, int(t))
        if key in ("OLDER", "YOUNGER"):  # RFC 5032 (WITHIN): an interval in seconds
            t = value()
            raw = t.value if isinstance(t, Literal) else t
            if not (isinstance(raw, bytes) and raw.isdigit() and 0 < int(raw) <= 4294967295):
                raise SearchError("Invalid search interval parameter")
            return (key, int(raw))
        if key == "NOT":
            return ("not", one())
        if key == "OR":
            return ("or", one(), one())
        raise SearchError(f"Unknown search key {key}")

    items = []
    while pos < len(tokens):
        items.append(one())
    if not items:
        raise SearchError("Missing search key")
    return ("and", items)


def uses_modseq(tree: tuple) -> bool:
    """Whether the tree has a MODSEQ key (RFC 7162 3.1.5: the answer then names the highest)."""
    kind = tree[0]
    if kind == "and":
        return any(uses_modseq(t) for t in tree[1])
    if kind == "or":
        return uses_modseq(tree[1]) or uses_modseq(tree[2])
    if kind == "not":
        return uses_modseq(tree[1])
    return bool(kind == "MODSEQ")


def uses_recent(tree: tuple) -> bool:
    """Whether the tree has RECENT, NEW or OLD (which read the session's \\Recent set)."""
    kind = tree[0]
    if kind == "and":
        return any(uses_recent(t) for t in tree[1])
    if kind == "or":
        return uses_recent(tree[1]) or uses_recent(tree[2])
    if kind == "not":
        return uses_recent(tree[1])
    return kind in ("RECENT", "NEW", "OLD")


def needs(tree: tuple) -> set[str]:
    """Which of "headers" and "body" the tree needs read from disk."""
    out: set[str] = set()
    kind = tree[0]
    if kind in ("and",):
        for t in tree[1]:
            out |= needs(t)
    elif kind == "or":
        out |= needs(tree[1]) | needs(tree[2])
    elif kind == "not":
        out |= needs(tree[1])
    elif kind in (
        "BCC",
        "CC",
        "FROM",
        "SUBJECT",
        "TO",
        "HEADER",
        "SENTBEFORE",
        "SENTON",
        "SENTSINCE",
    ):
        out.add("headers")
    elif kind in ("BODY", "TEXT"):
        out.add("body")
    return out


def _decode_header(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    try:
        return str(email.header.make_header(email.header.decode_header(text))).casefold()
    except Exception:
        return text.casefold()


def _address_text(value: str) -> str:
    """An address field as SEARCH matches it (L{address_text}), case folded."""
    try:
        return address_text(value).casefold()
    except Exception:  # the parser is lenient; the raw text is the last resort
        return _decode_header(value.encode("utf-8", "replace"))


def _day(ts: float) -> tuple[int, int, int]:
    t = time.gmtime(ts)
    return t.tm_year, t.tm_mon, t.tm_mday


def _sent_day(headers: dict[bytes, bytes]) -> tuple[int, int, int] | None:
    raw = headers.get(b"date")
    if not raw:
        return None
    parsed = email.utils.parsedate_tz(raw.decode("latin-1"))
    if parsed is None:
        return None
    return parsed[0], parsed[1], parsed[2]


def _body_text(data: bytes) -> str:
    """The decoded text of a message's parts, for BODY/TEXT search."""
    if len(data) > 20 * 1024 * 1024:
        return data.decode("utf-8", "replace").casefold()
    try:
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
        chunks = []
        for part in msg.walk():
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            charset = part.get_content_charset() or "utf-8"
            try:
                chunks.append(payload.decode(charset, "replace"))
            except LookupError:
                chunks.append(payload.decode("utf-8", "replace"))
        body_start = data.find(b"\r\n\r\n")
        raw = data[body_start + 4 :] if body_start >= 0 else b""
        chunks.append(raw.decode("utf-8", "replace"))
        return "\n".join(chunks).casefold()
    except Exception:
        return data.decode("utf-8", "replace").casefold()


class _Message:
    """One message's header and body for the keys that read them, each read once."""

    __slots__ = ("_headers", "_body", "_block", "_vals", "_text")

    def __init__(self, headers: Callable[[], bytes], body: Callable[[], Any]) -> None:
        self._headers = headers
        self._body = body
        self._block: bytes | None = None
        self._vals: dict[bytes, bytes] | None = None
        self._text: Any = None

    def block(self) -> bytes:
        if self._block is None:
            self._block = self._headers()
        return self._block

    def values(self) -> dict[bytes, bytes]:
        if self._vals is None:
            self._vals = header_values(self.block())
        return self._vals

    def field(self, name: bytes) -> str:
        # A line without a field name (no colon) is no field (RFC 5322 2.2).
        parts = [
            raw.partition(b":")[2]
            for n, raw in split_header_fields(self.block())
            if n and n == name
        ]
        return " ".join(_decode_header(b" ".join(p.split())) for p in parts)

    def addresses(self, name: bytes) -> str:
        # RFC 3501 6.4.4: FROM/TO/CC/BCC match the addresses as parsed
        # (comments and spacing left out) and the display names decoded.
        texts = []
        for n, raw in split_header_fields(self.block()):
            if n and n == name:
                value = b" ".join(raw.partition(b":")[2].split()).decode("utf-8", "replace")
                texts.append(_address_text(value))
        return ", ".join(t for t in texts if t)

    def in_body(self, needle: str) -> bool:
        if self._text is None:
            data = self._body()
            self._text = _body_text(data) if isinstance(data, bytes) else data
        got = self._text
        if isinstance(got, str):
            return needle in got
        return _search_chunks(got, needle)


# A compiled search key: (sequence number, index entry, the message's text or None) -> match.
Test = Callable[[int, MessageInfo, Any], bool]


class Matcher:
    """
    Evaluate a search tree: one message at a time (L{match}, the tree
    compiled once into closures), or for programs that need only the index a
    whole view at once (L{mask}).
    """

    def __init__(
        self,
        tree: tuple,
        last_seq: int,
        last_uid: int,
        recent: set[int],
        parse_set: Callable[[bytes, int], Any],
        now: float | None = None,
    ) -> None:
        """C{now}: the time OLDER and YOUNGER count back from (RFC 5032), if not the clock's."""
        self.now = int(time.time() if now is None else now)
        self.tree = tree
        self.last_seq = last_seq
        self.last_uid = last_uid
        self.recent = recent
        self._sets: dict[tuple[bytes, int], Any] = {}
        self._parse_set = parse_set
        self.index_only = not needs(tree)
        self._test: Test | None = None

    def _set(self, raw: bytes, last: int) -> Any:
        key = (raw, last)
        if key not in self._sets:
            try:
                self._sets[key] = self._parse_set(raw, last)
            except Exception:
                raise SearchError("Bad message set")
        return self._sets[key]

    def _seq_set(self, raw: bytes) -> Any:
        return self._set(raw, self.last_seq)

    def _uid_set(self, arg: Any) -> Any:
        return self._set(arg.value if isinstance(arg, Literal) else arg, self.last_uid)

    def match(
        self,
        seq: int,
        info: MessageInfo,
        headers: Callable[[], bytes],
        body: Callable[[], Any],
    ) -> bool:
        """
        C{headers()} returns the header block; C{body()} returns the whole
        message as bytes, or for a big message an iterable of chunks, searched
        as raw text without loading it whole.
        """
        return self.test(seq, info, None if self.index_only else _Message(headers, body))

    @property
    def test(self) -> Test:
        """The tree compiled: C{test(seq, info, message)}; C{message} may be None if L{index_only}."""
        if self._test is None:
            self._test = self._compile(self.tree)
        return self._test

    def mask(self, infos: Sequence[MessageInfo]) -> bytes | None:
        """
        For a program that needs only the index, which of C{infos} (the view,
        in sequence order) match: a byte a message, 1 or 0; or None where the
        program must be evaluated per message (L{match}): a key that reads
        the message, a message set that does not parse (the per-message
        evaluation says whether that is an error) or of an unknown kind.
        """
        if not self.index_only:
            return None
        try:
            evaluation = searchmask.Evaluation(
                searchmask.columns(infos), self.recent, self.now, self._seq_set, self._uid_set
            )
            for raw, uid in _sets_of(self.tree):
                searchmask.spans_of(self._uid_set(raw) if uid else self._seq_set(raw))
            bits = evaluation.mask(self.tree)
        except (searchmask.NoBulk, SearchError):
            return None
        return bits.to_bytes(len(infos), "little")

    def _compile(self, t: tuple) -> Test:
        k = t[0]
        if k == "and":
            parts = [self._compile(x) for x in t[1]]
            if len(parts) == 1:
                return parts[0]
            if len(parts) == 2:
                a, b = parts
                return lambda s, i, m: a(s, i, m) and b(s, i, m)
            return lambda s, i, m: all(f(s, i, m) for f in parts)
        if k == "or":
            a, b = self._compile(t[1]), self._compile(t[2])
            return lambda s, i, m: a(s, i, m) or b(s, i, m)
        if k == "not":
            a = self._compile(t[1])
            return lambda s, i, m: not a(s, i, m)
        if k == "ALL":
            return lambda s, i, m: True
        if k in FLAG_KEYS:
            flag, want = FLAG_KEYS[k]
            if want:
                return lambda s, i, m: flag in i.flags
            return lambda s, i, m: flag not in i.flags
        recent = self.recent
        if k == "RECENT":
            return lambda s, i, m: i.uid in recent
        if k == "NEW":
            return lambda s, i, m: i.uid in recent and SEEN not in i.flags
        if k == "OLD":
            return lambda s, i, m: i.uid not in recent
        arg = t[1]
        if k == "KEYWORD":
            return lambda s, i, m: arg in i.flags
        if k == "UNKEYWORD":
            return lambda s, i, m: arg not in i.flags
        if k == "MODSEQ":
            return lambda s, i, m: i.modseq >= arg
        if k == "LARGER":
            return lambda s, i, m: i.size > arg
        if k == "SMALLER":
            return lambda s, i, m: i.size < arg
        if k == "seqset":  # parsed when first needed: a bad set is an error only then
            return lambda s, i, m: s in self._seq_set(arg)
        if k == "saved":
            return lambda s, i, m: i.uid in arg
        if k == "UID":
            return lambda s, i, m: i.uid in self._uid_set(arg)
        now = self.now
        if k == "OLDER":  # RFC 5032: whole seconds, as Dovecot counts them
            return lambda s, i, m: int(i.internal_date) <= now - arg
        if k == "YOUNGER":
            return lambda s, i, m: int(i.internal_date) >= now - arg
        if k in ("BEFORE", "ON", "SINCE"):
            return lambda s, i, m: _cmp(k, _day(i.internal_date), arg)
        if k in ("SENTBEFORE", "SENTON", "SENTSINCE"):

            def sent(s: int, i: MessageInfo, m: _Message) -> bool:
                day = _sent_day(m.values())
                return day is not None and _cmp(k[4:], day, arg)

            return sent
        if k in ("FROM", "TO", "CC", "BCC"):
            name = k.lower().encode()
            return lambda s, i, m: arg in m.addresses(name)
        if k == "SUBJECT":
            return lambda s, i, m: arg in m.field(b"subject")
        if k == "HEADER":
            name, text = arg.lower(), t[2]
            if not name:
                return lambda s, i, m: False
            if not text:
                return lambda s, i, m: any(n == name for n, _ in split_header_fields(m.block()))
            return lambda s, i, m: text in m.field(name)
        if k == "BODY":
            return lambda s, i, m: m.in_body(arg)
        if k == "TEXT":
            return lambda s, i, m: m.in_body(arg) or arg in _decode_header(m.block())
        raise SearchError(f"Unknown key {k}")


def _sets_of(tree: tuple) -> list[tuple[Any, bool]]:
    """The message sets of a tree: (argument, whether of UIDs)."""
    kind = tree[0]
    if kind == "and":
        return [s for t in tree[1] for s in _sets_of(t)]
    if kind == "or":
        return _sets_of(tree[1]) + _sets_of(tree[2])
    if kind == "not":
        return _sets_of(tree[1])
    if kind == "seqset":
        return [(tree[1], False)]
    if kind == "UID":
        return [(tree[1], True)]
    return []


def _search_chunks(chunks_factory: Callable[[], Any], needle: str) -> bool:
    """Case-insensitive search of raw message text, chunk by chunk, with overlap."""
    keep = max(1, len(needle.encode("utf-8")) * 4)
    tail = ""
    for chunk in chunks_factory():
        text = tail + chunk.decode("utf-8", "replace").casefold()
        if needle in text:
            return True
        tail = text[-keep:]
    return False


def _cmp(kind: str, day: tuple[int, int, int], ref: tuple[int, int, int]) -> bool:
    if kind == "BEFORE":
        return day < ref
    if kind == "ON":
        return day == ref
    return day >= ref


def epoch_of(day: tuple[int, int, int]) -> float:
    return float(calendar.timegm((day[0], day[1], day[2], 0, 0, 0)))
