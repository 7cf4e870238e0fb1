"""
The in-memory state of a folder, shared by every session on it in this
process: what it holds (a L{Snapshot}: parallel arrays in UID order), the
read-only handle sessions read through (L{FileHandle}), and the serial queue
that orders the folder's disk work (L{SerialQueue}).

Sessions read through a L{FileHandle} per file layout; an in-place rewrite
(L{mailsrv.store.mbox.inplace}) relocates the old layout's handle instead of
waiting for its readers (see L{rewrite.Relocation}): a session with a stale
snapshot, or a message being streamed, keeps reading the right bytes while and
after they move; bytes of expunged messages read as gone (KeyError), except
for messages being streamed, whose rest is copied aside first.
"""

from __future__ import annotations

import os
import threading
import weakref
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailsrv.groupcommit import GroupCommit
from mailsrv.interfaces import MessageInfo
from mailsrv.store import rewrite
from mailsrv.store.index import FolderIndex, index_base
from mailsrv.store.infos import InfoList
from mailsrv.store.names import folder_path, split_user


class FileHandle:
    """
    A read-only fd on one mbox inode, as laid out when a snapshot was taken;
    closed when the last reader lets go. After an in-place rewrite of the file
    (L{mailsrv.store.rewrite}) its reads follow the bytes to their new place
    (C{relocation}); C{readers} are the messages being streamed from this inode
    (shared by the handles of all its layouts).
    """

    __slots__ = ("fd", "ino", "lock", "relocation", "readers", "__weakref__")

    def __init__(self, path: Path, readers: weakref.WeakSet | None = None) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.ino = os.fstat(self.fd).st_ino
        self.lock = threading.Lock()
        self.relocation: rewrite.Relocation | None = None
        self.readers: weakref.WeakSet = weakref.WeakSet() if readers is None else readers

    def pread(self, n: int, off: int) -> bytes:
        """Up to C{n} bytes at C{off} in this layout (fewer at the end of the file)."""
        parts = []
        while n > 0:
            nxt = None
            with self.lock:
                rel = self.relocation
                if rel is None or off + n <= rel.first:
                    parts.append(os.pread(self.fd, n, off))
                    break
                if rel.broken:
                    raise rewrite.MessageGone(off)
                if off < rel.first:
                    piece = rel.first - off
                    data = os.pread(self.fd, piece, off)
                else:
                    i = rel.run_at(off)
                    if i < 0:
                        raise rewrite.MessageGone(off)
                    piece = min(n, rel.ends[i] - off)
                    if rel.up:  # moved from the frontier on
                        if off < rel.frontier:
                            piece = min(piece, rel.frontier - off)
                    elif off < rel.frontier:  # moved below the frontier
                        piece = min(piece, rel.frontier - off)
                    if rel.moved(off):
                        nxt = rel.next, off - (rel.srcs[i] - rel.dsts[i])
                    else:  # not moved yet: still in place
                        data = os.pread(self.fd, piece, off)
            if nxt is not None:
                data = nxt[0].pread(piece, nxt[1])
            parts.append(data)
            if len(data) < piece:
                break
            off += piece
            n -= piece
        return b"".join(parts)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


@dataclass
class Snapshot:
    """What a folder holds, as parallel arrays in file (= UID) order."""

    from_offs: array
    starts: array
    ends: array
    crcs: array
    fps: array
    infos: InfoList  # UIDs, sizes, dates, flags, modseqs
    handle: FileHandle | None
    rds: array = field(default_factory=lambda: array("b"))  # 1: mboxrd-quoted (ours), 0: mboxo
    # The flags the file's Status:/X-Status: said when last read (None: not known)
    dflags: list = field(default_factory=list)

    @property
    def uids(self) -> array:
        """The UIDs (the InfoList's array: grows with C{infos.append})."""
        return self.infos.uids

    @classmethod
    def empty(cls, handle: FileHandle | None = None) -> Snapshot:
        return cls(array("q"), array("q"), array("q"), array("q"), array("q"), InfoList(), handle)

    def find(self, uid: int) -> int:
        i = bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i
        raise KeyError(uid)


@dataclass
class Update:
    """What a disk job found; installed on the reactor thread."""

    snap: Snapshot
    uid_validity: int
    uid_next: int
    changed: bool
    append_only: bool = False
    result: Any = None
    size: int = -1  # file size the snapshot covers
    highest_modseq: int = 0  # the index's HIGHESTMODSEQ (0: not read, keep what is known)


class SerialQueue:
    """Runs jobs (functions returning Deferreds) one after another: a folder's disk work, in order."""

    def __init__(self) -> None:
        self._tail: defer.Deferred = defer.succeed(None)
        self.pending = 0

    def run(self, fn: Callable[[], Any]) -> defer.Deferred:
        self.pending += 1
        out: defer.Deferred = defer.Deferred()

        def start(_):
            inner = defer.maybeDeferred(fn)

            def finish(r):
                self.pending -= 1
                if isinstance(r, Failure):
                    out.errback(r)
                else:
                    out.callback(r)
                return None

            return inner.addBoth(finish)

        self._tail.addCallback(start)
        return out


@dataclass
class StoreConfig:
    """What every part of one store shares: where its files are, how long it waits for a lock."""

    mail_dir: Path
    index_dir: Path
    lock_timeout: float
    new_validity: Callable[[], int]  # a fresh UIDVALIDITY (disk threads)


class FolderState:
    """One folder, shared by every session on it in this process."""

    def __init__(self, config: StoreConfig, user: str, name: str) -> None:
        local, domain = split_user(user)
        self.user = user
        self.name = name
        self.config = config
        self.path = folder_path(config.mail_dir, user, name)
        self.index_base = index_base(config.index_dir, domain, local, name)
        self.journal = Path(str(self.index_base) + ".journal")
        self.queue = SerialQueue()
        self.index: FolderIndex | None = None  # used on the disk threads only
        self.reload = False  # disk threads: the index changed under C{snap} (a recovered rewrite)
        self.dirty: set[int] = set()  # UIDs whose flags sessions changed, not yet in the file
        self.snap: Snapshot | None = None
        self.uid_validity = 0
        self.uid_next = 1
        self.highest_modseq = 1  # RFC 7162 HIGHESTMODSEQ as the index last said (reactor)
        self.listeners: list[Callable[[], None]] = []
        self.sessions = 0
        self.version = 0
        self.mutation_version = 0  # last change other than an append
        self._recent = (0, 0)  # (UIDVALIDITY, the index's recent_uid) as last read here
        self.deliveries: GroupCommit | None = None  # deliveries not yet written (deliver.py)
        self.detached = False
        self.announced_size = -1  # listeners were told of our appends up to here
        self.poller: task.LoopingCall | None = None  # looks for other programs' changes

    @property
    def lock_timeout(self) -> float:
        return self.config.lock_timeout

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.name)

    def busy(self) -> bool:
        """Sessions are open on it, or work for it is queued or waiting to be."""
        return bool(
            self.sessions
            or self.queue.pending
            or (self.deliveries is not None and self.deliveries.waiting)
        )

    @property
    def recent_uid(self) -> int:
        """
        A lower bound of the index's recent_uid (it only grows), as last read or
        claimed here; 0 if not known under the folder's UIDVALIDITY (reactor thread).
        """
        validity, uid = self._recent
        return uid if validity == self.uid_validity else 0

    def saw_recent_uid(self, uid: int) -> None:
        """The index's recent_uid was read or claimed as C{uid} (reactor thread)."""
        self._recent = (self.uid_validity, max(self.recent_uid, uid))

    def open_index(self) -> FolderIndex:
        """The folder's index, opened on first use (disk threads)."""
        if self.index is None:
            self.index = FolderIndex(self.index_base, self.config.new_validity)
        return self.index

    def close_index(self) -> None:
        """Let go of the index (disk threads)."""
        if self.index is not None:
            self.index.close()
            self.index = None


# -- snapshot helpers


def last_from(snap: Snapshot) -> tuple[int, int, int]:
    """The last message's From line: its offset, the content start after it, its crc."""
    return snap.from_offs[-1], snap.starts[-1], snap.crcs[-1]


def copy_snapshot(snap: Snapshot, handle: FileHandle | None) -> Snapshot:
    """A copy of C{snap} that can grow apart from it, reading through C{handle}."""
    return Snapshot(
        array("q", snap.from_offs),
        array("q", snap.starts),
        array("q", snap.ends),
        array("q", snap.crcs),
        array("q", snap.fps),
        snap.infos.copy(),
        handle,
        array("b", snap.rds),
        list(snap.dflags),
    )


def append_row(snap: Snapshot, row: tuple, flags: frozenset[str]) -> None:
    """Add the message of an index row (L{mailsrv.store.index}) to C{snap}, with C{flags}."""
    uid, from_off, start, stop, size, _, date, crc, fp, rd, dflags, modseq = row
    snap.rds.append(rd)
    snap.dflags.append(None if dflags is None else frozenset(dflags.split()))
    snap.from_offs.append(from_off)
    snap.starts.append(start)
    snap.ends.append(stop)
    snap.crcs.append(crc)
    snap.fps.append(fp)
    snap.infos.append(MessageInfo(uid, size, frozenset(flags), date, modseq))
