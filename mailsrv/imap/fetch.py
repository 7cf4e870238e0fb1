"""
FETCH (RFC 3501 6.4.5): the attribute list parsed into items, and the
per-message work of answering them, done off the reactor thread in batches.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.mail import imap4

from mailsrv.imap import condstore, mime

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

# A range at least this big is streamed from the file in chunks.
STREAM_AT = 256 * 1024


class FetchSyntaxError(Exception):
    """The FETCH attribute list is malformed (answered with BAD)."""


@dataclass(frozen=True)
class Section:
    """One BODY[...] / BODY.PEEK[...] / RFC822* item."""

    name: bytes  # what the response calls it, without <origin>
    peek: bool
    path: tuple[int, ...] = ()
    text: str = ""  # "", HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: tuple[bytes, ...] = ()
    partial: tuple[int, int] | None = None
    binary: str = ""  # RFC 3516: "BINARY" (decoded content) or "SIZE" (its size)


@dataclass
class FetchRequest:
    """What a FETCH asks for."""

    simple: list[str] = field(default_factory=list)  # FLAGS, UID, INTERNALDATE, ...
    sections: list[Section] = field(default_factory=list)
    order: list[Any] = field(default_factory=list)  # str or Section, in request order
    # RFC 7162 3.1.4 CHANGEDSINCE and 3.2.6 VANISHED (UID FETCH after ENABLE QRESYNC)
    modifiers: condstore.FetchModifiers = field(default_factory=condstore.FetchModifiers)

    @property
    def marks_seen(self) -> bool:
        return any(not s.peek for s in self.sections)

    @property
    def needs_disk(self) -> bool:
        return bool(self.sections) or any(
            s in ("ENVELOPE", "BODY", "BODYSTRUCTURE") for s in self.simple
        )

    @property
    def needs_structure(self) -> bool:
        return any(s in ("BODY", "BODYSTRUCTURE") for s in self.simple) or any(
            s.path or s.binary for s in self.sections
        )


_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SIMPLE = {
    "FLAGS",
    "INTERNALDATE",
    "RFC822.SIZE",
    "ENVELOPE",
    "BODYSTRUCTURE",
    "UID",
    "BODY",
    "MODSEQ",  # RFC 7162 3.1.4
}
_SECTION_RE = re.compile(rb"(BODY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d+)\.(\d+)>)?", re.I)
_ATOM_RE = re.compile(rb"[A-Za-z0-9.]+")
# RFC 3516 4.1: "BINARY" [".PEEK"] section-binary [partial] / "BINARY.SIZE" section-binary
_BINARY_RE = re.compile(
    rb"BINARY(\.PEEK|\.SIZE)?\[((?:[1-9]\d*(?:\.[1-9]\d*)*)?)\](?:<(\d+)\.(\d+)>)?", re.I
)


def parse_fetch(line: bytes) -> FetchRequest:
    """
    Parse a fetch attribute list and its modifiers (RFC 7162: CHANGEDSINCE
    implies MODSEQ, 3.1.4); raise L{FetchSyntaxError}.
    """
    atts, mods = condstore.split_fetch_modifiers(line)
    req = _parse_atts(atts)
    if mods is not None:
        try:
            req.modifiers = condstore.parse_fetch_modifiers(mods)
        except imap4.IllegalClientResponse as e:
            raise FetchSyntaxError(str(e)) from None
        if req.modifiers.changed_since is not None:
            _add(req, "MODSEQ")
    return req


def _parse_atts(line: bytes) -> FetchRequest:
    s = line.strip()
    req = FetchRequest()
    if not s:
        raise FetchSyntaxError("Missing fetch attributes")
    if s[:1] == b"(":
        if s[-1:] != b")":
            raise FetchSyntaxError("Unbalanced parentheses")
        s = s[1:-1].strip()
        if not s:
            raise FetchSyntaxError("Empty attribute list")
    elif s.upper().decode("ascii", "replace") in _MACROS:
        for name in _MACROS[s.upper().decode()]:
            _add(req, name)
        return req
    i = 0
    while i < len(s):
        if s[i : i + 1] == b" ":
            i += 1
            continue
        m = _SECTION_RE.match(s, i)
        if m:
            _add(req, _section(m))
            i = m.end()
            continue
        m = _BINARY_RE.match(s, i)
        if m:
            _add(req, _binary_section(m))
            i = m.end()
            continue
        m = _ATOM_RE.match(s, i)
        if not m:
            raise FetchSyntaxError("Bad fetch attribute")
        name = m.group(0).upper().decode()
        i = m.end()
        if name in _SIMPLE:
            _add(req, name)
        elif name == "RFC822":
            _add(req, Section(b"RFC822", peek=False))
        elif name == "RFC822.HEADER":
            _add(req, Section(b"RFC822.HEADER", peek=True, text="HEADER"))
        elif name == "RFC822.TEXT":
            _add(req, Section(b"RFC822.TEXT", peek=False, text="TEXT"))
        else:
            raise FetchSyntaxError(f"Unknown fetch attribute {name}")
        if i < len(s) and s[i : i + 1] not in (b" ",):
            raise FetchSyntaxError("Bad fetch attribute")
    return req


def _add(req: FetchRequest, item: Any) -> None:
    if isinstance(item, Section):
        req.sections.append(item)
    elif item in req.simple:
        return
    else:
        req.simple.append(item)
    req.order.append(item)


def _section(m: re.Match[bytes]) -> Section:
    peek = m.group(1).upper() == b"BODY.PEEK"
    spec = m.group(2).strip()
    path: list[int] = []
    text = ""
    fields: tuple[bytes, ...] = ()
    rest = spec
    while rest:
        num = re.match(rb"(\d+)(\.|$)", rest)
        if not num:
            break
        n = int(num.group(1))
        if n < 1:
            raise FetchSyntaxError("Bad section number")
        path.append(n)
        rest = rest[num.end() :]
    if rest:
        up = rest.upper()
        fm = re.match(rb"HEADER\.FIELDS(\.NOT)?\s*\(([^)]*)\)\s*$", rest, re.I)
        if fm:
            text = "HEADER.FIELDS.NOT" if fm.group(1) else "HEADER.FIELDS"
            fields = tuple(f.strip(b'"') for f in fm.group(2).split())
            if not fields:
                raise FetchSyntaxError("Empty header field list")
        elif up in (b"HEADER", b"TEXT") or (up == b"MIME" and path):
            text = up.decode()
        else:
            raise FetchSyntaxError("Bad section")
    section_name = b".".join(b"%d" % n for n in path)
    if text:
        label = text.encode()
        if fields:
            label += b" (" + b" ".join(fields) + b")"
        section_name = section_name + b"." + label if section_name else label
    partial = None
    if m.group(3) is not None:
        length = int(m.group(4))
        if length < 1:
            raise FetchSyntaxError("Bad partial length")
        partial = (int(m.group(3)), length)
    return Section(b"BODY[" + section_name + b"]", peek, tuple(path), text, fields, partial)


def _binary_section(m: re.Match[bytes]) -> Section:
    kind = (m.group(1) or b"").upper()
    path = tuple(int(n) for n in m.group(2).split(b".")) if m.group(2) else ()
    name = b"[" + m.group(2) + b"]"
    if kind == b".SIZE":
        if m.group(3) is not None:
            raise FetchSyntaxError("BINARY.SIZE takes no partial")
        return Section(b"BINARY.SIZE" + name, True, path, binary="SIZE")
    partial = None
    if m.group(3) is not None:
        if int(m.group(4)) < 1:
            raise FetchSyntaxError("Bad partial length")
        partial = (int(m.group(3)), int(m.group(4)))
    return Section(b"BINARY" + name, kind == b".PEEK", path, partial=partial, binary="BINARY")


def internal_date(ts: float) -> bytes:
    """RFC 3501 date-time, in UTC: "17-Jul-1996 09:44:25 +0000"."""
    t = time.gmtime(ts)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday,
        _MONTHS[t.tm_mon - 1].encode(),
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


@dataclass(frozen=True)
class Stream:
    """A byte range of a message to be streamed: the literal's octets follow."""

    uid: int
    start: int
    end: int
    # BINARY: C{start} and C{end} count decoded octets of these blocks (L{binary.Block})
    blocks: tuple[Any, ...] | None = None


def section_bytes(
    folder: Any, uid: int, size: int, sec: Section, root: mime.Part | None, header: bytes | None
) -> tuple[bytes | None, tuple[int, int] | None]:
    """
    Return (data, None) for small or computed sections, (None, (start, end))
    for a byte range of the message to stream, or (None, None) for NIL.
    Runs in a thread.
    """
    if sec.text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT") and not sec.path:
        block = header if header is not None else folder.read_headers(uid)
        if sec.text == "HEADER":
            return block, None
        return mime.select_fields(block, list(sec.fields), sec.text.endswith(".NOT")), None
    if not sec.path and sec.text == "":
        return None, (0, size)
    if not sec.path and sec.text == "TEXT":
        block = header if header is not None else folder.read_headers(uid)
        return None, (len(block), size)
    assert root is not None
    text = "HEADER" if sec.text.startswith("HEADER") else sec.text
    rng = mime.section_range(root, list(sec.path), text)
    if rng is None:
        return None, None
    if sec.text.startswith("HEADER."):
        block = read_range(folder, uid, rng[0], rng[1])
        return mime.select_fields(block, list(sec.fields), sec.text.endswith(".NOT")), None
    return None, rng


def skip(f: Any, n: int) -> None:
    """Move a message file forward C{n} octets (it may not be seekable)."""
    try:
        if f.seekable():
            f.seek(n, 1)
            return
    except (OSError, AttributeError, ValueError):
        pass
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


def read_range(folder: Any, uid: int, start: int, end: int) -> bytes:
    """Octets C{start} to C{end} of a message, padded with spaces if it is short."""
    with folder.open_message(uid) as f:
        skip(f, start)
        data = f.read(end - start)
    return data.ljust(end - start, b" ")
