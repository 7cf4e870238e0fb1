"""
The MIME structure of a stored message, found by scanning it once in
chunks, and the IMAP renderings built on it: ENVELOPE, BODY and
BODYSTRUCTURE (RFC 3501 7.4.2), and the byte ranges of BODY[section].

Nothing here holds a whole message in memory: the scanner reads lines, so a
50 MB attachment costs one pass over the file and a few small objects.
Malformed MIME is served as well as it can be, never raised.
"""

from __future__ import annotations

import email.utils
import functools
import re
from dataclasses import dataclass, field
from typing import BinaryIO

# RFC 3501 9: atom-specials that force a quoted string.
_ATOM_SAFE = re.compile(rb"^[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|}~]+$")
_MAX_LINE = 64 * 1024
_LITERAL_ONLY = re.compile(rb"[\r\n\0\x7f-\xff]")


# --- IMAP string output ------------------------------------------------------


def nstring(value: bytes | str | None) -> bytes:
    """An IMAP nstring: NIL, a quoted string, or a literal when it must be."""
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if _LITERAL_ONLY.search(value):
        return b"{%d}\r\n%s" % (len(value), value)
    if b"\\" in value or b'"' in value:
        value = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + value + b'"'


def astring(value: bytes | str) -> bytes:
    """An IMAP astring: an atom when safe, else a quoted string or literal."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if _ATOM_SAFE.match(value) and value.upper() != b"NIL":
        return value
    return nstring(value)


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


def header_values(block: bytes) -> dict[bytes, bytes]:
    """The first value of each field, unfolded and stripped, keyed by lower-case name."""
    end = block.find(b"\n\r\n")
    if end < 0:
        end = block.find(b"\n\n")
    if end >= 0:
        block = block[: end + 1]
    out: dict[bytes, bytes] = {}
    for m in _FIELD_RE.finditer(block):
        name = m.group(1).lower()
        if name not in out:
            value = m.group(2)
            out[name] = b" ".join(value.split()) if b"\n" in value else value.strip()
    return out


def select_fields(block: bytes, names: list[bytes], negate: bool) -> bytes:
    """RFC 3501 6.4.5 HEADER.FIELDS[.NOT]: the chosen fields and a blank line."""
    wanted = {n.lower() for n in names}
    kept = [raw for name, raw in split_header_fields(block) if (name in wanted) != negate and name]
    return b"".join(r if r.endswith(b"\n") else r + b"\r\n" for r in kept) + b"\r\n"


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


_ITEM_RE = re.compile(r'(?:"[^"]*"|[^,"])+')
_HARD = re.compile(r"[():;\\\[]")


def _parse_addresses(text: str) -> list[tuple[str, str]]:
    """
    (name, address) pairs. The common shapes (``a@b``, ``Name <a@b>``,
    ``"Name, Jr" <a@b>``, lists of them) are split here; anything with
    comments, groups, routes or escapes goes to the stdlib parser.
    """
    if _HARD.search(text):
        return email.utils.getaddresses([text])
    out = []
    for item in _ITEM_RE.findall(text):
        lt = item.find("<")
        if lt >= 0:
            gt = item.find(">", lt)
            if gt < 0:
                return email.utils.getaddresses([text])
            name = item[:lt].strip()
            if name.startswith('"') and name.endswith('"') and len(name) > 1:
                name = name[1:-1]
            out.append((name, item[lt + 1 : gt].strip()))
        else:
            addr = item.strip()
            if addr:
                if '"' in addr or " " in addr:
                    return email.utils.getaddresses([text])
                out.append(("", addr))
    return out


@functools.lru_cache(maxsize=8192)  # correspondents repeat across a folder
def _address_list(value: bytes | None) -> bytes:
    """RFC 3501 7.4.2: a parenthesised list of (name adl mailbox host), or NIL."""
    if value is None:
        return b"NIL"
    try:
        pairs = _parse_addresses(_text(value))
    except Exception:
        return b"NIL"
    items = []
    for name, addr in pairs:
        if not addr and not name:
            continue
        local, at, host = addr.rpartition("@")
        if not at:
            local, host = addr, ""
        items.append(
            b"("
            + nstring(name or None)
            + b" NIL "
            + nstring(local or None)
            + b" "
            + nstring(host or None)
            + b")"
        )
    return b"(" + b"".join(items) + b")" if items else b"NIL"


_ENVELOPE_FIELDS_RE = re.compile(
    rb"^(date|subject|from|sender|reply-to|to|cc|bcc|in-reply-to|message-id)[ \t]*:"
    rb"(.*(?:\r?\n[ \t].*)*)",
    re.M | re.I,
)


def envelope(block: bytes) -> bytes:
    """The ENVELOPE structure for a header block (RFC 3501 7.4.2)."""
    end = block.find(b"\n\r\n")
    if end >= 0:
        block = block[: end + 1]
    h: dict[bytes, bytes] = {}
    for name, value in _ENVELOPE_FIELDS_RE.findall(block):
        name = name.lower()
        if name not in h:
            h[name] = b" ".join(value.split()) if b"\n" in value else value.strip()
    return _envelope_from_values(h)


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

    @property
    def size(self) -> int:
        return self.body_end - self.body_start


class _Lines:
    """A line reader with offsets and one line of push-back."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.pos = 0
        self.count = 0  # lines read
        self._back: tuple[int, bytes] | None = None

    def next(self) -> tuple[int, bytes]:
        if self._back is not None:
            item, self._back = self._back, None
            self.pos = item[0] + len(item[1])
            if item[1]:
                self.count += 1
            return item
        start = self.pos
        line = self._f.readline(_MAX_LINE)
        self.pos += len(line)
        if line:
            self.count += 1
        return start, line

    def push(self, item: tuple[int, bytes]) -> None:
        self._back = item
        self.pos = item[0]
        if item[1]:
            self.count -= 1


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


def _parse_entity(r: _Lines, boundaries: list[bytes], default: bytes, depth: int) -> Part:
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
    h = part.headers = header_values(bytes(header))
    ctype, params = parse_params(h.get(b"content-type", default))
    if b"/" not in ctype:
        ctype, params = (default, []) if b"content-type" not in h else (b"text/plain", params)
    mtype, _, subtype = ctype.partition(b"/")
    part.mtype, part.subtype, part.params = mtype.strip(), subtype.strip(), params
    boundary = _param(params, b"boundary")
    encoding = h.get(b"content-transfer-encoding", b"7bit").lower()

    if part.mtype == b"multipart" and boundary and depth < 50:
        _parse_multipart(r, part, boundaries, boundary, depth)
        if not part.children:  # no parts at all: serve it as text
            part.mtype, part.subtype = b"text", b"plain"
            part.lines = r.count - first_body_line
        return part
    elif (
        part.mtype == b"message"
        and part.subtype in (b"rfc822", b"global")
        and encoding in (b"7bit", b"8bit", b"binary")
        and depth < 50
    ):
        inner = _parse_entity(r, boundaries, b"text/plain", depth + 1)
        inner.envelope = _envelope_from_values(inner.headers)
        part.message = inner
        part.body_end = inner.body_end
        part.lines = r.count - first_body_line
        return part
    _parse_leaf(r, part, boundaries)
    return part


def _envelope_from_values(h: dict[bytes, bytes]) -> bytes:
    frm = _address_list(h.get(b"from"))
    sender = _address_list(h[b"sender"]) if b"sender" in h else frm
    reply_to = _address_list(h[b"reply-to"]) if b"reply-to" in h else frm
    return b"(%s %s %s %s %s %s %s %s %s %s)" % (
        nstring(h.get(b"date")),
        nstring(h.get(b"subject")),
        frm,
        sender,
        reply_to,
        _address_list(h.get(b"to")),
        _address_list(h.get(b"cc")),
        _address_list(h.get(b"bcc")),
        nstring(h.get(b"in-reply-to")),
        nstring(h.get(b"message-id")),
    )


def _parse_leaf(r: _Lines, part: Part, boundaries: list[bytes]) -> None:
    lines = 0
    last_eol = 0
    end = part.body_start
    while True:
        item = r.next()
        line = item[1]
        if not line:
            end = r.pos
            break
        if boundaries and line[:2] == b"--" and _delimiter(line, boundaries) is not None:
            r.push(item)
            # RFC 2046 5.1.1: the CRLF before a boundary belongs to the boundary.
            end = max(part.body_start, item[0] - last_eol)
            break
        lines += 1
        last_eol = _eol_len(line)
        end = r.pos
    part.body_end = end
    part.lines = lines


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
    root = _parse_entity(r, [], b"text/plain", 0)
    while r.next()[1]:  # whatever follows belongs to the message too
        pass
    root.body_end = r.pos
    root.envelope = _envelope_from_values(root.headers)
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
    """The part a section number names (RFC 3501 6.4.5), or None."""
    node = root
    for n in path:
        if node.message is not None:
            node = node.message
        if node.children:
            if not 1 <= n <= len(node.children):
                return None
            node = node.children[n - 1]
        elif n != 1:
            return None
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
