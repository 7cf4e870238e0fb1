"""
Message sources: the bytes of a message on their way into the store or the
queue, held in memory while small and spilled to a file in the spool folder
when large, so that memory does not grow with message size.
"""

from __future__ import annotations

import errno
import io
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import IO

from zope.interface import implementer

from mailsrv.interfaces import IMessageSource

SPILL_AT = 256 * 1024
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(error: BaseException | None) -> bool:
    """Whether C{error} says the disk (or the user's quota) is full: a file's or an index's."""
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(error, OSError) and error.errno in _DISK_FULL


@implementer(IMessageSource)
class BytesSource:
    """A message held in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def open(self):
        return io.BytesIO(self._data)


@implementer(IMessageSource)
class SpooledSource:
    """
    A message written piece by piece (SMTP DATA lines, an IMAP literal),
    in memory up to C{spill_at} bytes, then in an unnamed file under
    C{spool_dir}. Call L{finish} once written, L{discard} when done with it.

    Writing never raises: a file error (a full disk) is kept in C{error}, the
    message is dropped and later writes are ignored, so the protocol reads
    the rest of the message and then refuses it with a reply.
    """

    def __init__(self, spool_dir: Path | str | None = None, spill_at: int = SPILL_AT) -> None:
        self._spool_dir = None if spool_dir is None else str(spool_dir)
        self._spill_at = spill_at
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._file: IO[bytes] | None = None
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.size += len(data)
        try:
            if self._file is not None:
                self._file.write(data)
                return
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > self._spill_at:
                if self._spool_dir is not None:
                    os.makedirs(self._spool_dir, mode=0o700, exist_ok=True)
                f = tempfile.TemporaryFile(dir=self._spool_dir, prefix="spool-")
                self._file = f
                f.writelines(self._buffer)
                self._buffer = []
        except OSError as e:
            self._failed(e)

    def finish(self) -> None:
        if self._file is not None and self.error is None:
            try:
                self._file.flush()
            except OSError as e:
                self._failed(e)

    def _failed(self, error: OSError) -> None:
        self.error = error
        self.discard()

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def open(self):
        if self._file is None:
            return io.BytesIO(b"".join(self._buffer))
        # pread-based, so concurrent readers keep their own offsets.
        return io.BufferedReader(_Reader(self._file), 64 * 1024)

    def discard(self) -> None:
        self._buffer = []
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:
                pass  # a full disk: what it could not write is not wanted


class _Reader(io.RawIOBase):
    """Reads a spool file with pread, so several readers can share it."""

    def __init__(self, f) -> None:
        self._fd = f.fileno()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = os.pread(self._fd, len(b), self._pos)
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = os.fstat(self._fd).st_size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        # The spool owns the descriptor.
        super().close()
