"""
mboxrd quoting of body lines that look like ``From `` separators (one more
'>' when written, one less when read), and the line ends that go with it
(LF in the file, CRLF for sessions). Other programs' mboxo is read as it is.
"""

from __future__ import annotations

import re

# mboxrd: a line matching ^>*From  gets one more '>' when written, loses one when read.
_QUOTE = re.compile(rb"^(>*From )", re.M)
_UNQUOTE = re.compile(rb"^>(>*From )", re.M)


def quote_lines(chunk: bytes) -> bytes:
    """Quote a run of whole lines for mbox: CRLF to LF, and mboxrd ``>From`` quoting."""
    if b"\r\n" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n")
    if b"From " in chunk:
        chunk = _QUOTE.sub(rb">\1", chunk)
    return chunk


def to_crlf(data: bytes, unquote: bool = True) -> bytes:
    """Give whole mbox lines CRLF line ends, and unquote them (mboxrd) if C{unquote}."""
    if unquote and b"From " in data:
        data = _UNQUOTE.sub(rb"\1", data)
    if b"\r\n" in data:
        data = data.replace(b"\r\n", b"\n")
    return data.replace(b"\n", b"\r\n")
