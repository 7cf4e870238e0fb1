"""IMAP strings (RFC 3501 4.3, 9): atoms, quoted strings and literals, chosen by content."""

from __future__ import annotations

import re

# RFC 3501 9: atom-specials that force a quoted string.
_ATOM_SAFE = re.compile(rb"^[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|}~]+$")
_LITERAL_ONLY = re.compile(rb"[\r\n\0\x7f-\xff]")


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
