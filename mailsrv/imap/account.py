"""
The IMAP avatar: Twisted's L{imap4.IAccount} over our L{IMailStore}, its
subscription list (a small file per user, written atomically), and
L{SessionMailbox}, one session's view of its selected L{IFolder}.

The server drives these with Deferreds throughout. The selected folder is
not an L{imap4.IMailbox}: Twisted's commands that would read one are all
replaced (L{mailsrv.imap.commands}), so it keeps only what they use.
"""

from __future__ import annotations

import bisect
import fcntl
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import imap4
from zope.interface import implementer

from mailsrv.atomic import make_dirs, write_atomic
from mailsrv.imap.listmatch import ListPattern
from mailsrv.interfaces import (
    SYSTEM_FLAGS,
    FolderError,
    MessageInfo,
)
from mailsrv.store.infos import InfoList, flag_sets, uids_of
from mailsrv.store.names import DELIMITER, INBOX, canonical_folder, split_user
from mailsrv.store.userfeed import UserFeed

RECENT = "\\Recent"

# RFC 6154 2: the attribute each special folder carries.
SPECIAL_USE = {
    "sent": "\\Sent",
    "drafts": "\\Drafts",
    "trash": "\\Trash",
    "junk": "\\Junk",
    "spam": "\\Junk",
    "archive": "\\Archive",
}

Runner = Callable[..., defer.Deferred]


def subscriptions_path(data_dir: Path, address: str) -> Path:
    """C{<data_dir>/imap/<domain>/<local>.subscriptions}."""
    local, domain = split_user(address)
    return data_dir / "imap" / domain / f"{local}.subscriptions"


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """A name subscribed or unsubscribed, as L{Subscriptions} tell their feed (IMAP NOTIFY)."""

    name: str
    subscribed: bool


class Subscriptions:
    """
    A user's subscribed folder names, one per line in UTF-8.

    Every session of the user has one of these, with the names as last read
    or written. A change is a read-modify-write of the file under an
    exclusive lock on a file beside it (``<local>.subscriptions.lock``), in
    the thread pool: two sessions that change the list at once both see
    their change kept, whichever saves last.

    With a C{feed} (one L{UserFeed} shared by the server's sessions), each
    change made through any session is told to the user's listeners as
    L{SubscriptionChange}s (RFC 5465 5.5); a change made to the file by
    another program is not.
    """

    def __init__(
        self, path: Path, run: Runner, feed: UserFeed | None = None, user: str = ""
    ) -> None:
        self.path = path
        self._run = run
        self._feed = feed
        self._user = user
        self.names: set[str] = set()
        self.existed = False

    def add_listener(self, callback: Callable[[SubscriptionChange], None]) -> None:
        """Call C{callback(change)} for every change to the user's subscriptions from now on."""
        if self._feed is not None:
            self._feed.add(self._user, callback)

    def remove_listener(self, callback: Callable[[SubscriptionChange], None]) -> None:
        """Stop calling C{callback}."""
        if self._feed is not None:
            self._feed.remove(self._user, callback)

    def heard(self, change: SubscriptionChange) -> None:
        """Another session changed the list: keep the names in step without reading the file."""
        if change.subscribed:
            self.names.add(change.name)
        else:
            self.names.discard(change.name)

    def load(self) -> defer.Deferred:
        """Read the names from the file (none if there is no file yet)."""

        def loaded(result: set[str] | None) -> None:
            self.existed = result is not None
            self.names = result or set()

        return self._run(_read, self.path).addCallback(loaded)

    def update(self, change: Callable[[set[str] | None], set[str]]) -> defer.Deferred:
        """
        Replace the names with C{change(names)}, C{names} as in the file now
        (None if there is no file). C{change} runs in the thread pool under the
        user's lock and may raise (L{FolderError}) to change nothing.
        """

        def done(result: tuple[set[str], set[str]]) -> set[str]:
            old, names = result
            self.existed, self.names = True, names
            if self._feed is not None and old != names:
                for name in sorted(old - names):
                    self._feed.tell(self._user, SubscriptionChange(name, False))
                for name in sorted(names - old):
                    self._feed.tell(self._user, SubscriptionChange(name, True))
            return names

        return self._run(_update, self.path, change).addCallback(done)


def _read(path: Path) -> set[str] | None:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    return {line for line in text.splitlines() if line}


def _update(path: Path, change: Callable[[set[str] | None], set[str]]) -> tuple[set[str], set[str]]:
    """
    In a thread: read, change and write the subscriptions file under the
    user's lock; return the names before and after.
    """
    make_dirs(path.parent)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = _read(path)
        new = change(None if old is None else set(old))
        before = set() if old is None else old
        if new != before:
            write_atomic(path, "".join(n + "\n" for n in sorted(new)).encode("utf-8"))
        return before, new
    finally:
        os.close(fd)  # and the lock with it


@implementer(imap4.IMailboxInfo)
class FolderInfo:
    """A LIST entry: the folder's attributes."""

    def __init__(self, flags: list[str]) -> None:
        self._flags = flags

    def getFlags(self) -> list[str]:
        return list(self._flags)

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER


@implementer(imap4.IAccount)
class Account:
    """
    One logged-in user's folders. An L{imap4.IAccount} because that is the
    avatar interface the IMAP login asks the portal for (addMailbox and
    isSubscribed are there for the interface only).
    """

    log = Logger()

    def __init__(
        self,
        address: str,
        store: Any,
        subscriptions: Subscriptions,
        special_folders: Iterable[str] = (),
        run: Runner | None = None,
    ) -> None:
        self.address = address
        self._run: Runner = run or defer.maybeDeferred
        self.store = store
        self.subscriptions = subscriptions
        self.special_folders = tuple(special_folders)
        self.logged_out = False

    def prepare(self) -> defer.Deferred:
        """At login: load subscriptions, create the special folders that are missing."""

        @defer.inlineCallbacks
        def go():
            yield self.subscriptions.load()
            existing = {n for n, _ in (yield self.store.list_folders(self.address))}
            for name in self.special_folders:
                if name not in existing:
                    try:
                        yield self.store.create_folder(self.address, name)
                    except FolderError:
                        pass
            if not self.subscriptions.existed:
                defaults = {INBOX, *self.special_folders}
                # Another session may have written the file meanwhile: it stays.
                yield self.subscriptions.update(lambda names: defaults if names is None else names)
            return self

        return go()

    def special_use(self, name: str) -> str | None:
        if name in self.special_folders:
            return SPECIAL_USE.get(name.lower())
        return None

    # IAccount, with Deferreds
    def addMailbox(self, name: str, mbox: Any = None) -> defer.Deferred:
        return self.create(name)

    def create(self, pathspec: str) -> defer.Deferred:
        """Create a folder; a trailing delimiter makes one that holds only folders (RFC 3501 6.3.3)."""
        return defer.maybeDeferred(self.store.create_folder, self.address, pathspec)

    def select(self, name: str, readwrite: int = 1) -> defer.Deferred:
        d = defer.maybeDeferred(self.store.open_folder, self.address, name, not readwrite)
        return d.addCallback(SessionMailbox)

    def delete(self, name: str) -> defer.Deferred:
        return defer.maybeDeferred(self.store.delete_folder, self.address, name)

    def rename(self, oldname: str, newname: str) -> defer.Deferred:
        try:
            old, new = canonical_folder(oldname), canonical_folder(newname)
        except FolderError:
            return defer.fail()
        d = defer.maybeDeferred(self.store.rename_folder, self.address, oldname, newname)

        def move(subs: set[str] | None) -> set[str]:
            subs = subs or set()
            moved = {n for n in subs if n == old or n.startswith(old + DELIMITER)}
            return (subs - moved) | {new + n[len(old) :] for n in moved}

        def renamed(_: Any) -> Any:
            if old == INBOX:  # its messages moved; the name INBOX stays
                return None
            return self.subscriptions.update(move)

        return d.addCallback(renamed)

    def isSubscribed(self, name: str) -> bool:
        return name in self.subscriptions.names

    def subscribe(self, name: str) -> defer.Deferred:
        try:
            name = canonical_folder(name)
        except FolderError:
            return defer.fail()
        return self.subscriptions.update(lambda names: (names or set()) | {name})

    def unsubscribe(self, name: str) -> defer.Deferred:
        try:
            name = canonical_folder(name)
        except FolderError:
            name = name

        def remove(names: set[str] | None) -> set[str]:
            if not names or name not in names:
                raise FolderError("Not subscribed")
            return names - {name}

        return self.subscriptions.update(remove)

    def listMailboxes(self, ref: str, wildcard: str) -> defer.Deferred:
        """Fire with (name, L{FolderInfo}) for every folder matching C{ref + wildcard}."""
        pattern = list_pattern(ref + wildcard)
        special = {n: use for n in self.special_folders if (use := self.special_use(n))}
        nested = bool(self.store.mail_folders_hold_folders)

        def listed(folders: list[tuple[str, bool]]) -> Any:
            # Tens of thousands of folders are work: done off the reactor thread.
            return self._run(list_entries, folders, pattern, special, nested)

        return defer.maybeDeferred(self.store.list_folders, self.address).addCallback(listed)

    def lsub_entries(self, ref: str, wildcard: str) -> defer.Deferred:
        """
        Fire with the LSUB entries (name, L{FolderInfo}) for C{ref + wildcard},
        from the subscriptions as the file has them now (other sessions of the
        user may have changed them since this one last read or wrote it).
        """
        pattern = list_pattern(ref + wildcard)

        def loaded(_: Any) -> Any:
            return self._run(lsub_entries, sorted(self.subscriptions.names), pattern)

        return self.subscriptions.load().addCallback(loaded)

    def logout(self) -> None:
        self.logged_out = True


def list_pattern(pattern: str) -> ListPattern:
    """RFC 3501 6.3.8: ``*`` matches anything, ``%`` anything but the delimiter; INBOX any case."""
    return ListPattern(pattern)


def list_entries(
    folders: Sequence[tuple[str, bool]],
    pattern: ListPattern,
    special: dict[str, str],
    nested: bool = True,
) -> list[tuple[str, FolderInfo]]:
    """
    The LIST entries of the folders (name, selectable) that match C{pattern},
    in the order given, with their attributes: \\Noselect, \\HasChildren or
    \\HasNoChildren (RFC 3348), and the special use of C{special} (RFC 6154).
    Unless C{nested} (the store lets a folder hold messages and folders), a
    selectable folder is \\NoInferiors (RFC 3501 7.2.2), and no more, as
    Dovecot shows an mbox file (RFC 3348 3: it implies \\HasNoChildren).
    No name is compared with every other: the time grows with the number
    of folders, not with its square.
    """
    parents: set[str] = set()
    for name, _ in folders:
        i = name.find(DELIMITER)
        while i >= 0:
            parents.add(name[:i])
            i = name.find(DELIMITER, i + 1)
    out = []
    for name, selectable in folders:
        if not pattern.match(name):
            continue
        if selectable and not nested and name not in parents:
            flags = ["\\NoInferiors"]
        else:
            flags = [] if selectable else ["\\Noselect"]
            flags.append("\\HasChildren" if name in parents else "\\HasNoChildren")
        use = special.get(name)
        if use:
            flags.append(use)
        out.append((name, FolderInfo(flags)))
    return out


def lsub_entries(subscribed: Sequence[str], pattern: ListPattern) -> list[tuple[str, FolderInfo]]:
    """
    The LSUB entries (RFC 3501 6.3.9) of the C{subscribed} names, whether the
    folders exist or not: each name that matches C{pattern}; for one that does
    not, its nearest superior name that does (the case of a ``%`` pattern),
    marked \\Noselect unless it is subscribed itself, as Dovecot does.
    """
    names = set(subscribed)
    out: dict[str, FolderInfo] = {}
    for name in subscribed:
        if pattern.match(name):
            out[name] = FolderInfo([])
            continue
        parent = name
        while DELIMITER in parent:
            parent = parent.rpartition(DELIMITER)[0]
            if pattern.match(parent):
                if parent not in names:
                    out.setdefault(parent, FolderInfo(["\\Noselect"]))
                break
    return sorted(out.items())


def _own_list(infos: Sequence[MessageInfo]) -> Sequence[MessageInfo]:
    """A copy of C{infos} no one else changes (an InfoList from the mbox store already is one)."""
    return infos if isinstance(infos, InfoList) else list(infos)


class SessionMailbox:
    """
    The selected folder of one session: L{IFolder} plus what the client has
    been told (its message list, in sequence order) and what is recent to it.
    """

    def __init__(self, folder: Any) -> None:
        self.folder = folder
        self.infos: Sequence[MessageInfo] = _own_list(folder.messages())
        self.uids: Sequence[int] = uids_of(self.infos)
        self.recent: set[int] = set()

    def seq_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i + 1
        return None

    def reload(self) -> None:
        self.infos = _own_list(self.folder.messages())
        self.uids = uids_of(self.infos)

    def keywords(self) -> list[str]:
        seen: set[str] = set()
        for flags in set(flag_sets(self.infos)):
            seen.update(flags)
        return sorted(seen - SYSTEM_FLAGS)

    def flags_of(self, info: MessageInfo) -> list[str]:
        flags = sorted(info.flags)
        if info.uid in self.recent:
            flags.append(RECENT)
        return flags

    def defined_flags(self) -> list[str]:
        """The flags of the FLAGS response at SELECT: the system flags and the keywords in use."""
        return sorted(SYSTEM_FLAGS) + self.keywords()

    def uid_validity(self) -> int:
        return self.folder.uid_validity  # type: ignore[no-any-return]

    def uid_next(self) -> int:
        return self.folder.uid_next  # type: ignore[no-any-return]

    def message_count(self) -> int:
        return len(self.infos)

    def recent_count(self) -> int:
        return len(self.recent)

    def is_writeable(self) -> bool:
        return not self.folder.read_only

    def close(self) -> None:
        self.folder.close()
