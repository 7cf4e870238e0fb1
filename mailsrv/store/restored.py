"""
A data folder put back from a backup (``mailsrv backup`` leaves its mark,
C{BACKUP-COMPLETE}, inside the copied data folder too) serves the UIDs of the
time of the backup: messages delivered since had UIDs clients saw, and new
ones would get them again. RFC 3501 2.3.1.1: when UIDs of an earlier session
do not persist, UIDVALIDITY MUST be greater. So at the first start after a
restore, before the store opens anything, every folder's index gets a new,
greater UIDVALIDITY (POP3 UIDLs are built from it, so they change too):
clients download each folder once again, and lose nothing.

Crash-safe: the mark holds an id of the restore (written into it first if it
has none, e.g. a mark made by hand); each index records the id with its new
UIDVALIDITY in one transaction, so a start-up cut short does the folders left
at the next start and no folder twice; the mark goes only after all are done.
Blocking: runs once at start-up, before the reactor serves anything.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from mailsrv.atomic import fsync_dir, write_atomic
from mailsrv.logsafe import SafeLogger
from mailsrv.store.index import SUFFIXES, renew_validity

MARK = "BACKUP-COMPLETE"  # mailsrv.backup.COMPLETE, copied back with the data folder
ID_PREFIX = "restore-id: "

log = SafeLogger()


def restore_id(mark: Path) -> str:
    """The id of the restore the mark at C{mark} stands for; given one first if it has none."""
    text = mark.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith(ID_PREFIX) and line[len(ID_PREFIX) :].strip():
            return line[len(ID_PREFIX) :].strip()
    new = f"{time.time_ns()}-{secrets.token_hex(8)}"
    body = text if not text or text.endswith("\n") else text + "\n"
    write_atomic(mark, (body + ID_PREFIX + new + "\n").encode(), keep_owner=True)
    return new


def renew_after_restore(
    data_dir: Path,
    index_dir: Path,
    now: Callable[[], float] = time.time,
    renew: Callable[[Path, str, int], int | None] = renew_validity,
) -> int | None:
    """
    If C{data_dir} holds the mark of a restored backup, give every folder
    index under C{index_dir} a new, greater UIDVALIDITY (once per restore),
    then remove the mark. The number of folders renewed by this call, or
    None if the data folder is not a restored one. C{renew}: how one index is
    renewed (L{renew_validity}).
    """
    mark = data_dir / MARK
    if not mark.is_file():
        return None
    restore = restore_id(mark)
    stamp = int(now())
    renewed = 0
    top = 0
    for path in sorted(index_dir.glob("*/*/*.sqlite")):
        try:
            validity = renew(path, restore, stamp)
        except sqlite3.DatabaseError as e:
            # An index sqlite cannot read is rebuilt at open, with a fresh UIDVALIDITY.
            log.warn(
                "index {path} not renewed after the restore ({error})", path=str(path), error=str(e)
            )
            continue
        finally:
            _keep_owner(path)
        if validity is not None:
            renewed += 1
            top = max(top, validity)
    if top:
        _raise_counter(index_dir / "uidvalidity", top)
    os.unlink(mark)
    fsync_dir(data_dir)
    return renewed


def _raise_counter(path: Path, validity: int) -> None:
    """Keep the store's last UIDVALIDITY handed out (C{index_dir/uidvalidity}) at least C{validity}."""
    try:
        last = int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        last = 0
    if validity > last:
        write_atomic(path, b"%d\n" % validity, keep_owner=True)


def _keep_owner(path: Path) -> None:
    """Run as root: sqlite's side files left beside C{path} get its owner, as the server reads them."""
    if os.geteuid() != 0:
        return
    st = os.stat(path)
    base = str(path)[: -len(".sqlite")]
    for suffix in SUFFIXES:
        try:
            os.chown(base + suffix, st.st_uid, st.st_gid, follow_symlinks=False)
        except FileNotFoundError:
            pass
