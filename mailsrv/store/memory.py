"""
An in-memory twin of the mbox store, for tests of the protocols: the same
L{IMailStore}/L{IFolder} contract, no disk.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from twisted.internet import defer
from zope.interface import implementer

from mailsrv.interfaces import (
    FOLDER_CREATED,
    FOLDER_DELETED,
    FOLDER_MESSAGES,
    FOLDER_RENAMED,
    FlagResult,
    FolderChanges,
    FolderError,
    FolderEvent,
    IFolder,
    IMailStore,
    MessageInfo,
    NotSelectable,
)
from mailsrv.store.names import DELIMITER, INBOX, canonical_folder, normalize_user
from mailsrv.store.userfeed import UserFeed


@dataclass
class _Message:
    info: MessageInfo
    data: bytes  # LF line ends


@dataclass
class _FolderState:
    uid_validity: int
    uid_next: int = 1
    messages: list[_Message] = field(default_factory=list)
    listeners: list[Callable[[], None]] = field(default_factory=list)
    generation: int = 0
    recent_uid: int = 1  # the first UID no session has been given as \Recent
    highest_modseq: int = 1  # RFC 7162 3.1.1 HIGHESTMODSEQ
    vanished: list[tuple[int, int]] = field(default_factory=list)  # (uid, modseq) expunged
    vanished_floor: int = 1  # "expunged since" is complete from this modseq on
    vanished_limit: int = 100_000
    owner: tuple[str, str] | None = None  # (user, name) while the folder exists
    feed: UserFeed | None = None  # the store's user feed, told of changes

    def next_modseq(self) -> int:
        """Take the next modseq (RFC 7162 3.1: it only grows)."""
        self.highest_modseq += 1
        return self.highest_modseq

    def expunged(self, uids: list[int]) -> None:
        """Keep expunged C{uids} with a new modseq; drop the oldest beyond the limit."""
        if not uids:
            return
        modseq = self.next_modseq()
        self.vanished.extend((u, modseq) for u in uids)
        cut = len(self.vanished) - self.vanished_limit
        if cut > 0:
            self.vanished_floor = max(self.vanished_floor, self.vanished[cut - 1][1])
            del self.vanished[:cut]

    def notify(self) -> None:
        self.generation += 1
        for cb in list(self.listeners):
            cb()
        if self.feed is not None and self.owner is not None:
            self.feed.tell(self.owner[0], FolderEvent(FOLDER_MESSAGES, self.owner[1]))


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _read_source(source) -> bytes:
    with source.open() as f:
        return f.read()


@implementer(IMailStore)
class MemoryMailStore:
    """All folders in a dict; UIDVALIDITY from a counter."""

    mail_folders_hold_folders = True

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._folders: dict[tuple[str, str], _FolderState] = {}
        self._holders: set[tuple[str, str]] = set()  # created to hold folders only
        self._validity = int(clock())
        self.user_feed = UserFeed()  # IMailStore.add_user_listener

    def _state(self, user: str, name: str, create: bool = False) -> _FolderState:
        user = normalize_user(user)
        name = canonical_folder(name)
        key = (user, name)
        if key not in self._folders:
            if not create and key in self._holders:
                raise NotSelectable()
            if not (create or name == INBOX):
                raise FolderError("No such folder")
            self._validity += 1
            self._folders[key] = _FolderState(
                uid_validity=self._validity, owner=key, feed=self.user_feed
            )
        return self._folders[key]

    def _add(self, state: _FolderState, data: bytes, flags: frozenset[str], date: float) -> int:
        uid = state.uid_next
        state.uid_next += 1
        size = len(_crlf(data))
        info = MessageInfo(uid, size, frozenset(flags), date, state.next_modseq())
        state.messages.append(_Message(info, data))
        state.notify()
        return uid

    def deliver(self, user, source, sender, folder=INBOX):
        try:
            state = self._state(user, folder)
            self._add(state, _read_source(source), frozenset(), self._clock())
        except Exception:
            return defer.fail()
        return defer.succeed(None)

    def list_folders(self, user):
        user = normalize_user(user)
        self._state(user, INBOX)
        names = {n for (u, n) in self._folders if u == user}
        parents = {n for (u, n) in self._holders if u == user}
        for n in names | parents:
            parts = n.split(DELIMITER)
            for i in range(1, len(parts)):
                parents.add(DELIMITER.join(parts[:i]))
        out = [(n, True) for n in names] + [(p, False) for p in parents - names]
        return defer.succeed(sorted(out))

    def create_folder(self, user, name):
        try:
            user = normalize_user(user)
            holder = isinstance(name, str) and name.endswith(DELIMITER)
            name = canonical_folder(name[:-1] if holder else name)
            if name.startswith(INBOX + DELIMITER):
                raise FolderError("INBOX cannot have sub-folders")
            if (user, name) in self._folders or (user, name) in self._holders or name == INBOX:
                raise FolderError("Folder already exists")
            self._hold_superiors(user, name)
            if holder:
                self._holders.add((user, name))
            else:
                self._state(user, name, create=True)
        except Exception:
            return defer.fail()
        self.user_feed.tell(user, FolderEvent(FOLDER_CREATED, name))
        return defer.succeed(None)

    def delete_folder(self, user, name):
        try:
            user = normalize_user(user)
            name = canonical_folder(name)
            if name == INBOX:
                raise FolderError("INBOX cannot be deleted")
            if (user, name) in self._holders and (user, name) not in self._folders:
                if any(u == user and n.startswith(name + DELIMITER) for u, n in self._names()):
                    raise FolderError("Mailbox has children, delete them first")
                self._holders.discard((user, name))
                self.user_feed.tell(user, FolderEvent(FOLDER_DELETED, name))
                return defer.succeed(None)
            state = self._folders.pop((user, name), None)
            if state is None:
                raise FolderError("No such folder")
            state.messages.clear()
            state.owner = None
            state.notify()
        except Exception:
            return defer.fail()
        self.user_feed.tell(user, FolderEvent(FOLDER_DELETED, name))
        return defer.succeed(None)

    def rename_folder(self, user, old, new):
        try:
            user = normalize_user(user)
            old, new = canonical_folder(old), canonical_folder(new)
            if (user, new) in self._folders or (user, new) in self._holders:
                raise FolderError("Target folder exists")
            if old == INBOX:
                src = self._state(user, INBOX)
                dst = self._state(user, new, create=True)
                self.user_feed.tell(user, FolderEvent(FOLDER_CREATED, new))
                for m in src.messages:
                    self._add(dst, m.data, m.info.flags, m.info.internal_date)
                src.expunged([m.info.uid for m in src.messages])
                src.messages.clear()
                src.notify()
            else:
                self._hold_superiors(user, new)
                moved = [
                    k
                    for k in self._names()
                    if k[0] == user and (k[1] == old or k[1].startswith(old + DELIMITER))
                ]
                if not moved:
                    raise FolderError("No such folder")
                for k in sorted(moved):
                    to = (user, new + k[1][len(old) :])
                    if k in self._folders:
                        self._folders[to] = self._folders.pop(k)
                        self._folders[to].owner = to
                    if k in self._holders:
                        self._holders.discard(k)
                        self._holders.add(to)
                    # RFC 5465 5.4: each name renamed, the children too
                    self.user_feed.tell(user, FolderEvent(FOLDER_RENAMED, to[1], k[1]))
        except Exception:
            return defer.fail()
        return defer.succeed(None)

    def _names(self) -> set[tuple[str, str]]:
        return set(self._folders) | self._holders

    def _hold_superiors(self, user: str, name: str) -> None:
        """The names above a folder hold folders until deleted, as the mbox store's directories."""
        parts = name.split(DELIMITER)
        for i in range(1, len(parts)):
            self._holders.add((user, DELIMITER.join(parts[:i])))

    def open_folder(self, user, name, read_only=False):
        try:
            user = normalize_user(user)
            name = canonical_folder(name)
            state = self._state(user, name)
        except Exception:
            return defer.fail()
        return defer.succeed(MemoryFolder(self, state, user, name, read_only))

    def folder_status(self, user, name):
        try:
            state = self._state(user, name)
        except Exception:
            return defer.fail()
        return defer.succeed(
            {
                "messages": len(state.messages),
                "uid_next": state.uid_next,
                "uid_validity": state.uid_validity,
                "unseen": sum(1 for m in state.messages if "\\Seen" not in m.info.flags),
                "deleted": sum(1 for m in state.messages if "\\Deleted" in m.info.flags),
                "size": sum(m.info.size for m in state.messages),
                "recent": sum(1 for m in state.messages if m.info.uid >= state.recent_uid),
                "highest_modseq": state.highest_modseq,
            }
        )

    def add_user_listener(self, user, callback):
        self.user_feed.add(user, callback)

    def remove_user_listener(self, user, callback):
        self.user_feed.remove(user, callback)

    def recover_pending(self):
        return defer.succeed(0)  # nothing survives a crash in memory

    def write_back(self, timeout):
        return defer.succeed(None)  # nothing to write


@implementer(IFolder)
class MemoryFolder:
    """A session's view of one in-memory folder."""

    def __init__(self, store, state, user, name, read_only):
        self._store = store
        self._state = state
        self.user = user
        self.name = name
        self.read_only = read_only
        self._view: list[MessageInfo] = [m.info for m in state.messages]
        self._listeners: list[Callable[[], None]] = []

    @property
    def uid_validity(self):
        return self._state.uid_validity

    @property
    def uid_next(self):
        return self._state.uid_next

    @property
    def highest_modseq(self):
        return self._state.highest_modseq

    def messages(self):
        return list(self._view)

    def refresh(self):
        current = {m.info.uid: m.info for m in self._state.messages}
        old = {i.uid: i for i in self._view}
        expunged = tuple(u for u in old if u not in current)
        added = tuple(i for u, i in current.items() if u not in old)
        flags = tuple(i for u, i in current.items() if u in old and old[u] != i)
        self._view = [m.info for m in self._state.messages]
        return defer.succeed(FolderChanges(added=added, expunged=expunged, flags=flags))

    def _find(self, uid) -> _Message:
        for m in self._state.messages:
            if m.info.uid == uid:
                return m
        raise KeyError(uid)

    def open_message(self, uid):
        return io.BytesIO(_crlf(self._find(uid).data))

    def read_headers(self, uid):
        data = _crlf(self._find(uid).data)
        end = data.find(b"\r\n\r\n")
        return data if end < 0 else data[: end + 4]

    def set_flags(self, changes):
        if self.read_only:
            return defer.fail(FolderError("Folder is read-only"))
        self._change({int(u): lambda old, f=frozenset(f): f for u, f in changes.items()}, None)
        return defer.succeed(None)

    def change_flags(
        self, uids, add=frozenset(), remove=frozenset(), unchanged_since=None, replace=False
    ):
        if self.read_only:
            return defer.fail(FolderError("Folder is read-only"))
        add, remove = frozenset(add), frozenset(remove)

        def new(old: frozenset[str]) -> frozenset[str]:
            return add if replace else (old | add) - remove

        return defer.succeed(self._change({int(u): new for u in uids}, unchanged_since))

    def _change(self, how: dict, unchanged_since: int | None) -> FlagResult:
        """Give each message of C{how} (UID -> function of its flags) new flags, at one modseq."""
        state = self._state
        now = FlagResult()
        failed, changed = set(), []
        for m in state.messages:
            uid = m.info.uid
            if uid not in how:
                continue
            now.modseqs[uid] = m.info.modseq
            if unchanged_since is not None and m.info.modseq > unchanged_since:
                now[uid] = m.info.flags
                failed.add(uid)
                continue
            now[uid] = how[uid](m.info.flags)
            if now[uid] != m.info.flags:
                changed.append(m)
        if changed:
            modseq = state.next_modseq()
            for m in changed:
                m.info = replace(m.info, flags=now[m.info.uid], modseq=modseq)
                now.modseqs[m.info.uid] = modseq
        now.changed = frozenset(m.info.uid for m in changed)
        now.failed = frozenset(failed)
        current = {m.info.uid: m.info for m in changed}
        self._view = [current.get(i.uid, i) for i in self._view]
        if changed:
            state.notify()
        return now

    def changed_since(self, modseq):
        return defer.succeed(
            [
                (m.info.uid, m.info.modseq, m.info.flags)
                for m in self._state.messages
                if m.info.modseq > modseq
            ]
        )

    def vanished_since(self, modseq):
        state = self._state
        if modseq < state.vanished_floor:
            return defer.succeed(None)
        return defer.succeed(sorted(u for u, m in state.vanished if m > modseq))

    def claim_recent(self):
        state = self._state
        upto = self._view[-1].uid + 1 if self._view else 0
        first = state.recent_uid
        if not self.read_only:
            state.recent_uid = max(first, upto)
        return defer.succeed((first, upto))

    def append(self, source, flags=frozenset(), internal_date=None):
        date = self._store._clock() if internal_date is None else internal_date
        return defer.succeed(
            self._store._add(self._state, _read_source(source), frozenset(flags), date)
        )

    def append_many(self, items):
        now = self._store._clock()
        try:
            read = [
                (_read_source(src), frozenset(fl), now if d is None else d) for src, fl, d in items
            ]
        except Exception:
            return defer.fail()
        return defer.succeed([self._store._add(self._state, *one) for one in read])

    def expunge(self, uids):
        if self.read_only:
            return defer.fail(FolderError("Folder is read-only"))
        wanted = set(uids)
        removed = tuple(m.info.uid for m in self._state.messages if m.info.uid in wanted)
        self._state.expunged(list(removed))
        self._state.messages = [m for m in self._state.messages if m.info.uid not in wanted]
        self._view = [i for i in self._view if i.uid not in wanted]
        if removed:
            self._state.notify()
        return defer.succeed(list(removed))

    def add_listener(self, callback):
        self._listeners.append(callback)
        self._state.listeners.append(callback)

    def remove_listener(self, callback):
        if callback in self._listeners:
            self._listeners.remove(callback)
            self._state.listeners.remove(callback)

    def close(self):
        for cb in list(self._listeners):
            self.remove_listener(cb)
