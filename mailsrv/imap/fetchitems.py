"""
FETCH responses (RFC 3501 7.4.2): one formatter per fetch item name in
L{FETCH_ITEMS}, the BODY[...] sections, and the assembly of a message's
response from them, with the large section octets left as L{Stream}s for
the command to send from the file.

L{prepare_batch} runs in the thread pool; L{simple_response} (only items
held in memory) runs on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mailsrv.imap import binary, mime
from mailsrv.imap.fetch import (
    STREAM_AT,
    Section,
    Stream,
    internal_date,
    read_range,
    section_bytes,
    skip,
)
from mailsrv.imap.responses import literal, literal_head
from mailsrv.interfaces import MessageInfo


class MessageFetch:
    """
    One message being answered: what the formatters read (its folder, index
    row, formatted flags, cached envelope and MIME structure) and what they
    found on the way (the header block, a new envelope or structure to cache).
    """

    __slots__ = ("folder", "info", "flags", "envelope", "structure", "header", "new_envelope")

    def __init__(
        self,
        folder: Any,
        info: MessageInfo,
        flags: bytes,
        envelope: bytes | None = None,
        structure: mime.Part | None = None,
    ) -> None:
        self.folder = folder
        self.info = info
        self.flags = flags
        self.envelope = envelope
        self.structure = structure
        self.header: bytes | None = None
        self.new_envelope: bytes | None = None

    def headers(self) -> bytes:
        """The message's header block, read once."""
        if self.header is None:
            self.header = self.folder.read_headers(self.info.uid)
        return self.header


def _uid(m: MessageFetch) -> bytes:
    return b"UID %d" % m.info.uid


def _flags(m: MessageFetch) -> bytes:
    return b"FLAGS " + m.flags


def _size(m: MessageFetch) -> bytes:
    return b"RFC822.SIZE %d" % m.info.size


def _internal_date(m: MessageFetch) -> bytes:
    return b"INTERNALDATE " + internal_date(m.info.internal_date)


def _envelope(m: MessageFetch) -> bytes:
    if m.envelope is None:
        if m.structure is not None:
            m.envelope = m.new_envelope = m.structure.envelope
        else:
            m.envelope = m.new_envelope = mime.envelope(m.headers())
    return b"ENVELOPE " + m.envelope


def _body_structure(m: MessageFetch) -> bytes:
    assert m.structure is not None
    return b"BODYSTRUCTURE " + mime.body_structure(m.structure, True)


def _body(m: MessageFetch) -> bytes:
    assert m.structure is not None
    return b"BODY " + mime.body_structure(m.structure, False)


def _modseq(m: MessageFetch) -> bytes:
    return b"MODSEQ (%d)" % m.info.modseq  # RFC 7162 3.1.4.1


Formatter = Callable[[MessageFetch], bytes]

# Every fetch item name other than a section (L{mailsrv.imap.fetch.parse_fetch}
# refuses any other with BAD), and the formatter of its response field.
FETCH_ITEMS: dict[str, Formatter] = {
    "UID": _uid,
    "FLAGS": _flags,
    "RFC822.SIZE": _size,
    "INTERNALDATE": _internal_date,
    "ENVELOPE": _envelope,
    "BODYSTRUCTURE": _body_structure,
    "BODY": _body,
    "MODSEQ": _modseq,
}


class Refusal:
    """Ends a message's pieces when a section cannot be answered: the tagged NO to send (RFC 3516 4.2)."""

    def __init__(self, error: binary.BinaryError) -> None:
        self.text = b"[" + error.code + b"] " + error.text


def binary_field(m: MessageFetch, item: Section) -> tuple[bytes, Stream | None]:
    """
    The response field of a BINARY[...] or BINARY.SIZE[...] item (RFC 3516
    4.3): the decoded octets as a literal, or a literal8 when something was
    decoded or they hold a NUL (as Dovecot); a part that does not exist is
    empty, as Dovecot answers. Raises L{binary.BinaryError}.
    """
    assert m.structure is not None
    found = binary.section_info(m.folder, m.info.uid, m.structure, item.path)
    if item.binary == "SIZE":
        return item.name + b" %d" % (found[1] if found else 0), None
    label = item.name
    blocks, size, literal8 = found if found else ([], 0, False)
    start, end = 0, size
    if item.partial is not None:
        off, length = item.partial
        label += b"<%d>" % off
        start = min(off, size)
        end = min(start + length, size)
    head = label + (b" ~{%d}\r\n" if literal8 else b" {%d}\r\n") % (end - start)
    if end - start >= STREAM_AT:
        return head, Stream(m.info.uid, start, end, tuple(blocks))
    data = b""
    if end > start:
        reader = binary.open_section(m.folder, m.info.uid, blocks)
        try:
            skip(reader, start)
            data = reader.read(end - start)
        finally:
            reader.close()
    return head + data.ljust(end - start, b" "), None


def section_field(m: MessageFetch, item: Section) -> tuple[bytes, Stream | None]:
    """
    The response field of a BODY[...] (or RFC822*) item: the whole field, or
    its start C{NAME {n}CRLF} and the L{Stream} of the C{n} octets to send
    from the file after it.
    """
    if item.binary:
        return binary_field(m, item)
    folder, info = m.folder, m.info
    header = m.header
    if header is None and item.text and not item.path and item.text != "MIME":
        header = m.headers()
    data, rng = section_bytes(folder, info.uid, info.size, item, m.structure, header)
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
        return label + b" NIL", None
    if data is not None:
        return literal(label, data), None
    if rng is None:
        raise AssertionError("unreachable")
    if rng[1] - rng[0] < STREAM_AT:
        data = read_range(folder, info.uid, rng[0], rng[1])
        return literal(label, data), None
    return literal_head(label, rng[1] - rng[0]), Stream(info.uid, rng[0], rng[1])


def formatters(items: Sequence[Any]) -> list[Formatter | Section]:
    """The formatter of each item (a L{Section} stands for itself); KeyError for an unknown one."""
    return [item if isinstance(item, Section) else FETCH_ITEMS[item] for item in items]


def simple_formatters(items: Sequence[str]) -> list[Formatter]:
    """The formatter of each item, none a section; KeyError for an unknown one."""
    return [FETCH_ITEMS[item] for item in items]


def simple_response(seq: int, m: MessageFetch, fields: Sequence[Formatter]) -> bytes:
    """The FETCH response of a message whose items are all in memory (no sections)."""
    return b"* %d FETCH (%s)\r\n" % (seq, b" ".join([f(m) for f in fields]))


def message_response(seq: int, m: MessageFetch, fields: Sequence[Formatter | Section]) -> list[Any]:
    """
    The FETCH response of one message: bytes, with a L{Stream} wherever
    section octets are to be sent from the file. A BINARY section that
    cannot be decoded ends the response there (with C{UID} if nothing came
    before, as Dovecot) and the pieces with a L{Refusal}.
    """
    segments: list[Any] = []
    parts: list[bytes] = []
    refusal = None
    for f in fields:
        if isinstance(f, Section):
            try:
                field, stream = section_field(m, f)
            except binary.BinaryError as e:
                refusal = Refusal(e)
                if not parts and not segments:
                    parts.append(_uid(m))
                break
            parts.append(field)
            if stream is not None:
                segments.append(b" ".join(parts))
                parts.clear()
                segments.append(stream)
        else:
            parts.append(f(m))
    if parts:
        segments.append(b" ".join(parts))
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
    if refusal is not None:
        pieces.append(refusal)
    return pieces


def prepare_batch(
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
    fields = formatters(items)
    # Without sections a response is one line: formatted as such, a good deal faster.
    simple = None if any(isinstance(f, Section) for f in fields) else simple_formatters(items)
    out: list[Any] = []
    for seq, info, flags, env, root in job:
        try:
            m = MessageFetch(folder, info, flags, env, root)
            new_root = None
            if need_structure and root is None:
                with folder.open_message(info.uid) as f:
                    m.structure = new_root = mime.scan(f)
            if simple is not None:
                pieces = [simple_response(seq, m, simple)]
            else:
                pieces = message_response(seq, m, fields)
            out.append((pieces, m.new_envelope, new_root))
        except KeyError:
            out.append(None)
    return out
