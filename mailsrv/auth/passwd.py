"""
The password file: one ``address:$argon2id$...`` line per mailbox owner.

Like Dovecot's passwd-file: comments (``#``) and blank lines are ignored, and
extra ``:``-separated fields after the hash are kept but unused. The file is
mode 0600 and replaced atomically (temp file, fsync, rename, fsync of the
folder), so a crash leaves either the old or the new file, never half of one.
The server notices a new file by its inode, size and mtime, so that
``mailsrv user add`` takes effect without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.atomic import make_dirs, write_atomic
from mailsrv.interfaces import IPasswordDatabase
from mailsrv.store.names import normalize_user

DOVECOT_SCHEME = "{ARGON2ID}"
# Each check takes ~0.1 s of CPU and 64 MiB: a flood of logins must not take
# every thread of the pool the mailboxes' disk work shares.
MAX_CONCURRENT_CHECKS = 2


def default_hasher() -> PasswordHasher:
    """
    argon2id with OWASP's recommended parameters (19 MiB, 2 passes, 1 lane):
    strong against offline guessing, yet a login costs tens of milliseconds
    and 19 MiB, so a burst of logins neither stalls the disk pool nor
    balloons memory. Hashes keep their parameters, so older ones still verify.
    """
    return PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


class PasswordFileError(Exception):
    """The password file cannot be read or changed; the text is for the administrator."""


def check_address(address: str) -> str:
    """Return the normalized address, or raise ValueError if it cannot be a login name."""
    try:
        if ":" in address or any(c.isspace() for c in address):
            raise ValueError(address)
        return normalize_user(address)
    except ValueError:
        raise ValueError(f"not a usable mailbox address: {address!r} (give local@domain)")


def parse_lines(text: str) -> tuple[dict[str, str], list[int]]:
    """Parse passwd-file text; return (address -> hash, numbers of lines skipped as bad)."""
    users: dict[str, str] = {}
    bad: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fields = s.split(":")
        if len(fields) < 2 or not fields[1]:
            bad.append(n)
            continue
        try:
            address = normalize_user(fields[0])
        except ValueError:
            bad.append(n)
            continue
        h = fields[1]
        if h.startswith(DOVECOT_SCHEME):
            h = h[len(DOVECOT_SCHEME) :]
        users[address] = h
    return users, bad


@implementer(IPasswordDatabase)
class PasswordFile:
    """
    The users in a passwd-file, re-read when the file changes on disk.

    Lookups are synchronous on a cached copy (a C{stat} per lookup decides
    whether to re-read); hashing and verifying run in C{threadpool}.
    """

    log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        reactor: Any = None,
        threadpool: Any = None,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self._pool = threadpool
        self._hasher = hasher if hasher is not None else default_hasher()
        self._users: dict[str, str] = {}
        self._key: tuple[int, ...] | None = None
        self._dummy: str | None = None
        self._checks = defer.DeferredSemaphore(MAX_CONCURRENT_CHECKS)

    # --- reading ---------------------------------------------------------

    def _stat_key(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _current(self) -> dict[str, str]:
        key = self._stat_key()
        if key != self._key:
            if key is None:
                self._users = {}
            else:
                try:
                    text = self.path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    self.log.error("cannot read {path}: {error}", path=str(self.path), error=str(e))
                    return self._users  # keep the last good copy
                users, bad = parse_lines(text)
                for n in bad:
                    self.log.warn(
                        "{path}:{line}: not address:hash, ignored", path=str(self.path), line=n
                    )
                self._users = users
                self.log.info(
                    "loaded {count} users from {path}", count=len(users), path=str(self.path)
                )
            self._key = key
        return self._users

    def has_user(self, address: str) -> bool:
        """Whether C{address} is a known user."""
        try:
            address = normalize_user(address)
        except ValueError:
            return False
        return address in self._current()

    def users(self) -> list[str]:
        """All addresses, sorted."""
        return sorted(self._current())

    def verify(self, address: str, password: str | bytes) -> defer.Deferred:
        """
        Fire with whether C{password} is C{address}'s. An unknown user costs
        the same as a wrong password: the password is checked against a dummy
        hash made with the same parameters.
        """
        try:
            stored = self._current().get(normalize_user(address))
        except ValueError:
            stored = None
        return self._checks.run(self._in_thread, self._verify_sync, stored, password)

    def _in_thread(self, f: Any, *args: Any) -> defer.Deferred:
        if self._pool is None or self._reactor is None:
            return defer.maybeDeferred(f, *args)
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args)

    def _verify_sync(self, stored: str | None, password: str | bytes) -> bool:
        real = stored is not None
        if self._dummy is None:  # made at the first check, whoever asks: no timing tell
            self._dummy = self._hasher.hash("dummy password for unknown users")
        if stored is None:
            stored = self._dummy
        ok: bool
        try:
            ok = self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        return ok and real

    # --- changing (the admin command) ----------------------------------------

    def hash_password(self, password: str) -> str:
        """An argon2id hash of C{password} (blocking)."""
        return self._hasher.hash(password)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        """Hold the lock beside the file while reading, changing and writing the user table."""
        make_dirs(self.path.parent)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = ""
            except (OSError, UnicodeDecodeError) as e:
                raise PasswordFileError(f"{self.path}: cannot read: {e}")
            lines = text.splitlines()
            users, _ = parse_lines(text)
            before = dict(users)
            yield users
            if users != before:
                self._write(_render(lines, before, users))
        finally:
            os.close(fd)

    def _write(self, text: str) -> None:
        """Replace the file atomically: temp file (0600), fsync, rename, fsync folder."""
        write_atomic(self.path, text.encode("utf-8"), 0o600, keep_owner=True)

    def add_user(self, address: str, password: str) -> str:
        """Add a user (blocking); return the normalized address. KeyError if present."""
        address = check_address(address)
        hashed = self.hash_password(password)
        with self._locked() as users:
            if address in users:
                raise KeyError(address)
            users[address] = hashed
        return address

    def set_password(self, address: str, password: str) -> str:
        """Change a user's password (blocking). KeyError if unknown."""
        address = check_address(address)
        hashed = self.hash_password(password)
        with self._locked() as users:
            if address not in users:
                raise KeyError(address)
            users[address] = hashed
        return address

    def delete_user(self, address: str) -> str:
        """Remove a user (blocking). KeyError if unknown."""
        address = normalize_user(address)
        with self._locked() as users:
            if address not in users:
                raise KeyError(address)
            del users[address]
        return address


def _render(lines: list[str], before: dict[str, str], after: dict[str, str]) -> str:
    """The new file text: comments and unknown lines kept, changed users rewritten in place."""
    out: list[str] = []
    seen: set[str] = set()
    for line in lines:
        s = line.strip()
        fields = s.split(":")
        if s and not s.startswith("#") and len(fields) >= 2:
            try:
                address = normalize_user(fields[0])
            except ValueError:
                address = None
            if address is not None and address in before:
                if address not in after or address in seen:
                    continue  # deleted, or a duplicate line
                seen.add(address)
                if fields[1].removeprefix(DOVECOT_SCHEME) != after[address]:
                    fields[0], fields[1] = address, after[address]
                    line = ":".join(fields)
        out.append(line)
    for address, h in after.items():
        if address not in seen:
            out.append(f"{address}:{h}")
    return "".join(f"{line}\n" for line in out)
