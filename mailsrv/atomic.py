"""
The one way a file is replaced whole: written under a unique temporary name
in the same folder (or in a folder on the same file system), fsynced,
renamed over the old one, and the folder fsynced. A reader sees the old file
or the new one, never a part; two writers at once never share a temporary
file, the last rename wins.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def make_dirs(path: Path | str, mode: int = 0o700) -> None:
    """C{mkdir -p} where every folder made has C{mode} (the parents too, unlike L{Path.mkdir})."""
    path = Path(path)
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode)
        except FileExistsError:
            pass


def fsync_dir(path: Path | str) -> None:
    """Make the entries of folder C{path} (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path | str,
    data: bytes | Callable[[BinaryIO], object],
    mode: int = 0o600,
    *,
    tmp_dir: Path | str | None = None,
    replace: bool = True,
    sync_dir: bool = True,
    keep_owner: bool = False,
) -> None:
    """
    Replace C{path} with C{data} (bytes, or a function that writes to the
    file) atomically, the new file having C{mode} from its creation.

    C{tmp_dir}: where the temporary file is made (same file system; default
    the file's own folder). C{replace} False never overwrites: an existing
    C{path} raises L{FileExistsError}. C{sync_dir} False leaves the folder's
    fsync to the caller (one fsync for a batch of files). C{keep_owner}: when
    run as root, the new file gets the owner of the old one (or of its folder),
    so that a server running as another user can still read it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, mode)  # mkstemp makes 0600; the umask plays no part
            if keep_owner and os.geteuid() == 0:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    st = os.stat(path.parent)
                os.fchown(fd, st.st_uid, st.st_gid)
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)
