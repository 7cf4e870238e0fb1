"""
The MIME structure of a stored message, found by scanning it once in
chunks, and the IMAP renderings built on it: BODY and BODYSTRUCTURE
(RFC 3501 7.4.2, with the ENVELOPE of L{mailsrv.imap.envelope} for each
message/rfc822), and the byte ranges of BODY[section].

Nothing here holds a whole message in memory: the scanner reads lines, so a
50 MB attachment costs one pass over the file and a few small objects.
Malformed MIME is served as well as it can be, never raised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from mailsrv.imap.envelope import envelope as envelope
from mailsrv.imap.envelope import envelope_of_fields
from mailsrv.imap.imapstring import astring as astring
from mailsrv.imap.imapstring import nstring

_MAX_LINE = 64 * 1024


# --- headers -----------------------------------------------------------------


def split_header_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """
    Split a header block into (lower-case name, raw field bytes with CRLF,
    continuation lines included), in order. Lines without a colon are kept
    with an empty name so that the block's octets are preserved.
    """
    out: list[tuple[bytes, bytes]] = []
    for line in block.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and out:
            name, raw = out[-1]
            out[-1] = (name, raw + line)
            continue
        colon = line.find(b":")
        name = line[:colon].strip().lower() if colon > 0 else b""
        out.append((name, line))
    return out


_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.M)


def raw_values(block: bytes) -> dict[bytes, bytes]:
    """The first value of each field as it stands (folds and all), keyed by lower-case name."""
    end = block.find(b"\n\r\n")
    if end < 0:
        end = block.find(b"\n\n")
    if end >= 0:
        block = block[: end + 1]
    out: dict[bytes, bytes] = {}
    for m in _FIELD_RE.finditer(block):
        out.setdefault(m.group(1).lower(), m.group(2))
    return out


def _cleaned(raw: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {
        name: b" ".join(value.split()) if b"\n" in value else value.strip()
        for name, value in raw.items()
    }


def header_values(block: bytes) -> dict[bytes, bytes]:
    """The first value of each field, unfolded and stripped, keyed by lower-case name."""
    return _cleaned(raw_values(block))


def select_fields(block: bytes, names: list[bytes], negate: bool) -> bytes:
    """RFC 3501 6.4.5 HEADER.FIELDS[.NOT]: the chosen fields and a blank line."""
    wanted = {n.lower() for n in names}
    kept = [raw for name, raw in split_header_fields(block) if (name in wanted) != negate and name]
    return b"".join(r if r.endswith(b"\n") else r + b"\r\n" for r in kept) + b"\r\n"


def parse_params(value: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split ``type/sub; a=b; c="d"`` into the lower-case value and its parameters."""
    parts = _split_semicolons(value)
    main = parts[0].strip().lower() if parts else b""
    params = []
    for p in parts[1:]:
        k, eq, v = p.partition(b"=")
        k = k.strip()
        if not eq or not k:
            continue
        v = v.strip()
        if v.startswith(b'"'):
            v = v[1:-1] if v.endswith(b'"') and len(v) > 1 else v[1:]
            v = re.sub(rb"\\(.)", rb"\1", v)
        params.append((k, v))
    return main, params


def _split_semicolons(value: bytes) -> list[bytes]:
    out, cur, quoted, esc = [], bytearray(), False, False
    for c in value:
        ch = bytes((c,))
        if esc:
            esc = False
        elif ch == b"\\" and quoted:
            esc = True
        elif ch == b'"':
            quoted = not quoted
        elif ch == b";" and not quoted:
            out.append(bytes(cur))
            cur = bytearray()
            continue
        cur += ch
    out.append(bytes(cur))
    return out


def _param(params: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in params:
        if k.lower() == name:
            return v
    return None


# --- structure ---------------------------------------------------------------


@dataclass
class Part:
    """One MIME entity: where its header and body lie, and what it is."""

    header_start: int
    body_start: int = 0
    body_end: int = 0
    lines: int = 0
    mtype: bytes = b"text"
    subtype: bytes = b"plain"
    params: list[tuple[bytes, bytes]] = field(default_factory=list)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None  # the encapsulated message of message/rfc822
    envelope: bytes = b""  # ENVELOPE of a message (top level or message/rfc822)
    # BINARY sections measured (root only): path -> (decoded size, literal8) or the error
    binary: dict[tuple[int, ...], Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.body_end - self.body_start


class _Lines:
    """A line reader with offsets and one line of push-back."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.pos = 0
        self.count = 0  # line feeds read (RFC 3501 body-fld-lines counts them)
        self._back: tuple[int, bytes] | None = None

    def next(self) -> tuple[int, bytes]:
        if self._back is not None:
            item, self._back = self._back, None
            self.pos = item[0] + len(item[1])
            if item[1] and item[1][-1] == 10:  # a line feed
                self.count += 1
            return item
        start = self.pos
        line = self._f.readline(_MAX_LINE)
        self.pos += len(line)
        if line and line[-1] == 10:
            self.count += 1
        return start, line

    def push(self, item: tuple[int, bytes]) -> None:
        self._back = item
        self.pos = item[0]
        if item[1] and item[1][-1] == 10:
            self.count -= 1

    def lines_since(self, first: int, part: Part) -> int:
        """
        The line feeds in C{part}'s body, C{first} being the count at its
        start: RFC 2046 5.1.1, the line end before a delimiter is the
        delimiter's, not the body's.
        """
        n = self.count - first
        if part.body_end < self.pos and n > 0:
            n -= 1
        return n


def _delimiter(line: bytes, boundaries: list[bytes]) -> bytes | None:
    """The boundary this line delimits (with ``--`` appended when closing), or None."""
    if not line.startswith(b"--") or not boundaries:
        return None
    s = line.rstrip(b"\r\n").rstrip(b" \t")
    for b in reversed(boundaries):
        if s == b"--" + b:
            return b
        if s == b"--" + b + b"--":
            return b + b"--"
    return None


def _eol_len(line: bytes) -> int:
    if line.endswith(b"\r\n"):
        return 2
    return 1 if line.endswith(b"\n") else 0


def _parse_entity(
    r: _Lines, boundaries: list[bytes], default: bytes, depth: int, message: bool = False
) -> Part:
    """One entity from the reader's position; C{message} for a whole message (with an ENVELOPE)."""
    part = Part(header_start=r.pos)
    header = bytearray()
    while True:
        item = r.next()
        line = item[1]
        if not line:
            break
        if _delimiter(line, boundaries) is not None:
            r.push(item)
            break
        header += line
        if line in (b"\r\n", b"\n"):
            break
    part.body_start = r.pos
    first_body_line = r.count
    raw = raw_values(bytes(header))
    h = part.headers = _cleaned(raw)
    if message:
        part.envelope = envelope_of_fields(raw)
    ctype, params = parse_params(h.get(b"content-type", default))
    if b"/" not in ctype:
        ctype, params = (default, []) if b"content-type" not in h else (b"text/plain", params)
    mtype, _, subtype = ctype.partition(b"/")
    part.mtype, part.subtype, part.params = mtype.strip(), subtype.strip(), params
    boundary = _param(params, b"boundary")

    if part.mtype == b"multipart" and boundary and depth < 50:
        _parse_multipart(r, part, boundaries, boundary, depth)
        if not part.children:  # no parts at all: serve it as text
            part.mtype, part.subtype = b"text", b"plain"
            part.lines = r.lines_since(first_body_line, part)
        return part
    elif part.mtype == b"message" and part.subtype in (b"rfc822", b"global") and depth < 50:
        # RFC 3501 7.4.2 wants an ENVELOPE, BODY and line count for every
        # message/rfc822, so one in a (forbidden, RFC 2046 5.2.1) base64 or
        # quoted-printable encoding is read as it is, as Dovecot does.
        inner = _parse_entity(r, boundaries, b"text/plain", depth + 1, message=True)
        part.message = inner
        part.body_end = inner.body_end
        part.lines = r.lines_since(first_body_line, part)
        return part
    _parse_leaf(r, part, boundaries)
    part.lines = r.lines_since(first_body_line, part)
    return part


def _parse_leaf(r: _Lines, part: Part, boundaries: list[bytes]) -> None:
    prev = b""  # the line before the current one
    while True:
        item = r.next()
        line = item[1]
        if not line:
            part.body_end = r.pos
            return
        if boundaries and line[:2] == b"--" and _delimiter(line, boundaries) is not None:
            r.push(item)
            # RFC 2046 5.1.1: the CRLF before a boundary belongs to the boundary.
            part.body_end = max(part.body_start, item[0] - _eol_len(prev))
            return
        prev = line


def _parse_multipart(
    r: _Lines, part: Part, boundaries: list[bytes], boundary: bytes, depth: int
) -> None:
    inner = boundaries + [boundary]
    default = b"message/rfc822" if part.subtype == b"digest" else b"text/plain"
    last_eol = 0
    # Preamble: up to the first delimiter of ours.
    while True:
        item = r.next()
        if not item[1]:
            part.body_end = r.pos
            return
        d = _delimiter(item[1], inner)
        if d == boundary:
            break
        if d == boundary + b"--":  # closed before any part
            _epilogue(r, part, boundaries, item)
            return
        if d is not None:  # a parent's boundary
            r.push(item)
            part.body_end = max(part.body_start, item[0] - last_eol)
            return
        last_eol = _eol_len(item[1])
    while True:
        child = _parse_entity(r, inner, default, depth + 1)
        part.children.append(child)
        item = r.next()
        if not item[1]:
            part.body_end = r.pos
            return
        d = _delimiter(item[1], inner)
        if d == boundary:
            continue
        if d == boundary + b"--":
            break
        r.push(item)  # a parent's boundary ends us too
        part.body_end = child.body_end
        return
    _epilogue(r, part, boundaries, item)


def _epilogue(r: _Lines, part: Part, boundaries: list[bytes], item: tuple[int, bytes]) -> None:
    """After the close delimiter: up to a parent's delimiter or the end."""
    last_eol = _eol_len(item[1])
    part.body_end = r.pos
    while True:
        item = r.next()
        if not item[1]:
            part.body_end = r.pos
            return
        if _delimiter(item[1], boundaries) is not None:
            r.push(item)
            part.body_end = max(part.body_start, item[0] - last_eol)
            return
        last_eol = _eol_len(item[1])


def scan(f: BinaryIO) -> Part:
    """Scan a message (CRLF line ends) from C{f}, read once from the start; return its L{Part}."""
    r = _Lines(f)
    root = _parse_entity(r, [], b"text/plain", 0, message=True)
    first = r.count
    while r.next()[1]:  # whatever follows belongs to the message too
        pass
    if r.pos > root.body_end:
        root.body_end = r.pos
        root.lines += r.count - first
    return root


# --- BODY / BODYSTRUCTURE ----------------------------------------------------


def _params_list(params: list[tuple[bytes, bytes]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(nstring(k.lower()) + b" " + nstring(v) for k, v in params) + b")"


def _disposition(part: Part) -> bytes:
    value = part.headers.get(b"content-disposition")
    if not value:
        return b"NIL"
    kind, params = parse_params(value)
    if not kind:
        return b"NIL"
    return b"(" + nstring(kind.upper()) + b" " + _params_list(params) + b")"


def _language(part: Part) -> bytes:
    value = part.headers.get(b"content-language")
    if not value:
        return b"NIL"
    langs = [x.strip() for x in value.split(b",") if x.strip()]
    if len(langs) == 1:
        return nstring(langs[0])
    return b"(" + b" ".join(nstring(x) for x in langs) + b")"


def body_structure(part: Part, extended: bool = True) -> bytes:
    """RFC 3501 7.4.2 BODYSTRUCTURE (C{extended}) or BODY for C{part}."""
    if part.children:
        out = b"(" + b"".join(body_structure(c, extended) for c in part.children)
        out += b" " + nstring(part.subtype.upper())
        if extended:
            out += b" %s %s %s %s" % (
                _params_list(part.params),
                _disposition(part),
                _language(part),
                nstring(part.headers.get(b"content-location")),
            )
        return out + b")"
    h = part.headers
    fields = [
        nstring(part.mtype.upper()),
        nstring(part.subtype.upper()),
        _params_list(part.params),
        nstring(h.get(b"content-id")),
        nstring(h.get(b"content-description")),
        nstring(h.get(b"content-transfer-encoding", b"7BIT").upper()),
        b"%d" % part.size,
    ]
    if part.message is not None:
        fields += [
            part.message.envelope,
            body_structure(part.message, extended),
            b"%d" % part.lines,
        ]
    elif part.mtype == b"text":
        fields.append(b"%d" % part.lines)
    if extended:
        fields += [
            nstring(h.get(b"content-md5")),
            _disposition(part),
            _language(part),
            nstring(h.get(b"content-location")),
        ]
    return b"(" + b" ".join(fields) + b")"


# --- sections ----------------------------------------------------------------


def find_part(root: Part, path: list[int]) -> Part | None:
    """
    The part a section number names (RFC 3501 6.4.5), or None. A message's
    parts are its multipart's children, or its body alone as part 1 (so
    part 1 of a top-level message/rfc822 is the whole encapsulated message);
    a number after a message/rfc822 part counts the encapsulated message's parts.
    """
    node = root
    for i, n in enumerate(path):
        if i and node.message is not None:
            node = node.message
        if node.children:
            if not 1 <= n <= len(node.children):
                return None
            node = node.children[n - 1]
        elif n != 1 or (i + 1 < len(path) and node.message is None):
            return None  # only a message/rfc822 part has parts below its part 1
    return node


def section_range(root: Part, path: list[int], text: str) -> tuple[int, int] | None:
    """
    The byte range of a section: C{text} is "" (the part's content), "MIME",
    "HEADER" or "TEXT" (the latter two of a message or message/rfc822 part).
    HEADER.FIELDS uses the HEADER range and filters it.
    """
    node = find_part(root, path)
    if node is None:
        return None
    if not text:
        if not path:
            return 0, root.body_end
        return node.body_start, node.body_end
    if text == "MIME":
        if not path:
            return None
        return node.header_start, node.body_start
    if path:
        if node.message is None:
            return None
        node = node.message
    if text == "HEADER":
        return node.header_start, node.body_start
    if text == "TEXT":
        return node.body_start, node.body_end
    return None
