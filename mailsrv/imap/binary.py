"""
BINARY[section] (RFC 3516): a part's content with its
Content-Transfer-Encoding undone, read as a file so that the FETCH
streaming sends it in chunks from the thread pool.

A section is laid out as L{Block}s, as Dovecot does: a leaf part in base64
or quoted-printable is decoded; in a multipart or message/rfc822 section,
every such descendant is decoded and its header says
C{Content-Transfer-Encoding: binary}; everything else is sent as stored.
The decoded size and whether a literal8 is due are measured once per
section and kept with the message's MIME structure (L{mime.Part.binary}).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Any

from mailsrv.imap import mime
from mailsrv.imap.fetch import skip

CHUNK = 256 * 1024
_IDENTITY = {b"", b"7bit", b"8bit", b"binary"}
_CONVERTED = {b"base64", b"quoted-printable"}
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_WHITESPACE = b" \t\r\n"
_TRAILING_SPACE = re.compile(rb"[ \t]+(?=\r?\n)")
_BINARY_CTE = b"Content-Transfer-Encoding: binary\r\n"


class BinaryError(Exception):
    """A section that cannot be decoded; C{code} is the response code of the NO."""

    code = b""
    text = b""


class UnknownCTE(BinaryError):
    """RFC 3516 4.2: a Content-Transfer-Encoding the server does not know."""

    code = b"UNKNOWN-CTE"
    text = b"Unknown Content-Transfer-Encoding"


class InvalidData(BinaryError):
    """Octets a base64 body cannot hold (Dovecot answers the same NO [PARSE])."""

    code = b"PARSE"
    text = b"Invalid data in MIME part"


# --- decoders ------------------------------------------------------------------


class Identity:
    """7bit, 8bit and binary: the octets as they are."""

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""


class Base64Decoder:
    """
    RFC 2045 6.8, fed in chunks: line breaks and spaces are skipped; other
    octets, padding anywhere but at the end, and data after it are refused
    (as Dovecot refuses them).
    """

    def __init__(self) -> None:
        self._carry = b""
        self._ended = False  # the padded last quantum was decoded

    def feed(self, data: bytes) -> bytes:
        if data.translate(None, _B64_ALPHABET + _WHITESPACE):
            raise InvalidData()
        s = self._carry + data.translate(None, _WHITESPACE)
        if self._ended and s:
            raise InvalidData()
        pad = s.find(b"=")
        if pad >= 0:
            quantum_end = pad - pad % 4 + 4
            if pad % 4 < 2 or len(s) > quantum_end or s[pad:].strip(b"="):
                raise InvalidData()
        n = len(s) - len(s) % 4
        self._carry = s[n:]
        if pad >= 0 and n == len(s):
            self._ended = True
        try:
            return binascii.a2b_base64(s[:n]) if n else b""
        except binascii.Error:
            raise InvalidData() from None

    def finish(self) -> bytes:
        if self._carry:
            raise InvalidData()  # ends inside a quantum (Dovecot refuses it too)
        return b""


# RFC 2045 6.7: "=" starts a soft line break or two hexadecimal digits; CR only before LF.
_QP_INVALID = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r?\n)|\r(?!\n)")


class QuotedPrintableDecoder:
    """
    RFC 2045 6.7, fed in chunks: soft line breaks joined, trailing white
    space dropped; a stray "=" or CR is refused (as Dovecot refuses it).
    """

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        s = self._carry + data
        end = s.rfind(b"\n") + 1
        if end == 0 and len(s) > CHUNK:
            # One very long line: cut it where no "=XX", CRLF or trailing space is split.
            end = len(s) - 3
            while end > 0 and s[end - 1 : end] in (b" ", b"\t", b"\r"):
                end -= 1
            eq = s.rfind(b"=", end - 2, end)
            if eq >= 0:
                end = eq
        self._carry = s[end:]
        return self._decode(_TRAILING_SPACE.sub(b"", s[:end])) if end else b""

    def finish(self) -> bytes:
        s, self._carry = self._carry.rstrip(b" \t"), b""
        if s.endswith(b"="):
            s = s[:-1]
        return self._decode(s)

    @staticmethod
    def _decode(s: bytes) -> bytes:
        if _QP_INVALID.search(s):
            raise InvalidData()
        return binascii.a2b_qp(s)


def cte_of(part: mime.Part) -> bytes:
    """The part's Content-Transfer-Encoding, lower case; L{UnknownCTE} for one not known."""
    cte = part.headers.get(b"content-transfer-encoding", b"").strip().lower()
    if cte not in _IDENTITY and cte not in _CONVERTED:
        raise UnknownCTE()
    return cte


def decoder(cte: bytes) -> Any:
    """A fresh decoder for a known Content-Transfer-Encoding."""
    if cte == b"base64":
        return Base64Decoder()
    if cte == b"quoted-printable":
        return QuotedPrintableDecoder()
    return Identity()


# --- the blocks of a section ---------------------------------------------------


@dataclass(frozen=True)
class Block:
    """Octets C{start} to C{end} of the message: as stored, decoded (C{cte}), or a header to filter."""

    start: int
    end: int
    cte: bytes = b""  # base64 / quoted-printable: decode
    header: bool = False  # a header whose Content-Transfer-Encoding becomes binary


class _Layout:
    def __init__(self, start: int) -> None:
        self.blocks: list[Block] = []
        self.copy_from = start

    def copy_to(self, end: int) -> None:
        if end > self.copy_from:
            self.blocks.append(Block(self.copy_from, end))
        self.copy_from = max(self.copy_from, end)

    def add(self, part: mime.Part, include_header: bool) -> None:
        cte = cte_of(part)
        if include_header:
            if cte in _CONVERTED:
                self.copy_to(part.header_start)
                self.blocks.append(Block(part.header_start, part.body_start, header=True))
            else:
                self.copy_to(part.body_start)
        self.copy_from = part.body_start
        below = part.children or ([part.message] if part.message is not None else [])
        if below:
            for child in below:
                self.add(child, True)
            self.copy_to(part.body_end)
        elif part.body_end > part.body_start:
            if cte in _CONVERTED:
                self.blocks.append(Block(part.body_start, part.body_end, cte=cte))
            else:
                self.blocks.append(Block(part.body_start, part.body_end))
        self.copy_from = max(self.copy_from, part.body_end)


def layout(root: mime.Part, path: tuple[int, ...]) -> list[Block] | None:
    """
    The blocks of BINARY[path] (RFC 3516 4.1), None if there is no such
    part; L{UnknownCTE} if a part in it has an encoding not known. An empty
    path is the whole message, its header included.
    """
    part = mime.find_part(root, list(path))
    if part is None:
        return None
    if not path:
        out = _Layout(0)
        out.add(root, True)
        out.copy_to(root.body_end)
        return out.blocks
    out = _Layout(part.body_start)
    out.add(part, False)
    return out.blocks


def binary_header(block: bytes) -> bytes:
    """A part's header with its Content-Transfer-Encoding said to be binary (as Dovecot does)."""
    fields = mime.split_header_fields(block)
    kept = b"".join(raw for name, raw in fields if name != b"content-transfer-encoding")
    rest = block[sum(len(raw) for _, raw in fields) :]
    return kept + _BINARY_CTE + rest


class BinaryReader:
    """
    The decoded octets of a section as a file (C{read}, C{close}), read
    from the message file chunk by chunk: blocking, for the thread pool.
    """

    def __init__(self, f: Any, blocks: list[Block]) -> None:
        self._f = f
        self._blocks = list(blocks)
        self._pos = 0  # offset in the message file
        self._buf = bytearray()
        self._current: tuple[Block, Any] | None = None
        self.converted = any(b.cte for b in blocks)

    def _seek(self, offset: int) -> None:
        if offset > self._pos:
            skip(self._f, offset - self._pos)
            self._pos = offset

    def _fill(self) -> bool:
        """Add some decoded octets to the buffer; False at the end."""
        if self._current is None:
            if not self._blocks:
                return False
            block = self._blocks.pop(0)
            self._seek(block.start)
            if block.header:
                data = self._f.read(block.end - block.start)
                self._pos += len(data)
                self._buf += binary_header(data)
                return True
            self._current = (block, decoder(block.cte))
        block, dec = self._current
        want = min(CHUNK, block.end - self._pos)
        data = self._f.read(want) if want > 0 else b""
        self._pos += len(data)
        if data:
            self._buf += dec.feed(data)
        if not data or self._pos >= block.end:
            self._buf += dec.finish()
            self._current = None
        return True

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n) and self._fill():
            pass
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def close(self) -> None:
        self._f.close()

    def seekable(self) -> bool:
        return False


def open_section(folder: Any, uid: int, blocks: list[Block]) -> BinaryReader:
    """A L{BinaryReader} over the message C{uid} (KeyError if it is gone). Blocking."""
    return BinaryReader(folder.open_message(uid), blocks)


def measure(folder: Any, uid: int, blocks: list[Block]) -> tuple[int, bool]:
    """
    The decoded size of a section and whether it is sent as a literal8: as
    Dovecot, when something in it was decoded or it holds a NUL (RFC 3516
    4.3 requires the latter). L{InvalidData} for a body that cannot be
    decoded. Blocking: reads the whole section once, in chunks.
    """
    reader = open_section(folder, uid, blocks)
    size, nul = 0, False
    try:
        while True:
            chunk = reader.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            nul = nul or b"\0" in chunk
    finally:
        reader.close()
    return size, nul or reader.converted


def section_info(folder: Any, uid: int, root: mime.Part, path: tuple[int, ...]) -> Any:
    """
    (blocks, size, literal8) of BINARY[path], None if no such part; raises
    L{BinaryError}. The size and literal8 are kept in C{root.binary}, so a
    section is decoded to be measured only once while its structure is cached.
    """
    known = root.binary.get(path)
    if isinstance(known, BinaryError):
        raise known
    try:
        blocks = layout(root, path)
        if blocks is None:
            return None
        if known is None:
            known = root.binary[path] = measure(folder, uid, blocks)
    except BinaryError as e:
        root.binary[path] = e
        raise
    return blocks, known[0], known[1]
