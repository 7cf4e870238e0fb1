"""IMAP strings (RFC 3501 4.3, 9): atoms, quoted strings and literals, chosen by content."""

from __future__ import annotations

import re

# RFC 3501 9: atom-specials that force a quoted string.
_ATOM_SAFE = re.compile(rb"^[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|}~]+$")
_LITERAL_ONLY = re.compile(rb"[\r\n\0\x7f-\xff]")
# RFC 6855 3: after ENABLE UTF8=ACCEPT a quoted string may hold UTF-8.
_LITERAL_ONLY_UTF8 = re.compile(rb"[\r\n\0\x7f]")


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


def utf8_astring(value: str) -> bytes:
    """
    An astring for a session that enabled UTF8=ACCEPT (RFC 6855 3): an atom
    when safe, else a quoted string that may hold UTF-8, or a literal when
    it must be (CR, LF, NUL, or octets that are not UTF-8).
    """
    raw = value.encode("utf-8", "surrogateescape")
    if _ATOM_SAFE.match(raw) and raw.upper() != b"NIL":
        return raw
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return b"{%d}\r\n%s" % (len(raw), raw)
    if _LITERAL_ONLY_UTF8.search(raw):
        return b"{%d}\r\n%s" % (len(raw), raw)
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
