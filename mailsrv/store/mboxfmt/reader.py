"""
Reading one message back out of an mbox file, with CRLF line ends and
mboxrd unquoting, in pieces, by file offset (pread), so many readers share
one file handle; a reader sets its rest aside before a rewrite moves it.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading

from mailsrv.store.mboxfmt.fields import header_end_at, strip_hidden
from mailsrv.store.mboxfmt.limits import CHUNK, HEADER_LIMIT, READ_CHUNK, SPILL_IN_MEMORY
from mailsrv.store.mboxfmt.quoting import to_crlf


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
            hend = header_end_at(head, 0, len(head), b"\r" in head)
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
