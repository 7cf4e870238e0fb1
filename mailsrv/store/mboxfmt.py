"""
The mbox file format: ``From `` separator lines, quoting of body lines that
look like separators (mboxrd when we write; other programs' mboxo is read as
it is), a fast scanner that finds the messages of a
file, and readers that stream one message back with CRLF line ends.

Pure functions over file descriptors; no Twisted, no locking (see
L{mailsrv.store.locking}), so they run on the disk threads.
"""

from __future__ import annotations

import calendar
import io
import os
import re
import tempfile
import threading
import time
import zlib
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field

from mailsrv.interfaces import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN

CHUNK = 1 * 1024 * 1024  # scanner read size
READ_CHUNK = 64 * 1024  # message reader read size
SMALL_MESSAGE = 256 * 1024  # open_message reads these whole
HEADER_LIMIT = 256 * 1024  # bytes searched for the end of a header block
SPILL_IN_MEMORY = 4 * 1024 * 1024  # a reader's rest set aside in memory up to this size

# mboxrd: a line matching ^>*From  gets one more '>' when written, loses one when read.
_QUOTE = re.compile(rb"^(>*From )", re.M)
_UNQUOTE = re.compile(rb"^>(>*From )", re.M)
_ASCTIME = re.compile(
    rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) +(\d{1,2}) +(\d{1,2}):(\d\d)(?::(\d\d))? +(?:[A-Z]{3,4} +)?(\d{4})"
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        (
            b"Jan",
            b"Feb",
            b"Mar",
            b"Apr",
            b"May",
            b"Jun",
            b"Jul",
            b"Aug",
            b"Sep",
            b"Oct",
            b"Nov",
            b"Dec",
        ),
        1,
    )
}
_SENDER_BAD = re.compile(r"[\s\x00-\x1f\x7f]")


# -- writing -------------------------------------------------------------


def from_line(sender: str, when: float) -> bytes:
    """The ``From `` separator line for a message: envelope sender and asctime date (UTC)."""
    sender = _SENDER_BAD.sub("_", sender or "") or "MAILER-DAEMON"
    date = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(when))
    return f"From {sender} {date}\n".encode("utf-8", "surrogateescape")


def quote_lines(chunk: bytes) -> bytes:
    """Quote a run of whole lines for mbox: CRLF to LF, and mboxrd ``>From`` quoting."""
    if b"\r\n" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n")
    if b"From " in chunk:
        chunk = _QUOTE.sub(rb">\1", chunk)
    return chunk


def iter_lines_chunks(f, size: int = READ_CHUNK):
    """Yield pieces of binary file C{f}, each ending at a line end (the last may not)."""
    carry = b""
    while True:
        data = f.read(size)
        if not data:
            if carry:
                yield carry
            return
        data = carry + data if carry else data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        carry = data[cut:]
        yield data[:cut]


def mbox_pieces(f):
    """
    Yield binary file C{f} in mbox form (L{quote_lines}), in pieces of whole
    lines, without the L{HIDDEN_FIELDS} of its header block: a message we
    store carries no bookkeeping of its sender's, so neither we nor mutt take
    flags from it (Dovecot's mbox save drops them too). The header block ends
    where the scanner says (L{header_end}); if it does not end within
    L{HEADER_LIMIT}, the whole lines in that reach are taken as header.
    """
    chunks = (quote_lines(piece) for piece in iter_lines_chunks(f))
    head = b""
    exhausted = True
    hend = -1
    for q in chunks:
        head += q
        hend = header_end(head)
        if hend >= 0 or len(head) >= HEADER_LIMIT:
            exhausted = False
            break
    if hend >= 0:
        cut = hend
    elif exhausted and len(head) <= HEADER_LIMIT:
        cut = len(head)
    else:
        cut = head.rfind(b"\n", 0, HEADER_LIMIT) + 1
    if head:
        block = strip_hidden(head[:cut])[0]
        if hend >= 0:
            block = with_padding(block)
        yield block + head[cut:]
    yield from chunks


def quoted_message(source) -> tuple[list[bytes] | None, int]:
    """
    Return (pieces, length) of an L{IMessageSource} in mbox form (L{mbox_pieces}),
    ending with a newline. Small messages are returned whole; for large ones
    C{pieces} is None and L{write_quoted} streams them (the length is counted
    in a first pass).
    """
    total = 0
    pieces: list[bytes] | None = [] if source.size <= SMALL_MESSAGE else None
    last = b"\n"
    with source.open() as f:
        for q in mbox_pieces(f):
            total += len(q)
            last = q[-1:] or last
            if pieces is not None:
                pieces.append(q)
    if total and last != b"\n":
        total += 1
        if pieces is not None:
            pieces.append(b"\n")
    return pieces, total


def write_quoted(fd: int, source) -> int:
    """Stream a large source into C{fd} in mbox form; return the bytes written."""
    total = 0
    last = b"\n"
    buf: list[bytes] = []
    buffered = 0
    with source.open() as f:
        for q in mbox_pieces(f):
            last = q[-1:] or last
            buf.append(q)
            buffered += len(q)
            if buffered >= 1024 * 1024:
                total += write_all(fd, b"".join(buf))
                buf, buffered = [], 0
    if total + buffered and last != b"\n":
        buf.append(b"\n")
    if buf:
        total += write_all(fd, b"".join(buf))
    return total


def write_all(fd: int, data: bytes) -> int:
    """os.write until everything is written."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.write(fd, view[done:])
    return done


# -- reading -------------------------------------------------------------


def to_crlf(data: bytes, unquote: bool = True) -> bytes:
    """Give whole mbox lines CRLF line ends, and unquote them (mboxrd) if C{unquote}."""
    if unquote and b"From " in data:
        data = _UNQUOTE.sub(rb"\1", data)
    if b"\r\n" in data:
        data = data.replace(b"\r\n", b"\n")
    return data.replace(b"\n", b"\r\n")


def read_range(fd: int, start: int, end: int) -> bytes:
    """pread C{[start, end)} completely."""
    data = os.pread(fd, end - start, start)
    if len(data) == end - start:
        return data
    parts = [data]
    pos = start + len(data)
    while pos < end:
        more = os.pread(fd, end - pos, pos)
        if not more:
            raise OSError("mbox file is shorter than its index")
        parts.append(more)
        pos += len(more)
    return b"".join(parts)


class MessageReader(io.RawIOBase):
    """
    Streams the bytes C{[start, end)} of an mbox file with CRLF line ends and
    mboxrd unquoting. C{source} has C{pread(n, offset)} (a read handle of the
    store, shared by many readers), and stays referenced while reading.
    L{spill} copies the bytes still to be read aside, for a rewrite that is
    about to overwrite them.
    """

    def __init__(
        self, source, start: int, end: int, unquote: bool = True, hide: bool = False
    ) -> None:
        super().__init__()
        self._source = source
        self._unquote = unquote
        self._hide = hide  # leave out the HIDDEN_FIELDS (read with the first fill)
        self._pos = start
        self._end = end
        self._carry = b""
        self._out = b""
        self._lock = threading.Lock()

    def remaining(self) -> tuple[object, int, int]:
        """(source, position, end) of the bytes not read yet."""
        with self._lock:
            return self._source, self._pos, self._end

    def spill(self) -> None:
        """Read the rest now into memory or an unnamed temporary file, and go on from there."""
        with self._lock:
            pos, end = self._pos, self._end
            if pos >= end or isinstance(self._source, _Spilled):
                return
            if end - pos <= SPILL_IN_MEMORY:
                self._source = _Spilled(self._source.pread(end - pos, pos), pos)
                return
            f = tempfile.TemporaryFile()
            try:
                at = pos
                while at < end:
                    data = self._source.pread(min(CHUNK, end - at), at)
                    if not data:
                        raise OSError("mbox file is shorter than its index")
                    f.write(data)
                    at += len(data)
                f.flush()
            except BaseException:
                f.close()
                raise
            self._source = _Spilled(f, pos)

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        if self._hide:
            self._hide = False
            with self._lock:
                head = self._source.pread(min(HEADER_LIMIT, self._end - self._pos), self._pos)
            hend = _header_end(head, 0, len(head), b"\r" in head)
            if hend >= 0:
                with self._lock:
                    self._pos += hend
                self._out = to_crlf(strip_hidden(head[:hend])[0], self._unquote)
                if self._out:
                    return True
        while not self._out:
            if self._pos >= self._end and not self._carry:
                return False
            if self._pos < self._end:
                n = min(READ_CHUNK, self._end - self._pos)
                with self._lock:
                    data = self._source.pread(n, self._pos)
                    self._pos += len(data)
                if not data:
                    raise OSError("mbox file is shorter than its index")
                data = self._carry + data if self._carry else data
                if self._pos < self._end:
                    cut = data.rfind(b"\n") + 1
                    self._carry = data[cut:]
                    data = data[:cut]
                else:
                    self._carry = b""
            else:
                data, self._carry = self._carry, b""
            self._out = to_crlf(data, self._unquote) if data else b""
        return True

    def readinto(self, b) -> int:
        if not self._fill():
            return 0
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if not self._fill():
            return b""
        data, self._out = self._out[:size], self._out[size:]
        return data

    def readall(self) -> bytes:
        parts = []
        while self._fill():
            parts.append(self._out)
            self._out = b""
        return b"".join(parts)

    def close(self) -> None:
        self._source = None
        super().close()


class _Spilled:
    """Bytes of a message set aside (L{MessageReader.spill}), read by file offset."""

    def __init__(self, data, base: int) -> None:
        self._data = data  # bytes, or a temporary file
        self._base = base

    def pread(self, n: int, off: int) -> bytes:
        at = off - self._base
        if isinstance(self._data, bytes):
            return self._data[at : at + n]
        return os.pread(self._data.fileno(), n, at)


# -- scanning ------------------------------------------------------------


_DAY_CACHE: dict[bytes, int] = {}
_HM_CACHE: dict[bytes, int] = {}


def parse_from_date(line: bytes) -> float:
    """The date of a ``From `` line (asctime, taken as UTC); 0.0 if there is none."""
    # Fast path: "... Www Mmm dd hh:mm:ss yyyy\n", the usual layout.
    t = line[-25:-1]
    if len(t) == 24 and t[13] == 0x3A and t[16] == 0x3A and t[19] == 0x20:
        day = t[4:10] + t[20:24]
        hm = t[11:16]
        base = _DAY_CACHE.get(day)
        sec = _HM_CACHE.get(hm)
        try:
            if base is None:
                base = calendar.timegm(
                    (int(t[20:24]), _MONTHS[t[4:7]], int(t[8:10]), 0, 0, 0, 0, 0, 0)
                )
                if len(_DAY_CACHE) > 10000:
                    _DAY_CACHE.clear()
                _DAY_CACHE[day] = base
            if sec is None:
                sec = _HM_CACHE[hm] = int(t[11:13]) * 3600 + int(t[14:16]) * 60
            return float(base + sec + int(t[17:19]))
        except (KeyError, ValueError, OverflowError):
            pass
    m = _ASCTIME.search(line)
    if m is None:
        return 0.0
    mon, day_s, hh, mm, ss, year = m.groups()
    try:
        return float(
            calendar.timegm(
                (int(year), _MONTHS[mon], int(day_s), int(hh), int(mm), int(ss or 0), 0, 0, 0)
            )
        )
    except (ValueError, OverflowError):
        return 0.0


READ_MBOXRD = 1  # a message's reading (L{ScanResult.size}): unquote one '>'
HIDE_FIELDS = 2  # ... and leave out the HIDDEN_FIELDS
STATUS_FLAGS = frozenset({SEEN, ANSWERED, FLAGGED, DELETED, DRAFT})  # what the headers can say

# Header fields that mbox programs keep their own bookkeeping in: mutt writes
# Status:, X-Status:, Content-Length: and Lines: when it rewrites a message,
# Dovecot X-Keywords:, X-UID:, X-IMAP(base):, and mailsrv Status:/X-Status:.
# Sessions do not see them (Dovecot hides the same ones but Lines:), so a
# message's size and bytes stay the same while its flags are written.
HIDDEN_FIELDS = frozenset(
    {
        b"status",
        b"x-status",
        b"x-keywords",
        b"x-uid",
        b"x-imap",
        b"x-imapbase",
        b"content-length",
        b"lines",
    }
)
_HIDDEN_HINTS = (b"status:", b"x-keywords", b"x-uid", b"x-imap", b"content-length", b"lines")


def may_hide(lower_block: bytes) -> bool:
    """Whether a lower-cased header block may hold a hidden field (a quick test)."""
    return any(h in lower_block for h in _HIDDEN_HINTS)


def strip_hidden(block: bytes) -> tuple[bytes, int]:
    """
    The header block C{block} (raw mbox lines) without the L{HIDDEN_FIELDS}
    (and their continuation lines), and the CRLF size of what was left out.
    """
    out = []
    removed = 0
    skipping = False
    pos = 0
    n = len(block)
    while pos < n:
        eol = block.find(b"\n", pos)
        nxt = n if eol < 0 else eol + 1
        line = block[pos:nxt]
        pos = nxt
        if skipping and line[:1] in (b" ", b"\t"):
            removed += _crlf_len(line)
            continue
        name, colon, _ = line.partition(b":")
        skipping = bool(colon) and name.rstrip().lower() in HIDDEN_FIELDS
        if skipping:
            removed += _crlf_len(line)
        else:
            out.append(line)
    return (block if not removed else b"".join(out)), removed


def _crlf_len(line: bytes) -> int:
    if line.endswith(b"\r\n"):
        return len(line)
    if line.endswith(b"\n"):
        return len(line) + 1
    return len(line)


def header_end(data: bytes) -> int:
    """Where the header block at the start of C{data} ends (after its blank line), or -1."""
    return _header_end(data, 0, min(len(data), HEADER_LIMIT), b"\r" in data)


def with_status(block: bytes, flags: frozenset[str]) -> bytes:
    """
    Header block C{block} (with its blank line) with Status: and X-Status:
    saying C{flags}, as mutt writes them (R: \\Seen, O: not new; X-Status:
    A \\Answered, F \\Flagged, T \\Draft, D \\Deleted).
    """
    nl = b"\r\n" if block.endswith(b"\r\n") else b"\n"
    body = block[: -len(nl)]
    out = []
    skipping = False
    pos = 0
    while pos < len(body):
        eol = body.find(b"\n", pos)
        nxt = len(body) if eol < 0 else eol + 1
        line = body[pos:nxt]
        pos = nxt
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        skipping = bool(colon) and name.rstrip().lower() in (b"status", b"x-status")
        if not skipping:
            out.append(line)
    out.append(b"Status: " + (b"R" if SEEN in flags else b"") + b"O" + nl)
    letters = b"".join(
        ch
        for ch, flag in ((b"A", ANSWERED), (b"F", FLAGGED), (b"T", DRAFT), (b"D", DELETED))
        if flag in flags
    )
    if letters:
        out.append(b"X-Status: " + letters + nl)
    return b"".join(out) + nl


# A blank X-Keywords: field of this many spaces goes into the header of every
# message we store, before its blank line, as Dovecot pads its mbox headers:
# writing flags later (Status: RO, X-Status: AFTD, 26 bytes) takes the bytes
# from the padding and gives them back, so the header keeps its length and no
# byte after it moves. Sessions do not see the field (L{HIDDEN_FIELDS}), and
# mutt and Python's mailbox read no flag or label from an empty X-Keywords:.
PADDING = 30
_PAD_NAME = b"X-Keywords:"


def with_padding(block: bytes, pad: int | None = None) -> bytes:
    """Header block C{block} (with its blank line) with a padding field of C{pad} spaces."""
    if pad is None:
        pad = PADDING
    nl = b"\r\n" if block.endswith(b"\r\n") else b"\n"
    if len(block) <= len(nl):
        return block  # no header at all: the message starts with its blank line
    return block[: -len(nl)] + _PAD_NAME + b" " * pad + nl + nl


def _without_padding(block: bytes) -> tuple[bytes, bool]:
    """
    C{block} without its padding field (an X-Keywords: of only spaces, one
    line), and whether it may take one: not if it holds an X-Keywords: with
    keywords (another program's), which a second field would confuse.
    """
    lines = block.splitlines(keepends=True)
    out = []
    ok = True
    for n, line in enumerate(lines):
        name, colon, value = line.partition(b":")
        if colon and name.rstrip().lower() == b"x-keywords":
            follows = lines[n + 1][:1] if n + 1 < len(lines) else b""
            if value.strip(b" \r\n") or follows in (b" ", b"\t"):
                ok = False
            else:
                continue
        out.append(line)
    return b"".join(out), ok


def with_status_fitted(block: bytes, flags: frozenset[str]) -> bytes:
    """
    L{with_status}, keeping the length of C{block} whenever the padding field
    allows (it gives up or takes back the bytes Status:/X-Status: need), so the
    block is overwritten in place; a block that has to grow (another
    program's message, without padding) gets L{PADDING} too, so that the
    next write fits.
    """
    bare, may_pad = _without_padding(block)
    core = with_status(bare, flags)
    if not may_pad:
        return core
    nl = b"\r\n" if core.endswith(b"\r\n") else b"\n"
    room = len(block) - len(core) - len(_PAD_NAME) - len(nl)
    if room >= 0:
        return with_padding(core, room)
    return with_padding(core)


def hide_fields(data: bytes) -> bytes:
    """A message's raw mbox bytes without the hidden fields of its header block."""
    hend = _header_end(data, 0, min(len(data), HEADER_LIMIT), b"\r" in data)
    if hend < 0:
        return data
    block, removed = strip_hidden(data[:hend])
    return block + data[hend:] if removed else data


def status_flags(status: bytes, x_status: bytes) -> frozenset[str]:
    """System flags from mutt/Dovecot ``Status:``/``X-Status:`` header values."""
    out = set()
    if b"R" in status:
        out.add(SEEN)
    for ch, flag in ((b"A", ANSWERED), (b"F", FLAGGED), (b"D", DELETED), (b"T", DRAFT)):
        if ch in x_status:
            out.add(flag)
    return frozenset(out)


# Flags a change of the file never takes away: mutt writes no D or T into
# X-Status: when it rewrites a message, so their going is no sign of a user's wish.
STICKY_FLAGS = frozenset({DELETED, DRAFT})


def merge_file_flags(
    ours: frozenset[str], old_disk: frozenset[str], new_disk: frozenset[str]
) -> frozenset[str]:
    """
    A message's flags after another program (mutt) changed its Status:/X-Status:
    from C{old_disk} (what the file said when we last read or wrote it) to
    C{new_disk}: C{ours} with what the file gained added and what it lost taken
    away, flag by flag, so changes sessions made since the last write stay.

    \\Deleted and \\Draft are only ever added this way, never taken away: mutt
    does not carry X-Status: D or T through its own rewrite of a message (it
    drops a D another program wrote when it syncs an older view of the
    folder, and purges what it deletes), so a lost D is not an undelete, and
    a message must not come back for a client's EXPUNGE on that account
    either way; a user undeletes over IMAP.
    """
    added = new_disk - old_disk
    removed = old_disk - new_disk - STICKY_FLAGS
    return (ours - removed) | added


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


def _header_end(buf: bytes, pos: int, limit: int, has_cr: bool) -> int:
    """Index just after the blank line ending the header block at C{pos}, or -1."""
    if buf.startswith(b"\n", pos):
        return pos + 1
    if has_cr and buf.startswith(b"\r\n", pos):
        return pos + 2
    a = buf.find(b"\n\n", pos, limit)
    if has_cr:
        b = buf.find(b"\n\r\n", pos, a + 1 if a >= 0 else limit)
        if b >= 0:
            return b + 3
    return a + 2 if a >= 0 else -1


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
            hend = _header_end(buf, start, min(blen, start + HEADER_LIMIT), has_cr)
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


NO_FLAGS: frozenset[str] = frozenset()
