"""
The scanner: finds the messages of an mbox file (where each ``From `` line,
header block and body starts and ends, its CRLF size, quoted lines, hidden
fields, flags, date and fingerprint) and returns them as a L{ScanResult}.
It is the hot path of opening a folder: C-speed searches over large chunks,
no Python loop per line.
"""

from __future__ import annotations

import os
import re
import zlib
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field

from mailsrv.store.mboxfmt.fields import (
    NO_FLAGS,
    header_end_at,
    may_hide,
    status_flags,
    strip_hidden,
)
from mailsrv.store.mboxfmt.fromline import parse_from_date
from mailsrv.store.mboxfmt.limits import CHUNK, HEADER_LIMIT

READ_MBOXRD = 1  # a message's reading (L{ScanResult.size}): unquote one '>'
HIDE_FIELDS = 2  # ... and leave out the HIDDEN_FIELDS


def fingerprint(line_crc: int, message_id: bytes, body_len: int) -> int:
    """
    A 63-bit value identifying a message across rewrites of the file by other
    programs: its From line, Message-ID and body length (mutt edits headers only).
    """
    return (zlib.crc32(message_id, line_crc) << 31) | (body_len & 0x7FFFFFFF)


@dataclass
class ScanResult:
    """Messages found by L{scan}, as parallel arrays, in file order."""

    from_offs: array = field(default_factory=lambda: array("q"))
    starts: array = field(default_factory=lambda: array("q"))
    ends: array = field(default_factory=lambda: array("q"))
    sizes: array = field(default_factory=lambda: array("q"))  # read as mboxrd, all fields
    quoted: array = field(default_factory=lambda: array("q"))  # lines matching ^>+From
    hidden: array = field(default_factory=lambda: array("q"))  # CRLF size of hidden fields
    crcs: array = field(default_factory=lambda: array("q"))
    fps: array = field(default_factory=lambda: array("q"))
    dates: array = field(default_factory=lambda: array("d"))
    flags: list = field(default_factory=list)  # from Status:/X-Status:
    end: int = 0  # file offset the scan covered

    def size(self, i: int, fmt: int) -> int:
        """
        The CRLF size of message C{i} as sessions see it: C{fmt & READ_MBOXRD},
        one '>' less per quoted line; C{fmt & HIDE_FIELDS}, without the
        L{HIDDEN_FIELDS}.
        """
        size = self.sizes[i]
        if not fmt & READ_MBOXRD:
            size += self.quoted[i]
        if fmt & HIDE_FIELDS:
            size -= self.hidden[i]
        return size


class _Partial:
    """A message whose end has not been seen yet."""

    __slots__ = (
        "from_off",
        "start",
        "nl",
        "crlf",
        "quoted",
        "line",
        "mid",
        "status",
        "xstatus",
        "header_end",
        "tail",
        "hidden",
    )

    def __init__(self, from_off: int, start: int, line: bytes) -> None:
        self.from_off = from_off
        self.start = start
        self.line = line
        self.nl = self.crlf = self.quoted = 0
        self.mid = self.status = self.xstatus = b""
        self.header_end = -1
        self.tail = b""  # the last 4 bytes counted
        self.hidden = 0


def _parse_headers(rec: _Partial, buf: bytes, pos: int, hend: int) -> None:
    """Pick Message-ID, Status and X-Status out of the header block C{buf[pos:hend]}."""
    block = b"\n" + buf[pos:hend].lower()
    i = block.find(b"\nmessage-id:")
    if i >= 0:
        j = block.find(b"\n", i + 12)
        rec.mid = buf[pos + i + 11 : pos + j - 1].strip() if j >= 0 else b""
    i = block.find(b"\nstatus:")
    if i >= 0:
        j = block.find(b"\n", i + 8)
        rec.status = buf[pos + i + 7 : pos + j - 1].upper() if j >= 0 else b""
    i = block.find(b"\nx-status:")
    if i >= 0:
        j = block.find(b"\n", i + 10)
        rec.xstatus = buf[pos + i + 9 : pos + j - 1].upper() if j >= 0 else b""


def _quoted_lines(buf: bytes, limit: int) -> list[int]:
    """Offsets of the lines in C{buf[:limit]} that match ^>+From (mboxrd-quoted lines)."""
    out = []
    i = buf.find(b">From ", 0, limit)
    while i >= 0:
        j = i
        while j > 0 and buf[j - 1] == 0x3E:  # '>'
            j -= 1
        if j == 0 or buf[j - 1] == 0x0A:
            out.append(j)
        i = buf.find(b">From ", i + 6, limit)
    return out


def _finish(res: ScanResult, rec: _Partial, content_end: int) -> None:
    end, nl, crlf = content_end, rec.nl, rec.crlf
    # The blank line before the next From line (or at the end of the file) is the separator.
    if end - rec.start >= 2 and rec.tail.endswith(b"\n\n"):
        end, nl = end - 1, nl - 1
    elif end - rec.start >= 4 and rec.tail == b"\r\n\r\n":
        end, nl, crlf = end - 2, nl - 1, crlf - 1
    header_end = rec.header_end if rec.header_end >= 0 else end
    line_crc = zlib.crc32(rec.line)
    res.from_offs.append(rec.from_off)
    res.starts.append(rec.start)
    res.ends.append(end)
    res.sizes.append((end - rec.start) + nl - crlf - rec.quoted)
    res.quoted.append(rec.quoted)
    # fields are hidden only from a header block that ends inside the message
    res.hidden.append(rec.hidden if 0 <= rec.header_end <= end else 0)
    res.crcs.append(line_crc)
    res.fps.append(fingerprint(line_crc, rec.mid, max(0, end - min(header_end, end))))
    res.dates.append(parse_from_date(rec.line))
    res.flags.append(
        status_flags(rec.status, rec.xstatus) if (rec.status or rec.xstatus) else NO_FLAGS
    )


_SEP = re.compile(rb"\nFrom ")


def scan(fd: int, offset: int, file_end: int, chunk: int = CHUNK) -> ScanResult:
    """
    Find the messages in C{[offset, file_end)} of an mbox file; C{offset} must
    be at a line start (normally a ``From `` line). A message ends where a line
    beginning with ``From `` starts; one blank line before it is the separator.
    Bytes before the first ``From `` line are skipped. Reads C{chunk} bytes at a
    time with C-speed searches (no Python loop per line): memory does not grow
    with the file.
    """
    res = ScanResult(end=offset)
    cur: _Partial | None = None
    buf = b""
    base = offset  # file offset of buf[0]; buf always starts at a line start
    read_pos = offset
    a_from, a_start, a_end = res.from_offs.append, res.starts.append, res.ends.append
    a_size, a_crc, a_fp = res.sizes.append, res.crcs.append, res.fps.append
    a_date, a_flags = res.dates.append, res.flags.append
    a_quoted, a_hidden = res.quoted.append, res.hidden.append
    crc32 = zlib.crc32
    while True:
        n = min(chunk, file_end - read_pos)
        data = os.pread(fd, n, read_pos) if n > 0 else b""
        read_pos += len(data)
        eof = not data or read_pos >= file_end
        buf = buf + data if buf else data
        blen = len(buf)
        limit = blen if eof else buf.rfind(b"\n") + 1  # whole lines only
        has_cr = b"\r" in buf
        quoted = _quoted_lines(buf, limit)
        seps = [m.start() + 1 for m in _SEP.finditer(buf, 0, min(blen, limit + 5))]
        if seps and seps[-1] >= limit:
            seps.pop()
        if buf.startswith(b"From "):
            seps.insert(0, 0)
        pos = 0
        keep = -1  # where to keep buf from, if a message's headers are not complete

        def count(rec: _Partial, a: int, b: int, buf=buf, has_cr=has_cr, quoted=quoted) -> None:
            if b <= a:
                return
            rec.nl += buf.count(b"\n", a, b)
            if has_cr:
                rec.crlf += buf.count(b"\r\n", a, b)
            if quoted:
                rec.quoted += bisect_left(quoted, b) - bisect_left(quoted, a)
            rec.tail = (rec.tail + buf[max(a, b - 4) : b])[-4:] if b - a < 4 else buf[b - 4 : b]

        nseps = len(seps)
        for k in range(nseps):
            sep = seps[k]
            if cur is not None:
                count(cur, pos, sep)
                _finish(res, cur, base + sep)
                cur = None
            eol = buf.find(b"\n", sep, limit)
            start = eol + 1 if eol >= 0 else limit
            hend = header_end_at(buf, start, min(blen, start + HEADER_LIMIT), has_cr)
            if hend < 0 and not eof and blen - start < HEADER_LIMIT:
                keep = sep  # the header block continues in the next chunk
                break
            if k + 1 < nseps and hend >= 0 and not has_cr:
                # The common case, inline: the whole message is in buf, LF line ends.
                nxt = seps[k + 1]
                end = nxt
                nl = buf.count(b"\n", start, nxt)
                if nxt - start >= 2 and buf[nxt - 2] == 0x0A:
                    end -= 1
                    nl -= 1
                q = bisect_left(quoted, nxt) - bisect_left(quoted, start) if quoted else 0
                line = buf[sep:start]
                line_crc = crc32(line)
                mid = b""
                status = xstatus = b""
                block = b"\n" + buf[start:hend].lower()
                i = block.find(b"\nmessage-id:")
                if i >= 0:
                    j = block.find(b"\n", i + 12)
                    if j >= 0:
                        mid = buf[start + i + 11 : start + j - 1].strip()
                hid = 0
                if b"status:" in block:
                    rec = _Partial(0, 0, b"")
                    _parse_headers(rec, buf, start, hend)
                    status, xstatus = rec.status, rec.xstatus
                if hend <= end and may_hide(block):
                    hid = strip_hidden(buf[start:hend])[1]
                a_from(base + sep)
                a_start(base + start)
                a_end(base + end)
                a_size(end - start + nl - q)
                a_quoted(q)
                a_hidden(hid)
                a_crc(line_crc)
                a_fp((crc32(mid, line_crc) << 31) | ((end - min(hend, end)) & 0x7FFFFFFF))
                a_date(parse_from_date(line))
                a_flags(status_flags(status, xstatus) if (status or xstatus) else NO_FLAGS)
                pos = nxt
                continue
            cur = _Partial(base + sep, base + start, buf[sep:start])
            hstop = hend if hend >= 0 else min(blen, start + HEADER_LIMIT)
            _parse_headers(cur, buf, start, hstop)
            cur.header_end = base + hend if hend >= 0 else -2
            if hend >= 0 and may_hide(buf[start:hend].lower()):
                cur.hidden = strip_hidden(buf[start:hend])[1]
            pos = start
        else:
            if cur is not None:
                stop = blen if eof else limit
                count(cur, pos, stop)
                pos = stop
        if eof and keep < 0:
            if cur is not None:
                _finish(res, cur, base + blen)
            res.end = base + blen
            return res
        if keep < 0:
            keep = pos if cur is not None else limit
        buf = buf[keep:]
        base += keep
