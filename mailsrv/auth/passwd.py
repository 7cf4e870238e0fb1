"""
The password file: one ``address:$argon2id$...`` line per mailbox owner.

Like Dovecot's passwd-file: comments (``#``) and blank lines are ignored, and
extra ``:``-separated fields after the hash are kept but unused. The file is
mode 0600 and replaced atomically (temp file, fsync, rename, fsync of the
folder), so a crash leaves either the old or the new file, never half of one.
The server notices a new file by its inode, size and mtime, so that
``mailsrv user add`` takes effect without a restart.

Local parts are looked up case-insensitively, as Postfix's and Dovecot's
lookups are (the domain is always lower-cased): ``Alice@example.test`` finds
the user stored as ``alice@example.test``, and every lookup answers with the
stored spelling, which names the user's mailbox on disk. Two users whose
addresses differ only in case cannot be added.

Local parts may be UTF-8 (RFC 6531, ``jösé@example.test``; kept in Unicode
NFC), and an internationalised domain is stored as A-labels
(``xn--bcher-kva.example``), so a user is found whether a client writes
the domain with U-labels or A-labels.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer, threads
from zope.interface import implementer

from mailsrv.atomic import make_dirs, write_atomic
from mailsrv.interfaces import IPasswordDatabase, PasswordDatabaseError
from mailsrv.logsafe import SafeLogger
from mailsrv.store.names import normalize_user, split_user
from mailsrv.store.upgrade import find_collisions, passwd_entries

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


class PasswordFileError(PasswordDatabaseError):
    """The password file cannot be read or changed; the text is for the administrator."""


def check_address(address: str) -> str:
    """Return the normalized address, or raise ValueError if it cannot be a login name."""
    try:
        if ":" in address or any(c.isspace() for c in address):
            raise ValueError(address)
        return normalize_user(address)
    except ValueError:
        raise ValueError(f"not a usable mailbox address: {address!r} (give local@domain)")


def lookup_key(address: str) -> str:
    """The case-folded form two spellings of one user share; ValueError if unusable."""
    local, domain = split_user(address)
    return f"{local.lower()}@{domain}"


def _find(users: dict[str, str], address: str) -> str | None:
    """The stored spelling of C{address} in C{users}, or None."""
    if address in users:
        return address
    key = lookup_key(address)
    for stored in users:
        if lookup_key(stored) == key:
            return stored
    return None


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

    log = SafeLogger()

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
        self._folded: dict[str, str] = {}  # lookup_key -> stored address
        self._key: tuple[int, ...] | None = None
        self._loaded = False
        self._dummy: str | None = None
        self._checks = defer.DeferredSemaphore(MAX_CONCURRENT_CHECKS)

    # --- reading ---------------------------------------------------------

    def _stat_key(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None  # no users yet
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _current(self) -> dict[str, str]:
        """
        The users, re-read if the file changed. If it cannot be read, the last
        good copy is kept; without one, L{PasswordFileError}: a local problem
        the caller answers as temporary, never as "no such user".
        """
        try:
            key = self._stat_key()
            if self._loaded and key == self._key:
                return self._users
            text = "" if key is None else self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self.log.error("cannot read {path}: {error}", path=str(self.path), error=str(e))
            if self._loaded:
                return self._users  # keep the last good copy
            raise PasswordFileError(f"{self.path}: cannot read: {e}") from e
        users, bad = parse_lines(text)
        for n in bad:
            self.log.warn("{path}:{line}: not address:hash, ignored", path=str(self.path), line=n)
        self._users = users
        self._folded = self._fold(users)
        if key is not None:
            self.log.info("loaded {count} users from {path}", count=len(users), path=str(self.path))
        self._key = key
        self._loaded = True
        return self._users

    def _fold(self, users: dict[str, str]) -> dict[str, str]:
        folded: dict[str, str] = {}
        for address in users:
            key = lookup_key(address)
            if key in folded:
                self.log.warn(
                    "{path}: {address} and {other} differ only in case; "
                    "logins and mail for either go to {other}",
                    path=str(self.path),
                    address=address,
                    other=folded[key],
                )
                continue
            folded[key] = address
        return folded

    def lookup(self, address: str) -> str | None:
        """
        The stored spelling of C{address} (local part matched in any case), or
        None. L{PasswordFileError} if the file cannot be read.
        """
        try:
            key = lookup_key(address)
        except ValueError:
            return None
        self._current()
        return self._folded.get(key)

    def has_user(self, address: str) -> bool:
        """Whether C{address} is a known user (local part in any case); see L{lookup}."""
        return self.lookup(address) is not None

    def users(self) -> list[str]:
        """All addresses, sorted."""
        return sorted(self._current())

    def verify(self, address: str, password: str | bytes) -> defer.Deferred:
        """
        Fire with whether C{password} is C{address}'s. An unknown user costs
        the same as a wrong password: the password is checked against a dummy
        hash made with the same parameters. Fails with L{PasswordFileError} if
        the file cannot be read.
        """
        try:
            canonical = self.lookup(address)
        except PasswordFileError:
            return defer.fail()
        stored = None if canonical is None else self._users.get(canonical)
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
    def _lock(self) -> Iterator[str]:
        """Hold the lock beside the file; yield the file's text (empty if there is none)."""
        make_dirs(self.path.parent)
        lock_path = self.path.with_name(self.path.name + ".lock")
        # Never through a symlink or a second name: the folder may be the
        # server's account's, and this may run as root (which then must not
        # open, let alone chown, a file the account pointed it to).
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(lock_path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            try:
                fd = os.open(lock_path, flags)
            except OSError as e:
                raise PasswordFileError(f"{lock_path}: cannot open the lock: {e}")
            created = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise PasswordFileError(f"{lock_path}: not a plain file; remove it")
            if created and os.geteuid() == 0:  # run as root: the lock stays the server's
                owner = os.stat(self.path.parent)
                os.fchown(fd, owner.st_uid, owner.st_gid)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = ""
            except (OSError, UnicodeDecodeError) as e:
                raise PasswordFileError(f"{self.path}: cannot read: {e}")
            yield text
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        """Hold the lock beside the file while reading, changing and writing the user table."""
        with self._lock() as text:
            # Lines an older version told apart and that now are one user:
            # rewriting would keep one hash for both; the admin decides.
            collisions = find_collisions(passwd_entries(text))
            if collisions:
                raise PasswordFileError(f"{self.path}: {collisions[0]}")
            lines = text.splitlines()
            users, _ = parse_lines(text)
            before = dict(users)
            yield users
            if users != before:
                self._write(_render(lines, before, users))

    def _write(self, text: str) -> None:
        """Replace the file atomically: temp file (0600), fsync, rename, fsync folder."""
        write_atomic(self.path, text.encode("utf-8"), 0o600, keep_owner=True)

    def add_user(self, address: str, password: str) -> str:
        """
        Add a user (blocking); return the normalized address. KeyError (with
        the stored spelling) if the user exists, in whatever case.
        """
        address = check_address(address)
        hashed = self.hash_password(password)
        with self._locked() as users:
            existing = _find(users, address)
            if existing is not None:
                raise KeyError(existing)
            users[address] = hashed
        return address

    def set_password(self, address: str, password: str) -> str:
        """Change a user's password (blocking); return the stored spelling. KeyError if unknown."""
        address = check_address(address)
        hashed = self.hash_password(password)
        with self._locked() as users:
            stored = _find(users, address)
            if stored is None:
                raise KeyError(address)
            users[stored] = hashed
        return stored

    def delete_user(self, address: str) -> str:
        """Remove a user (blocking); return the stored spelling. KeyError if unknown."""
        address = normalize_user(address)
        with self._locked() as users:
            stored = _find(users, address)
            if stored is None:
                raise KeyError(address)
            del users[stored]
        return stored


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
