"""
``mailsrv backup DEST``: a consistent copy of the data folder, taken while the
server runs, into a new folder.

    DEST/data/          the data folder ([server] data_dir), file by file
    DEST/root/<path>    files the config names outside it (the config file,
                        aliases, passwd, DKIM keys, TLS certificate and key,
                        policy lists), under their absolute paths

What makes each part consistent:
  - an mbox is copied under the lock the server, Postfix, procmail and mutt
    take (dotlock, then fcntl: L{mailsrv.store.locking.MboxLock}), so no
    append or rewrite is half done in the copy; its index (UIDVALIDITY, the
    UIDs, flags) is copied under the same lock, through SQLite's backup API
    (a snapshot, its WAL folded in), so that a restored copy keeps the UIDs
    and flags (under a new UIDVALIDITY, see below);
  - a queue entry (C{ID.msg}, and a newer C{ID.env}) is written whole and
    renamed into place by the server: its file is opened, then the newer
    envelope read, then the message streamed from the open file;
  - every other file (passwd, TLS and DKIM keys, the SRS secret) is replaced
    whole by rename, so a file opened is a whole file; any other SQLite
    database is copied through the backup API too.
Lock files, SQLite's -wal/-shm and the spool (C{tmp/}, messages still being
received) are left out. Files are streamed through a fixed buffer: memory
does not grow with a mailbox. Modes, owners and modification times are kept.

The last file written is C{DEST/BACKUP-COMPLETE} (the summary line), after
everything else is on disk: a copy without it (a full disk, a file that could
not be read) is not a backup to restore from, and the command says so.

C{DEST/data/BACKUP-COMPLETE}, written just before, travels back with the
data folder: the next start gives every folder a new UIDVALIDITY, since UIDs
given after the backup would be given again (L{mailsrv.store.restored}).

Restoring is copying back with the server stopped (README: Deployment).
"""

from __future__ import annotations

import argparse
import errno
import os
import pwd
import secrets
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsrv.store.index import SUFFIXES, index_base
from mailsrv.store.locking import MboxLock
from mailsrv.store.quotalimits import format_size
from mailsrv.store.restored import ID_PREFIX, MARK

HANDLER = "handler"
BUFFER = 1024 * 1024  # octets per read while streaming a file
QUEUE_SKIPPED = frozenset({"relay.lock", "flush"})
SQLITE_SIDE = ("-wal", "-shm", "-journal")
COMPLETE = MARK  # written last: the copy is whole


class BackupError(Exception):
    """A backup that is not taken; the text says why."""


@dataclass
class Summary:
    """What a backup copied, for its summary line."""

    folders: int = 0
    users: set[tuple[str, str]] = field(default_factory=set)
    mail_octets: int = 0
    queued: int = 0
    files: int = 0
    outside: int = 0
    skipped: list[str] = field(default_factory=list)

    def line(self, data_dir: Path, dest: Path) -> str:
        return (
            f"backup of {data_dir} in {dest}: {self.folders} folders of {len(self.users)} users "
            f"({format_size(self.mail_octets)}, each with its index), {self.queued} queued "
            f"messages, {self.files} other files, {self.outside} files from outside the "
            "data folder"
        )


def add_backup_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``backup DEST`` subcommand to C{subparsers}."""
    p = subparsers.add_parser(
        "backup",
        help="copy the data folder consistently while the server runs",
        description=(
            "Copy the data folder into DEST (a new or empty folder): each mbox and its index "
            "under the folder's lock, each queue entry whole, and the files the config names "
            "outside the data folder under DEST/root."
        ),
    )
    p.add_argument("dest", metavar="DEST", help="a folder that does not exist yet, or is empty")
    p.set_defaults(**{HANDLER: backup_command})
    return p


def backup_command(args: argparse.Namespace, config: Any) -> int:
    """Take the backup; print the summary line (exit 0), or why not (exit 1)."""
    try:
        summary = backup(config, Path(args.dest))
    except BackupError as e:
        print(f"mailsrv: {e}", file=sys.stderr)
        return 1
    for note in summary.skipped:
        print(f"mailsrv: skipped {note}", file=sys.stderr)
    print(summary.line(config.server.data_dir, Path(args.dest)))
    return 0


def backup(config: Any, dest: Path) -> Summary:
    """Copy the data folder of C{config} into the new folder C{dest}."""
    data_dir = Path(config.server.data_dir)
    if not data_dir.is_dir():
        raise BackupError(f"{data_dir}: no data folder (server.data_dir in {config.path})")
    if dest.resolve().is_relative_to(data_dir.resolve()):  # symlinks on the way too
        raise BackupError(f"{dest} is inside the data folder {data_dir}")
    _new_folder(dest)
    try:
        summary = _copy_all(config, data_dir, dest)
        os.sync()  # the copy is on disk before it is marked complete
        notes = "".join(f"\nskipped {note}" for note in summary.skipped)
        line = summary.line(data_dir, dest) + notes
        # The copy of the data folder carries the mark too: put back, it tells the
        # server to renew every UIDVALIDITY (mailsrv.store.restored).
        _mark_complete(dest / "data", f"{line}\n{ID_PREFIX}{time.time_ns()}-{secrets.token_hex(8)}")
        _mark_complete(dest, line)
    except (OSError, sqlite3.Error) as e:
        where = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
        raise BackupError(
            f"{where}: the backup in {dest} is NOT complete (no {COMPLETE} file): "
            "do not restore from it"
        ) from e
    return summary


def _copy_all(config: Any, data_dir: Path, dest: Path) -> Summary:
    """Everything but the mark of completion."""
    out = dest / "data"
    summary = Summary()
    _mirror_dir(data_dir, out)
    mail, index, queue = data_dir / "mail", data_dir / "index", data_dir / "queue"
    for mbox, domain, local, name in _mboxes(mail):
        _copy_folder(data_dir, out, mbox, index_base(index, domain, local, name), summary)
        summary.users.add((domain, local))
    if queue.is_dir():
        _copy_queue(data_dir, out, queue, summary)
    skip = {mail, index, queue, data_dir / "tmp", data_dir / COMPLETE}
    for path in _files(data_dir, exclude=skip):
        _copy_file(data_dir, out, path, summary)
        summary.files += 1
    for path in _outside_files(config, data_dir):
        target = dest / "root" / path.relative_to(path.anchor)
        try:
            _mirror_dir(path.parent, target.parent, Path(path.anchor), dest / "root")
            _copy_file(path.parent, target.parent, path, summary)
        except PermissionError:  # a root-only file under /etc: copy it as root yourself
            summary.skipped.append(f"{path}: not readable by {_user_name()}")
            continue
        summary.outside += 1
    return summary


def _mark_complete(dest: Path, line: str) -> None:
    """Write C{DEST/BACKUP-COMPLETE} (or C{DEST/data/...}) durably: the copy is whole."""
    fd = os.open(dest / COMPLETE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        data = (line + "\n").encode()
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest / COMPLETE))
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _new_folder(dest: Path) -> None:
    try:
        dest.mkdir(mode=0o700)
    except FileExistsError:
        if not dest.is_dir() or dest.is_symlink():
            raise BackupError(f"{dest} exists and is not a folder")
        if any(dest.iterdir()):
            raise BackupError(f"{dest} is not empty: give a new or empty folder")
        os.chmod(dest, 0o700)  # the copy holds passwords and keys
    except OSError as e:
        hint = ""
        if e.errno in (errno.EACCES, errno.EPERM):
            me = _user_name()  # run as root, the command is the server's account by now
            hint = (
                f" (the backup runs as {me}, the server's account when run as root: give it "
                f"a folder of its own for backups, e.g. install -d -o {me} -m 700 {dest.parent})"
            )
        raise BackupError(f"{dest}: {e.strerror}{hint}")


def _mboxes(mail: Path) -> Iterator[tuple[Path, str, str, str]]:
    """Each mbox under C{mail}: (path, domain, local part, folder name)."""
    if not mail.is_dir():
        return
    for top, dirs, files in os.walk(mail):
        dirs.sort()
        rel = Path(top).relative_to(mail).parts
        if len(rel) < 2:
            continue
        for f in sorted(files):
            path = Path(top) / f
            if _is_lock_file(f) or not stat.S_ISREG(path.lstat().st_mode):
                continue
            yield path, rel[0], rel[1], "/".join((*rel[2:], f))


def _is_lock_file(name: str) -> bool:
    """A dotlock, its temporary file, or another lock file: never copied."""
    return name.endswith(".lock") or (name.startswith(".") and ".lk." in name)


def _copy_folder(data_dir: Path, out: Path, mbox: Path, index: Path, summary: Summary) -> None:
    """The mbox and its index files, under the folder's lock (as the server reads it)."""
    with MboxLock(mbox, reader=True) as lk:
        st = os.fstat(lk.fd)
        target = out / mbox.relative_to(data_dir)
        _mirror_dir(mbox.parent, target.parent, data_dir, out)
        os.lseek(lk.fd, 0, os.SEEK_SET)
        _stream(lk.fd, target, st)
        summary.mail_octets += st.st_size
        summary.folders += 1
        for suffix in SUFFIXES:
            src = Path(str(index) + suffix)
            if not src.exists():
                continue
            dst = out / src.relative_to(data_dir)
            _mirror_dir(src.parent, dst.parent, data_dir, out)
            if suffix == ".sqlite":
                _copy_sqlite(src, dst)
            elif suffix not in (".sqlite-wal", ".sqlite-shm"):
                _copy_file(src.parent, dst.parent, src, summary)


def _copy_queue(data_dir: Path, out: Path, queue: Path, summary: Summary) -> None:
    """
    Each queue entry whole: its queue file opened first, then its newer
    envelope read, then the message streamed from the open file. Files being
    written (C{tmp/}), the relay lock and a flush request are left out.
    """
    for here, dirs, files in os.walk(queue):
        dirs[:] = sorted(d for d in dirs if Path(here, d) != queue / "tmp")
        folder = Path(here)
        _mirror_dir(folder, out / folder.relative_to(data_dir), data_dir, out)
        for name in sorted(files):
            path = folder / name
            if name.endswith(".msg"):
                _copy_entry(data_dir, out, path, summary)
            elif not (
                name.endswith(".env")
                or name in QUEUE_SKIPPED
                or _is_lock_file(name)
                or not stat.S_ISREG(path.lstat().st_mode)
            ):
                _copy_file(data_dir, out, path, summary)
                summary.files += 1


def _copy_entry(data_dir: Path, out: Path, path: Path, summary: Summary) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return  # delivered meanwhile
    try:
        st = os.fstat(fd)
        env = path.with_suffix(".env")
        if env.exists():
            _copy_file(data_dir, out, env, summary)
        _stream(fd, out / path.relative_to(data_dir), st)
        summary.queued += 1
    finally:
        os.close(fd)


def _files(top: Path, exclude: set[Path]) -> Iterator[Path]:
    """The regular files under C{top} but those in C{exclude}, the spool and lock files."""
    for here, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if Path(here, d) not in exclude)
        for f in sorted(files):
            path = Path(here) / f
            if _is_lock_file(f) or f.endswith(SQLITE_SIDE) or path in exclude:
                continue
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def _outside_files(config: Any, data_dir: Path) -> list[Path]:
    """The files the config names that lie outside the data folder, the config file first."""
    named: list[Any] = [
        config.path,
        config.addresses.aliases,
        config.auth.passwd_file,
        config.tls.certificate,
        config.tls.key,
        *config.dkim.keys.values(),
        config.policy.deny_file,
        config.policy.allow_file,
    ]
    found: list[Path] = []
    for p in named:
        if p is None:
            continue
        path = Path(p).absolute()
        try:
            is_file = path.is_file()
        except PermissionError:
            is_file = True  # in a folder this account cannot enter: said as skipped
        if is_file and not path.is_relative_to(data_dir) and path not in found:
            found.append(path)
    return found


def _copy_file(src_root: Path, out_root: Path, path: Path, summary: Summary) -> None:
    """One file (opened, then streamed: a file replaced by rename is whole)."""
    if path.name.endswith(".sqlite"):
        _copy_sqlite(path, out_root / path.relative_to(src_root))
        return
    target = out_root / path.relative_to(src_root)
    _mirror_dir(path.parent, target.parent, src_root, out_root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        summary.skipped.append(f"{path}: removed while the backup ran")
        return
    try:
        _stream(fd, target, os.fstat(fd))
    finally:
        os.close(fd)


def _stream(fd: int, target: Path, st: os.stat_result) -> None:
    """Copy C{st.st_size} octets from C{fd} into the new file C{target}; keep mode, owner, times."""
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        left = st.st_size
        while left > 0:
            n = os.readv(fd, [view[: min(left, BUFFER)]])
            if n == 0:
                break
            written = 0
            while written < n:
                written += os.write(out, view[written:n])
            left -= n
        _keep_attributes(out, st)
    except OSError as e:
        e.filename = e.filename or str(target)  # which file the disk refused
        raise
    finally:
        os.close(out)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_sqlite(src: Path, target: Path) -> None:
    """
    A consistent snapshot of a live SQLite database (its WAL folded in). The
    -wal and -shm files a read-only open can create are given to the
    database's owner, so that the server can still open its index.
    """
    st = src.stat()
    side_before = {s: Path(str(src) + s).exists() for s in ("-wal", "-shm")}
    source = sqlite3.connect(f"{src.as_uri()}?mode=ro", uri=True)
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            copy.close()
    finally:
        source.close()
        for s, existed in side_before.items():
            side = Path(str(src) + s)
            if not existed and os.geteuid() == 0 and side.exists():
                os.chown(side, st.st_uid, st.st_gid)
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        _keep_attributes(fd, st)
    finally:
        os.close(fd)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _keep_attributes(fd: int, st: os.stat_result) -> None:
    """The source's owner (when this process may give it) and mode."""
    if os.geteuid() == 0:
        os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))


def _mirror_dir(
    src: Path, dst: Path, src_root: Path | None = None, dst_root: Path | None = None
) -> None:
    """
    Make C{dst} and the folders between C{dst_root} and it, each with the
    mode and owner of its counterpart under C{src_root}.
    """
    if dst.is_dir():
        return
    if src_root is not None and dst_root is not None and src != src_root:
        _mirror_dir(src.parent, dst.parent, src_root, dst_root)
    st = src.stat()
    dst.mkdir(mode=0o700)
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _keep_attributes(fd, st)
    finally:
        os.close(fd)
