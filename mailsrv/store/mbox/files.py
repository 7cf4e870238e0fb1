"""
Small file-system helpers of the mbox store (disk threads): what a stat()
says the index covers, mkdir -p with fsyncs, a byte-range copy, and the
mapping of a folder operation's OS errors to a L{FolderError}.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from mailsrv.atomic import fsync_dir
from mailsrv.interfaces import FolderError
from mailsrv.logsafe import SafeLogger
from mailsrv.spool import disk_full
from mailsrv.store import mboxfmt

# Every part of the store logs under the name the store has always logged
# under, so that an administrator's greps keep finding its lines.
LOG_NAMESPACE = "mailsrv.store.mbox.MboxMailStore"
SUB_FOLDERS_REFUSED = "A mailbox cannot have sub-folders here"


def store_logger() -> SafeLogger:
    """The logger of the store's parts (one namespace for all of them)."""
    return SafeLogger(namespace=LOG_NAMESPACE)


def stat_covered(s: os.stat_result) -> tuple[int, int, int]:
    """What the index records it describes of a file: (size, mtime in ns, inode)."""
    return (s.st_size, s.st_mtime_ns, s.st_ino)


def is_file(s: os.stat_result) -> bool:
    return stat.S_ISREG(s.st_mode)


def unlink_quiet(p: Path) -> None:
    """Remove C{p} if it is there."""
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def make_dirs_synced(d: Path) -> None:
    """mkdir -p, fsyncing each directory that gained an entry."""
    missing = []
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        try:
            m.mkdir(0o700)
        except FileExistsError:
            pass
        fsync_dir(m.parent)


def copy_range(src: int, dst: int, a: int, b: int, out_pos: int | None = None) -> None:
    """Copy bytes C{[a, b)} of C{src} to C{dst} (at C{out_pos}, or its file position)."""
    pos = a
    while pos < b:
        n = min(b - pos, 16 * 1024 * 1024)
        try:
            if out_pos is None:
                done = os.copy_file_range(src, dst, n, pos)
            else:
                done = os.copy_file_range(src, dst, n, pos, out_pos + (pos - a))
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, n, pos)
            if out_pos is None:
                done = mboxfmt.write_all(dst, data)
            else:
                done = os.pwrite(dst, data, out_pos + (pos - a))
        if done <= 0:
            raise OSError(errno.EIO, "short copy")
        pos += done


class Refused:
    """
    Turns an OS error of a folder operation (disk thread) into a
    L{FolderError} with a plain text for the client, and logs the cause. A
    full disk stays an OS error: the protocols answer it with their own codes.
    """

    def __init__(self, log: Logger, action: str, user: str, name: str) -> None:
        self.log = log
        self.action = action
        self.user = user
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> None:
        if not isinstance(e, OSError) or disk_full(e):
            return
        self.log.warn(
            "cannot {action} {user} {folder}: {error}",
            action=self.action,
            user=self.user,
            folder=self.name,
            error=str(e),
        )
        if isinstance(e, (NotADirectoryError, FileExistsError)):
            raise FolderError(SUB_FOLDERS_REFUSED) from None
        raise FolderError(f"Cannot {self.action} the folder") from None
