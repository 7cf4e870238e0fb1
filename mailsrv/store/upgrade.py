"""
The start-up check of user names on disk: folders an older mailsrv named
with a spelling of the user's address that today's rules write differently.

Before international addresses (RFC 6531), a user's name was the password
file's address with its domain lower-cased (L{old_split}), and it named the
user's folders: ``data_dir/mail/bücher.example/anna/``. Now the domain is
lower-case A-labels and a UTF-8 local part is in Unicode NFC
(L{mailsrv.store.names.split_user}): ``data_dir/mail/xn--bcher-kva.example/anna/``.

Such folders are never moved by the server: a move done for the admin can
mix two users' mail (a folder left by a deleted user under the other
spelling), lose a race with a program still writing the old path, or be
cut short half way. Instead, at start-up, before the store opens anything,
L{check_user_names} finds them, from the password file and from the
folders on disk (a line may already be in the new spelling), and the server
refuses to start with the exact commands that move them (or, where both
names exist, that set one aside): serving the new name would hide the
user's mail. Folders under an old spelling that no user has any more are
only reported.

Two lines that were two users and are now one (``anna@bücher.example`` and
``anna@xn--bcher-kva.example``; ``jose\\u0301@…`` and ``josé@…``) are
refused too (L{SpellingCollision}): the server would give one user the
other's mail. The password file's own writer refuses such a file as well.

The old server took mail by SMTP for ASCII addresses only, so these cases
need a U-label domain in C{server.domains} or a non-ASCII local part, with
mail put there by IMAP APPEND or by hand: rare, and worth a stop.

Everything here runs once, before the reactor: it is blocking disk work.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailsrv.store.names import split_user

if TYPE_CHECKING:  # the password file checks its lines with this module
    from mailsrv.auth.passwd import PasswordFile


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


class OldNames(Exception):
    """Folders named with an old spelling of a user: the commands that settle them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        return (
            "folders named by an older mailsrv with another spelling of their user's "
            "address would be hidden; stop and settle them, then start again:\n  "
            + "\n  ".join(self.problems)
        )


def check_user_names(data_dir: Path, passwords: PasswordFile) -> list[str]:
    """
    Raise L{SpellingCollision} (two lines now one user) or L{OldNames} (a
    user's folders under an old spelling); return what is only reported:
    folders under an old spelling that no user has.
    """
    try:
        text = passwords.path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as problem:
        return [f"cannot read {passwords.path} to check user names: {problem}"]
    entries = passwd_entries(text)
    collisions = find_collisions(entries)
    if collisions:
        raise collisions[0]
    users: dict[tuple[str, str], str] = {}  # (lower-case local part, domain) -> address
    for e in entries:
        try:
            local, domain = split_user(e.address)
        except ValueError:
            continue
        users.setdefault((local.lower(), domain), e.address)
    problems: list[str] = []
    orphans: list[str] = []
    for old in _old_names(data_dir, entries):
        try:
            new = split_user(f"{old[0]}@{old[1]}")
        except ValueError as error:
            orphans.append(f"{data_dir / 'mail' / old[1] / old[0]}: not a usable name ({error})")
            continue
        if new == old:
            continue
        user = users.get((new[0].lower(), new[1]))
        pairs = list(zip(user_paths(data_dir, *old), user_paths(data_dir, *new), strict=True))
        pairs.pop()  # the subscriptions' lock file: a lock, not data
        for o, n in pairs:
            if not os.path.lexists(o) or (os.path.lexists(n) and _same(o, n)):
                continue
            if user is None:
                orphans.append(f"{ascii(str(o))}: no user is named so now")
                continue
            q_old, q_new = shlex.quote(str(o)), shlex.quote(str(n))
            if os.path.lexists(n):
                problems.append(
                    f"{ascii(str(o))} and {ascii(str(n))} both belong to {user}: keep one, "
                    f"e.g. `mv -- {q_new} {q_new}.aside && mv -- {q_old} {q_new}`, or "
                    f"`mv -- {q_old} {q_old}.aside`"
                )
            else:
                problems.append(
                    f"{ascii(str(o))} belongs to {user}: "
                    f"`mkdir -p -- {shlex.quote(str(n.parent))} && mv -- {q_old} {q_new}`"
                )
    if problems:
        raise OldNames(problems)
    return orphans


def _old_names(data_dir: Path, entries: list[Entry]) -> list[tuple[str, str]]:
    """Every (local, domain) an older version may have named folders with."""
    names: dict[tuple[str, str], None] = {}
    for e in entries:
        old = old_split(e.address)
        if old is not None:
            names[old] = None
    mail = data_dir / "mail"
    try:
        domains = [d for d in os.listdir(mail) if (mail / d).is_dir()]
    except OSError:
        domains = []
    for domain in domains:
        try:
            locals_ = os.listdir(mail / domain)
        except OSError:
            continue
        for local in locals_:
            if not local.isascii() or not domain.isascii():
                names[(local, domain)] = None
    return list(names)


def _same(a: Path, b: Path) -> bool:
    """Whether two names are one file (a file system that normalises names)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
