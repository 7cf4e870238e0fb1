"""
Mailbox names in modified UTF-7 (RFC 3501 5.1.3), decoded strictly: a name
that breaks a rule of the encoding is refused, never guessed at, so that one
folder has one name on the wire (as Dovecot does). Also the one spelling in
modified UTF-7 of a name a client sent in UTF-8 (RFC 6855 3).
"""

from __future__ import annotations

import base64

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,"
_VALUE = {ord(c): i for i, c in enumerate(_ALPHABET)}
_AMPERSAND = 0x26
_DASH = 0x2D


class InvalidName(ValueError):
    """The octets are not a name in modified UTF-7."""


def _printable(code: int) -> bool:
    return 0x20 <= code <= 0x7E


def _decode_base64(segment: bytes) -> str:
    """One shifted run: modified BASE64 of UTF-16BE, with "," for "/" and no padding."""
    bits = 0
    nbits = 0
    units: list[int] = []
    for octet in segment:
        value = _VALUE.get(octet)
        if value is None:
            raise InvalidName("not a modified BASE64 character")
        bits = (bits << 6) | value
        nbits += 6
        if nbits >= 16:
            nbits -= 16
            units.append((bits >> nbits) & 0xFFFF)
    # RFC 2152: what is left over is fewer than 16 bits of zeros.
    if nbits >= 6 or bits & ((1 << nbits) - 1):
        raise InvalidName("a shifted run ends inside a character")
    out = []
    i = 0
    while i < len(units):
        unit = units[i]
        if 0xD800 <= unit < 0xDC00:
            low = units[i + 1] if i + 1 < len(units) else 0
            if not 0xDC00 <= low < 0xE000:
                raise InvalidName("an unpaired surrogate")
            code = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
            i += 2
        elif 0xDC00 <= unit < 0xE000:
            raise InvalidName("an unpaired surrogate")
        else:
            code = unit
            i += 1
        # RFC 3501 5.1.3: modified BASE64 MUST NOT represent a printable
        # US-ASCII character, which represents itself.
        if _printable(code):
            raise InvalidName("a printable character in a shifted run")
        out.append(chr(code))
    return "".join(out)


def decode(raw: bytes) -> str:
    """
    The name that the octets C{raw} spell in modified UTF-7, or L{InvalidName}:
    an octet outside printable US-ASCII, a ``&`` that starts no well-formed
    shifted run (``&-`` is ``&``), or a shifted run that is not UTF-16 in
    modified BASE64 or that encodes a printable US-ASCII character.
    """
    out = []
    i = 0
    n = len(raw)
    while i < n:
        octet = raw[i]
        if octet == _AMPERSAND:
            end = raw.find(b"-", i + 1)
            if end < 0:
                raise InvalidName("a shifted run is not ended by -")
            out.append("&" if end == i + 1 else _decode_base64(raw[i + 1 : end]))
            i = end + 1
        elif _printable(octet):
            out.append(chr(octet))
            i += 1
        else:
            raise InvalidName("an octet that is not printable US-ASCII")
    return "".join(out)


def encode(name: str) -> bytes:
    """
    C{name} in modified UTF-7: printable US-ASCII as itself (``&`` as
    ``&-``), every run of other characters as one shifted run of modified
    BASE64 of UTF-16BE; the one spelling that L{decode} gives back.
    """
    out = bytearray()
    run: list[str] = []

    def shift() -> None:
        if run:
            utf16 = "".join(run).encode("utf-16-be", "surrogatepass")
            out.extend(b"&" + base64.b64encode(utf16).rstrip(b"=").replace(b"/", b",") + b"-")
            run.clear()

    for char in name:
        if _printable(ord(char)):
            shift()
            out.extend(b"&-" if char == "&" else char.encode("ascii"))
        else:
            run.append(char)
    shift()
    return bytes(out)


def from_utf8(raw: bytes) -> bytes:
    """
    A name sent in UTF-8 (RFC 6855 3) as the same name in modified UTF-7, or
    L{InvalidName} if the octets are not UTF-8 (RFC 3629).
    """
    if raw.isascii() and b"&" not in raw:
        return raw
    try:
        return encode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidName("not UTF-8") from None
