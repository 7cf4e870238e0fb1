"""
mbox locking that mutt, procmail, Postfix and Dovecot respect: a dotlock
(C{<file>.lock}, created with link() so it also works on NFS) and an fcntl
write lock on the file itself. Blocking calls: run them on a disk thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import struct
import time
from pathlib import Path

from twisted.logger import Logger

STALE_AFTER = 300.0  # seconds; a dotlock this old is broken (Dovecot, mutt: 5 minutes)
DEFAULT_TIMEOUT = 60.0
FCNTL_SLICE = 0.25  # seconds to wait for fcntl while holding the dotlock

log = Logger()


class LockTimeout(OSError):
    """The mbox stayed locked by someone else for too long."""


def _hostname() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dotlock_is_stale(lock: Path, now: float) -> bool:
    try:
        st = lock.stat()
    except FileNotFoundError:
        return False
    if now - st.st_mtime > STALE_AFTER:
        return True
    # Dovecot's format: "pid:host". A dead process on this host left it behind.
    try:
        content = lock.read_bytes()[:128].decode("ascii", "replace").strip()
    except OSError:
        return False
    pid_s, _, host = content.partition(":")
    if pid_s.isdigit() and host == _hostname() and int(pid_s) > 0:
        return not _pid_alive(int(pid_s)) and now - st.st_mtime > 0.5
    return False


def _write_temp(tmp: Path) -> None:
    """
    Create the temporary lock file. Only its inode is needed: the "pid:host"
    line that lets a dead holder's lock be broken at once is written if it
    fits, and the file is left empty on a disk with no free blocks (an empty
    dotlock is what Postfix's dot_lockfile and mutt_dotlock make and accept;
    it is broken after STALE_AFTER).
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        content = f"{os.getpid()}:{_hostname()}\n".encode()
        try:
            written = os.write(fd, content)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            written = -1
        if written != len(content):
            os.ftruncate(fd, 0)  # never a partial line that reads as another pid
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)


def acquire_dotlock(path: Path, deadline: float, reader: bool = False) -> Path | None:
    """
    Create C{path}.lock (temp file, link(), check link count); wait until
    C{deadline}. Taking it needs an inode but no data block, so it works on a
    disk whose blocks are full. When even the inode cannot be made (ENOSPC on
    create: nobody else can make a dotlock either) and nobody holds one, a
    C{reader} gets None: fcntl alone then guards the file, so that mail can
    still be read. Anyone else gets the ENOSPC error.
    """
    lock = path.with_name(path.name + ".lock")
    tmp = path.with_name(f".{path.name}.lk.{_hostname()}.{os.getpid()}.{time.monotonic_ns()}")
    delay = 0.005
    while True:
        try:
            _write_temp(tmp)
        except OSError as e:
            if e.errno != errno.ENOSPC or not reader:
                raise
            if not lock.exists():
                log.warn("no inode left for a dotlock on {path}: fcntl lock only", path=str(path))
                return None
        else:
            try:
                try:
                    os.link(tmp, lock)
                except FileExistsError:
                    pass
                if os.stat(tmp).st_nlink == 2:
                    return lock
            finally:
                os.unlink(tmp)
        now = time.time()
        if _dotlock_is_stale(lock, now):
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass
            continue
        if time.monotonic() >= deadline:
            raise LockTimeout(errno.EAGAIN, f"dotlock held too long: {lock}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def release_dotlock(lock: Path) -> None:
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass


_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)


def _fcntl_try(fd: int, exclusive: bool) -> bool:
    """One non-blocking attempt at an fcntl lock on the whole file."""
    ltype = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    if _OFD_SETLK is not None:
        # Open-file-description locks: not dropped when another fd of this file
        # is closed, and they conflict with other processes' POSIX locks.
        arg = struct.pack("hhqqi4x", ltype, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(fd, _OFD_SETLK, arg)
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            if e.errno != errno.EINVAL:
                raise
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def acquire_fcntl(fd: int, deadline: float, exclusive: bool = True) -> None:
    delay = 0.002
    while not _fcntl_try(fd, exclusive):
        if time.monotonic() >= deadline:
            raise LockTimeout(errno.EAGAIN, "mbox is fcntl-locked by another process")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class MboxLock:
    """
    An exclusive lock on an mbox file: dotlock, then fcntl on a fresh fd. After
    locking, the fd is checked to still be the file at C{path} (someone may have
    renamed a new file over it) and reopened if not. C{fd} is O_RDWR.

    C{reader}: the holder reads the file (indexes it to serve SELECT, EXAMINE,
    FETCH, a POP3 login; at most it cuts off an append of its own that a
    crash left half written), so it may fall back to fcntl alone when no
    dotlock can be created at all; writers get the ENOSPC error instead.
    """

    def __init__(
        self,
        path: Path,
        timeout: float = DEFAULT_TIMEOUT,
        create: bool = False,
        reader: bool = False,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.create = create
        self.reader = reader
        self.fd = -1
        self._dotlock: Path | None = None

    def __enter__(self) -> MboxLock:
        deadline = time.monotonic() + self.timeout
        while True:
            self._dotlock = acquire_dotlock(self.path, deadline, self.reader)
            try:
                if self._lock_file(min(deadline, time.monotonic() + FCNTL_SLICE)):
                    return self
            except BaseException:
                self._release_dotlock()
                raise
            # Someone that takes fcntl first (Postfix, mutt) holds the file: let go of
            # the dotlock so they can finish, then try again.
            self._release_dotlock()
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    errno.EAGAIN, f"mbox is fcntl-locked by another process: {self.path}"
                )
            time.sleep(random.uniform(0.01, 0.05))

    def _lock_file(self, deadline: float) -> bool:
        """Open the mbox and fcntl-lock it; False if still locked at C{deadline}."""
        flags = os.O_RDWR | (os.O_CREAT if self.create else 0)
        while True:
            fd = os.open(self.path, flags, 0o600)
            try:
                acquire_fcntl(fd, deadline)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self.fd = fd
                    return True
            except LockTimeout:
                os.close(fd)
                return False
            except FileNotFoundError:
                os.close(fd)
                if not self.create:
                    raise
                continue
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # renamed over while we waited: lock the new file

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the fcntl lock
            self.fd = -1
        self._release_dotlock()

    def _release_dotlock(self) -> None:
        if self._dotlock is not None:
            release_dotlock(self._dotlock)
            self._dotlock = None
