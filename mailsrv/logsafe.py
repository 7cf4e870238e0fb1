"""
Log events whose fields are safe to write on one line.

Log fields carry what clients chose (user names, HELO names, envelope
addresses, mailbox names and the paths made of them, IMAP tags), and a name
holding CR or LF must not start a forged line, nor control characters reach
a terminal raw. L{SafeLogger} escapes every field of every event as it is
emitted, so no log call has to remember to, and every observer (the text
log, JSON, tests) gets the escaped text. Escapes are Python's:
C{\\n}, C{\\r}, C{\\t}, C{\\xNN} for other control characters and for bytes
that are not UTF-8, C{\\uNNNN} for line and paragraph separators and other
invisible format characters, and C{\\\\} for a backslash, so the original
can be told from its escape.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from twisted.logger import Logger, LogLevel

# Characters kept of one field, the rest counted: bounds a line made of a
# huge IMAP literal, yet keeps a whole "accepted" line with many recipients.
MAX_LENGTH = 64 * 1024

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# Cc: C0, DEL and C1 controls (NEL among them); Zl, Zp: U+2028, U+2029; Cf:
# invisible format characters such as bidi overrides; Cs: undecodable bytes.
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _char(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(c) in _UNSAFE:
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return c


def escape(value: Any) -> str:
    """C{value} (str, bytes or anything printable) as one line of printable text."""
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "surrogateescape")
    elif isinstance(value, str):
        text = value
    else:
        text = str(value)
    extra = len(text) - MAX_LENGTH
    if extra > 0:
        text = text[:MAX_LENGTH]
    elif text.isprintable() and "\\" not in text:
        return text  # nearly every field: no copy
    out = "".join(_char(c) if not c.isprintable() or c == "\\" else c for c in text)
    return out + f"...({extra} more)" if extra > 0 else out


_KEPT = (int, float, list, tuple, set, frozenset, dict)  # containers: repr() escapes


class SafeLogger(Logger):
    """
    A L{Logger} that escapes its events' fields with L{escape} (str, bytes and
    other objects by their C{str}); numbers, None and containers, which are
    formatted by C{repr}, are kept as they are, as are the C{log_*} keys.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        for key, value in kwargs.items():
            if type(value) is str:
                if len(value) <= MAX_LENGTH and value.isprintable() and "\\" not in value:
                    continue  # nearly every field: kept as it is, at C speed
            elif value is None or isinstance(value, _KEPT) or key.startswith("log_"):
                continue
            kwargs[key] = escape(value)
        super().emit(level, format, **kwargs)
