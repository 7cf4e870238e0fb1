"""
The start-up upgrade of user names on disk: each user's folders moved from
the name an older mailsrv gave them to the one it has now.

Before international addresses (RFC 6531), a user's name was the password
file's address with its domain lower-cased (L{old_split}), and it named the
user's folders: ``data_dir/mail/bücher.example/anna/``. Now the domain is
lower-case A-labels and a UTF-8 local part is in Unicode NFC
(L{mailsrv.store.names.split_user}): ``data_dir/mail/xn--bcher-kva.example/anna/``.
At start-up, before the store opens anything and before a listener accepts,
L{upgrade_user_names} moves every folder and file named by a user's old
name (L{user_paths}) to the new one, by C{os.rename} within the data folder
(atomic; both parents fsynced), one log line per move. It never merges:
where both names exist it moves nothing of that user, logs an error naming
both paths and how to settle it, and the server keeps using the new one.
Once a user's old names are gone, their password-file line is rewritten
with the new spelling (L{PasswordFile.respell}), so that the file says what
the server uses and an older version would find the moved folders.

Two lines that were two users and are now one (``anna@bücher.example`` and
``anna@xn--bcher-kva.example``; ``jose\\u0301@…`` and ``josé@…``) are
refused (L{SpellingCollision}) before anything is moved: the server would
give one user the other's mail. The password file's own writer refuses such
a file too (one hash would be kept for both): the admin edits it by hand.

Everything here runs once, before the reactor: it is blocking disk work.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.logger import Logger

from mailsrv.atomic import fsync_dir, make_dirs
from mailsrv.store.names import split_user

if TYPE_CHECKING:  # the password file checks its lines with this module
    from mailsrv.auth.passwd import PasswordFile

log = Logger()


def old_split(address: str) -> tuple[str, str] | None:
    """
    C{address} split as mailsrv did before international addresses (the
    domain lower-cased, nothing else changed), or None where that version
    refused it (and so kept no folders for it).
    """
    local, _, domain = address.rpartition("@")
    domain = domain.lower().rstrip(".")
    if (
        not local
        or not domain
        or local in (".", "..")
        or local.startswith(".")
        or any(c in local for c in "/\\\x00")
        or any(ord(c) < 32 or ord(c) == 127 for c in local + domain)
        or any(c in domain for c in "/\\@")
        or domain.startswith(".")
    ):
        return None
    return local, domain


def user_paths(data_dir: Path, local: str, domain: str) -> list[Path]:
    """
    Everything in C{data_dir} named by a user: the mail folders
    (L{mailsrv.store.names.user_dir}), their indexes
    (L{mailsrv.store.index.index_base}), the IMAP subscriptions and their lock
    (L{mailsrv.imap.account.subscriptions_path}).
    """
    subscriptions = data_dir / "imap" / domain / f"{local}.subscriptions"
    return [
        data_dir / "mail" / domain / local,
        data_dir / "index" / domain / local,
        subscriptions,
        subscriptions.with_name(subscriptions.name + ".lock"),
    ]


@dataclass(frozen=True)
class Entry:
    """One user line of the password file: its number and its address as written."""

    line: int
    address: str


class SpellingCollision(Exception):
    """Password-file lines that were different users and now name one user."""

    def __init__(self, user: str, entries: list[Entry]) -> None:
        super().__init__(user, entries)
        self.user = user
        self.entries = entries

    def __str__(self) -> str:
        lines = " and ".join(f"line {e.line} ({e.address})" for e in self.entries)
        return (
            f"{lines} now name one user, {self.user} (domains are compared as IDNA "
            "A-labels, UTF-8 local parts in Unicode NFC), and would share one mailbox: "
            "give all but one of them another address, or delete their lines, and "
            "move their folders by hand"
        )


def passwd_entries(text: str) -> list[Entry]:
    """The user lines of password-file text, as L{mailsrv.auth.passwd.parse_lines} reads them."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        fields = s.split(":")
        if s and not s.startswith("#") and len(fields) >= 2 and fields[1]:
            out.append(Entry(n, fields[0]))
    return out


def find_collisions(entries: Iterable[Entry]) -> list[SpellingCollision]:
    """
    Lines that name one user now (the same login: NFC local part in any
    case, A-label domain; L{mailsrv.auth.passwd.lookup_key}) but were
    different users before: what the older version told apart. Lines that
    were one user already (the same address twice, or in another case) are
    the password file's own business, as they always were.
    """
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        try:
            local, domain = split_user(e.address)
        except ValueError:
            continue
        key = f"{local.lower()}@{domain}"
        groups.setdefault(key, []).append(e)
    found = []
    for group in groups.values():
        before = {_old_key(e.address) for e in group}
        if len(before) > 1:
            found.append(SpellingCollision(_new_name(group[0].address), group))
    return found


def _old_key(address: str) -> str:
    old = old_split(address)
    return address if old is None else f"{old[0].lower()}@{old[1]}"


def _new_name(address: str) -> str:
    local, domain = split_user(address)
    return f"{local}@{domain}"


def upgrade_user_names(data_dir: Path, passwords: PasswordFile) -> None:
    """
    Move every user's folders from their old name to their new one, then
    rewrite the password file's old spellings (see the module docstring).
    L{SpellingCollision} (the first found) if two lines are now one user:
    nothing is moved then.
    """
    try:
        text = passwords.path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as problem:
        log.error(
            "cannot read {path} to upgrade user names: {error}",
            path=str(passwords.path),
            error=str(problem),
        )
        return
    entries = passwd_entries(text)
    collisions = find_collisions(entries)
    if collisions:
        raise collisions[0]
    respell: dict[str, str] = {}
    for e in entries:
        old = old_split(e.address)
        if old is None:
            continue
        try:
            new = split_user(e.address)
        except ValueError as error:
            _unusable(data_dir, passwords.path, e, old, error)
            continue
        if new == old:
            continue
        if _move_user(data_dir, _new_name(e.address), old, new):
            respell[e.address] = _new_name(e.address)
    if respell:
        changed = passwords.respell(respell)
        log.info(
            "{path}: wrote {count} addresses in their new form (lines {lines})",
            path=str(passwords.path),
            count=len(changed),
            lines=", ".join(map(str, changed)),
        )


def _unusable(
    data_dir: Path, path: Path, e: Entry, old: tuple[str, str], error: ValueError
) -> None:
    kept = [p for p in user_paths(data_dir, *old) if os.path.lexists(p)]
    log.error(
        "{path}:{line}: {address} is no longer a usable address ({error}); "
        "that user cannot log in or get mail, and their folders stay where they are: {kept}",
        path=str(path),
        line=e.line,
        address=e.address,
        error=str(error),
        kept=", ".join(map(str, kept)) or "none",
    )


def _move_user(data_dir: Path, user: str, old: tuple[str, str], new: tuple[str, str]) -> bool:
    """
    Move C{user}'s paths from C{old} (local, domain) to C{new}; whether no old
    one is left. Where an old and a new one both exist nothing of the user is
    moved (a mailbox and its index go together, or not at all).
    """
    pairs = list(zip(user_paths(data_dir, *old), user_paths(data_dir, *new), strict=True))
    lock = pairs.pop()  # the subscriptions' lock file: a lock, not data
    both = [(o, n) for o, n in pairs if os.path.lexists(o) and os.path.lexists(n)]
    for o, n in both:
        q_old, q_new = shlex.quote(str(o)), shlex.quote(str(n))
        log.error(
            "both {old} and {new} exist for {user}: not merged, the server uses {new}. "
            "Stop mailsrv and keep one: `rm -r -- {q_old}` drops the old one; "
            "`mv -- {q_new} {q_new}.aside && mv -- {q_old} {q_new}` serves it instead",
            old=str(o),
            new=str(n),
            user=user,
            q_old=q_old,
            q_new=q_new,
        )
    if both:
        return False
    for o, n in pairs:
        if os.path.lexists(o):
            _rename(o, n, user)
    o, n = lock
    if os.path.lexists(o):
        if os.path.lexists(n):
            os.unlink(o)
        else:
            os.rename(o, n)
    for o, _ in pairs:
        if old[1] != new[1]:
            try:
                o.parent.rmdir()  # the old domain's folder, once empty
            except OSError:
                pass
    return True


def _rename(old: Path, new: Path, user: str) -> None:
    """Rename C{old} to C{new} (same file system), its new parent made as the old one is owned."""
    parent = new.parent
    if not parent.is_dir():
        make_dirs(parent)
        if os.geteuid() == 0:  # a root start-up makes folders the server, later, must enter
            st = os.stat(old.parent)
            os.chown(parent, st.st_uid, st.st_gid)
    os.rename(old, new)
    fsync_dir(parent)
    if old.parent != parent:
        fsync_dir(old.parent)
    log.info("moved {old} to {new} for {user}", old=str(old), new=str(new), user=user)
