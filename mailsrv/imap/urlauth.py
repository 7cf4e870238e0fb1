"""
URLAUTH (RFC 4467): each user's mailbox access keys, the INTERNAL
mechanism's tokens, and who may use a URLAUTH-authorized URL.

The key table is one small file per user beside the subscriptions,
C{<data_dir>/imap/<domain>/<local>.urlauth} (mode 0600, folders 0700),
JSON: C{{"keys": {folder: {"uidvalidity": n, "key": hex}}}}. A key is 32
random octets from the system's cryptographic source (RFC 4467 2.2: at
least 128 bits, unpredictable, used for nothing else), made when the user
first generates a URL for the folder. A key belongs to the folder as it is
under one UIDVALIDITY: a folder deleted and made again under the same name
(UIDVALIDITY changes, the UIDs mean other messages) has no key, and the old
URLs are dead with it. Changes are read-modify-write under an exclusive lock
on C{<local>.urlauth.lock}, the file replaced atomically; they run in the
thread pool (the functions here block).

The INTERNAL token is HMAC-SHA1 (RFC 2104) keyed with the mailbox access
key over the rump URL octets as the client sent them, up to and including
the access identifier (RFC 4467 2.2 "iurlauth-rump"; 7: the token is
computed over the rump), written as 40 lower-case hex digits (RFC 4467
2.2: enc-urlauth = 32*HEXDIG; its examples are lower case, and so is the
mechanism name in them, C{:internal:}).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailsrv.atomic import make_dirs, write_atomic
from mailsrv.store.names import split_user

MECHANISM = "INTERNAL"  # RFC 4467 2.2: the one mechanism every server has
KEY_OCTETS = 32

# RFC 4467 2.2: the access identifiers.
ANONYMOUS = "anonymous"
AUTHUSER = "authuser"


def keys_path(data_dir: Path, address: str) -> Path:
    """C{<data_dir>/imap/<domain>/<local>.urlauth}, beside the user's subscriptions."""
    local, domain = split_user(address)
    return data_dir / "imap" / domain / f"{local}.urlauth"


def token(key: bytes, rump: str) -> str:
    """The INTERNAL mechanism's token for C{rump} (the URL up to the access identifier)."""
    return hmac.new(key, rump.encode("ascii"), hashlib.sha1).hexdigest()


def verifies(key: bytes | None, rump: str, given: str) -> bool:
    """
    Whether C{given} is C{rump}'s token under C{key}. Without a key the
    token is still computed, under a random one, and compared: a mailbox
    with no key costs the same time as one with a key (RFC 4467 7: no
    timing tells which mailbox names exist).
    """
    expected = token(key if key is not None else secrets.token_bytes(KEY_OCTETS), rump)
    return hmac.compare_digest(expected, given.lower()) and key is not None


def full_url(rump: str, key: bytes) -> str:
    """The URLAUTH-authorized URL: C{rump:internal:token} (RFC 4467 2.2, 3.1 example)."""
    return f"{rump}:{MECHANISM.lower()}:{token(key, rump)}"


def same_user(a: str, b: str) -> bool:
    """Two spellings of one user: the local part in any case (as logins match), one domain."""
    try:
        (la, da), (lb, db) = split_user(a), split_user(b)
    except ValueError:
        return a.casefold() == b.casefold()
    return la.casefold() == lb.casefold() and da == db


def permits(access: str | None, session_user: str | None) -> bool:
    """
    Whether a session logged in as C{session_user} may use a URL with this
    access identifier (RFC 4467 2.2, 3.3):

      - C{anonymous}: any session (URLFETCH is only in the authenticated
        and selected states);
      - C{authuser}: any session logged in as a user of this server (there
        is no anonymous login here, so every session that can URLFETCH);
      - C{user+x}: a session logged in as x;
      - C{submit+x}: a session of a message submission entity acting for
        x. No login here is one (there is no submit server that logs in
        to IMAP), so no session may use such a URL.
    """
    if access is None or session_user is None:
        return False
    if access in (ANONYMOUS, AUTHUSER):
        return True
    kind, _, user = access.partition("+")
    if kind == "user":
        return same_user(user, session_user)
    return False


def expired(expire: datetime | None, now: float) -> bool:
    """RFC 4467 2.2: a URL with ;EXPIRE= is valid until then (C{now}: seconds since the epoch)."""
    return expire is not None and datetime.fromtimestamp(now, UTC) > expire


class KeyTable:
    """
    One user's mailbox access keys (RFC 4467 2.2), on disk. Every method
    blocks: call it in the thread pool.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def key(self, folder: str, uid_validity: int) -> bytes | None:
        """The folder's key under this UIDVALIDITY, or None (never made, reset, or stale)."""
        found = self.entry(folder)
        return found[1] if found is not None and found[0] == uid_validity else None

    def entry(self, folder: str) -> tuple[int, bytes] | None:
        """The folder's (UIDVALIDITY, key), or None if it has none."""
        entry = self._read().get(folder)
        if not isinstance(entry, dict) or not isinstance(entry.get("uidvalidity"), int):
            return None
        try:
            return entry["uidvalidity"], bytes.fromhex(entry["key"])
        except (KeyError, TypeError, ValueError):
            return None

    def key_or_new(self, folder: str, uid_validity: int) -> bytes:
        """The folder's key, made now if it has none (GENURLAUTH, RFC 4467 3.2)."""
        found: list[bytes] = []

        def change(keys: dict[str, Any]) -> dict[str, Any]:
            entry = keys.get(folder)
            if isinstance(entry, dict) and entry.get("uidvalidity") == uid_validity:
                try:
                    found.append(bytes.fromhex(entry["key"]))
                    return keys
                except (KeyError, TypeError, ValueError):
                    pass
            new = secrets.token_bytes(KEY_OCTETS)
            found.append(new)
            return {**keys, folder: {"uidvalidity": uid_validity, "key": new.hex()}}

        self._update(change)
        return found[0]

    def reset(self, folder: str, uid_validity: int) -> None:
        """RESETKEY mailbox: a new key for the folder; its URLs so far are dead (RFC 4467 3.1)."""
        new = secrets.token_bytes(KEY_OCTETS)
        self._update(lambda keys: {**keys, folder: {"uidvalidity": uid_validity, "key": new.hex()}})

    def reset_all(self) -> None:
        """RESETKEY without arguments: every key removed, every URL the user made dead."""
        self._update(lambda keys: {})

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # unreadable: no key, so no URL verifies; the next change rewrites it
        keys = data.get("keys") if isinstance(data, dict) else None
        return keys if isinstance(keys, dict) else {}

    def _update(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        make_dirs(self.path.parent)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            old = self._read()
            new = change(old)
            if new is not old:
                write_atomic(self.path, json.dumps({"keys": new}, sort_keys=True).encode())
        finally:
            os.close(fd)  # and the lock with it
