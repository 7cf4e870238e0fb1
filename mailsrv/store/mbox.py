"""
The mbox message store: one mboxrd file per folder under the mail directory,
an sqlite index per folder under the index directory (see
L{mailsrv.store.index}), dotlock + fcntl locking (L{mailsrv.store.locking}).

Disk work runs on the thread pool, ordered per folder by a serial queue.
Deliveries that arrive while a write to the same folder is in progress are
written together under one lock and one fsync (group commit); after the fsync
the same job records them in the index with their UIDs (one transaction that
does not wait for the disk: a lost one is redone by the tail scan). Changes by
other programs are found when a folder is opened or refreshed: unchanged
files are not read, grown files are scanned from the old end, rewritten files
are rescanned and their messages matched to the old index by fingerprint, so
UIDs and flags survive edits by mutt or procmail.

Expunge rewrites the file in place with a journal (L{mailsrv.store.rewrite}):
the inode never changes, so other programs' appends are never lost. Sessions
read through a L{_FileHandle} per file layout; an in-place rewrite relocates
the old layout's handle instead of waiting for its readers (see
L{rewrite.Relocation}): a session with a stale snapshot, or a message being
streamed, keeps reading the right bytes while and after they move, without
holding up the rewrite; bytes of expunged messages read as gone (KeyError),
except for messages being streamed, whose rest is copied aside first.

Flags live in the index; when the last session leaves a folder, those that
sessions changed are written into the messages' Status:/X-Status: headers
(L{store_write_flags}), the same in-place rewrite; flags another program
wrote there are taken over at the next rescan. Sessions never see those
header fields (L{mboxfmt.HIDDEN_FIELDS}), so writing them changes no size.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import threading
import time
import weakref
import zlib
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.atomic import fsync_dir, make_dirs, write_atomic
from mailsrv.interfaces import SEEN, FolderChanges, FolderError, IFolder, IMailStore, MessageInfo
from mailsrv.logsafe import SafeLogger
from mailsrv.spool import disk_full
from mailsrv.store import mboxfmt, rewrite
from mailsrv.store.index import FolderIndex, flags_text, index_base, name_of, remove_index
from mailsrv.store.infos import InfoList
from mailsrv.store.locking import DEFAULT_TIMEOUT, MboxLock
from mailsrv.store.names import (
    DELIMITER,
    INBOX,
    canonical_folder,
    folder_path,
    normalize_user,
    split_user,
    user_dir,
)

IDLE_STATES = 16  # folders kept loaded with no session open
POLL_INTERVAL = 5.0  # seconds between stat()s of a folder someone listens to (IMAP IDLE)
RESERVED_SUFFIXES = (".lock",)
SUB_FOLDERS_REFUSED = "A mailbox cannot have sub-folders here"


# -- in-memory state -----------------------------------------------------


class _FileHandle:
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
class _Snapshot:
    """What a folder holds, as parallel arrays in file (= UID) order."""

    from_offs: array
    starts: array
    ends: array
    crcs: array
    fps: array
    infos: InfoList  # UIDs, sizes, dates, flags
    handle: _FileHandle | None
    rds: array = field(default_factory=lambda: array("b"))  # 1: mboxrd-quoted (ours), 0: mboxo
    # The flags the file's Status:/X-Status: said when last read (None: not known)
    dflags: list = field(default_factory=list)

    @property
    def uids(self) -> array:
        """The UIDs (the InfoList's array: grows with C{infos.append})."""
        return self.infos.uids

    @classmethod
    def empty(cls, handle: _FileHandle | None = None) -> _Snapshot:
        return cls(array("q"), array("q"), array("q"), array("q"), array("q"), InfoList(), handle)

    def find(self, uid: int) -> int:
        i = bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i
        raise KeyError(uid)


@dataclass
class _Update:
    """What a disk job found; installed on the reactor thread."""

    snap: _Snapshot
    uid_validity: int
    uid_next: int
    changed: bool
    append_only: bool = False
    result: Any = None
    size: int = -1  # file size the snapshot covers


@dataclass
class _Indexed:
    """Rows a delivery added to the index; applied to the folder state on the reactor."""

    snap: _Snapshot | None  # the state's snapshot the rows extend (None: not loaded)
    rows: list[tuple]
    flags: list[frozenset[str]]
    uid_next: int
    handle: _FileHandle | None  # a handle for a snapshot that had none


class _SerialQueue:
    """Runs jobs (functions returning Deferreds) one after another."""

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


class _FolderState:
    """One folder, shared by every session on it in this process."""

    def __init__(self, store: MboxMailStore, user: str, name: str) -> None:
        local, domain = split_user(user)
        self.user = user
        self.name = name
        self.path = folder_path(store.mail_dir, user, name)
        self.index_base = index_base(store.index_dir, domain, local, name)
        self.journal = Path(str(self.index_base) + ".journal")
        self.queue = _SerialQueue()
        self.index: FolderIndex | None = None  # used on the disk threads only
        self.reload = False  # disk threads: the index changed under C{snap} (a recovered rewrite)
        self.dirty: set[int] = set()  # UIDs whose flags sessions changed, not yet in the file
        self.snap: _Snapshot | None = None
        self.uid_validity = 0
        self.uid_next = 1
        self.listeners: list[Callable[[], None]] = []
        self.sessions = 0
        self.version = 0
        self.mutation_version = 0  # last change other than an append
        self.pending: list[tuple[Any, str, float, defer.Deferred]] = []
        self.batch_scheduled = False
        self.detached = False
        self.announced_size = -1  # listeners were told of our appends up to here
        self.poller: task.LoopingCall | None = None  # looks for other programs' changes


# -- the store -------------------------------------------------------------


@implementer(IMailStore)
class MboxMailStore:
    """All users' folders as mbox files under C{mail_dir}, indexes under C{index_dir}."""

    log = SafeLogger()

    def __init__(
        self,
        mail_dir: Path,
        index_dir: Path,
        reactor: Any,
        threadpool: Any,
        lock_timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.mail_dir = Path(mail_dir)
        self.index_dir = Path(index_dir)
        self._reactor = reactor
        self._pool = threadpool
        self.lock_timeout = lock_timeout
        self._clock = clock
        self.poll_interval = poll_interval
        self._states: dict[tuple[str, str], _FolderState] = {}
        self._idle: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._validity_lock = threading.Lock()
        self._last_validity = 0

    # -- plumbing

    def _in_thread(self, fn, *args) -> defer.Deferred:
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def _state(self, user: str, name: str) -> _FolderState:
        user = normalize_user(user)
        name = canonical_folder(name)
        key = (user, name)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _FolderState(self, user, name)
        self._idle.pop(key, None)
        return st

    def _job(self, st: _FolderState, fn: Callable[[], Any]) -> defer.Deferred:
        """Run C{fn} (reactor thread, returns a Deferred) in the folder's queue."""
        d = st.queue.run(fn)
        d.addBoth(self._after_job, st)
        return d

    def _after_job(self, result, st: _FolderState):
        self._maybe_idle(st)
        return result

    def _maybe_idle(self, st: _FolderState) -> None:
        if st.sessions or st.queue.pending or st.pending:
            return
        key = (st.user, st.name)
        if self._states.get(key) is not st:
            return
        if (st.snap is None and st.index is None) or st.detached:
            self._drop(key)
            return
        self._idle[key] = None
        self._idle.move_to_end(key)
        while len(self._idle) > IDLE_STATES:
            old, _ = self._idle.popitem(last=False)
            self._drop(old)

    def _drop(self, key: tuple[str, str]) -> None:
        self._idle.pop(key, None)
        st = self._states.get(key)
        if st is None or st.sessions or st.queue.pending or st.pending:
            return
        del self._states[key]
        if st.index is not None:
            index, st.index = st.index, None
            st.queue.run(lambda: self._in_thread(index.close))

    # -- watching for other programs' changes while someone listens

    def _listeners_changed(self, st: _FolderState) -> None:
        """Poll a folder while it has listeners (reactor thread)."""
        if st.listeners and st.poller is None and not st.detached:
            if not IReactorTime.providedBy(self._reactor) or self.poll_interval <= 0:
                return
            st.poller = task.LoopingCall(self._poll, st)
            st.poller.clock = self._reactor
            st.poller.start(self.poll_interval, now=False)
        elif (not st.listeners or st.detached) and st.poller is not None:
            poller, st.poller = st.poller, None
            if poller.running:
                poller.stop()

    def _poll(self, st: _FolderState) -> None:
        """
        One look at a listened-to folder: a stat() compared with what the index
        covers; if another program (procmail, mutt) changed the file, the sync
        reindexes it and tells the listeners (L{_install}). Skipped while other
        work on the folder is queued (that work syncs anyway).
        """
        if st.detached:
            self._listeners_changed(st)
            return
        if st.queue.pending or st.snap is None:
            return

        def failed(f: Failure) -> None:
            if f.check(FolderError):
                self.log.info(
                    "polling {user} {folder}: {error}",
                    user=st.user,
                    folder=st.name,
                    error=str(f.value),
                )
            else:
                self.log.failure("polling {user} {folder} failed", f, user=st.user, folder=st.name)

        self._sync_job(st).addErrback(failed)

    def _notify(self, st: _FolderState) -> None:
        for cb in list(st.listeners):
            try:
                cb()
            except Exception:
                self.log.failure("folder listener failed")

    def new_validity(self) -> int:
        """
        A fresh UIDVALIDITY (disk thread): the time, but always above the last one
        handed out, which is kept in C{<index_dir>/uidvalidity} (as Dovecot does).
        """
        path = self.index_dir / "uidvalidity"
        with self._validity_lock:
            make_dirs(self.index_dir)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    last = int(os.pread(fd, 32, 0).decode("ascii").strip() or 0)
                except ValueError:
                    last = 0
                v = max(int(time.time()), last + 1, self._last_validity + 1)
                if v > 0xFFFFFFFF:  # RFC 3501 2.3.1.1: a non-zero 32-bit number
                    v = 1
                os.ftruncate(fd, 0)
                os.pwrite(fd, b"%d\n" % v, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._last_validity = v
            return v

    # -- disk side: syncing the index with the file (threads only)

    def _open_index(self, st: _FolderState) -> FolderIndex:
        if st.index is None:
            st.index = FolderIndex(st.index_base, self.new_validity)
        return st.index

    def _load(self, st: _FolderState, idx: FolderIndex) -> _Snapshot:
        """The snapshot the index describes (no file access)."""
        if st.snap is not None and not st.reload:
            return st.snap
        st.reload = False
        snap = _Snapshot.empty()
        fcache: dict[str, frozenset[str]] = {}
        infos = snap.infos
        i_uids, i_sizes, i_dates, i_flags = (
            infos.uids.append,
            infos.sizes.append,
            infos.dates.append,
            infos.flag_sets.append,
        )
        froms, starts, ends = snap.from_offs.append, snap.starts.append, snap.ends.append
        crcs, fps, rds = snap.crcs.append, snap.fps.append, snap.rds.append
        dflags = snap.dflags.append
        for uid, from_off, start, stop, size, flags, idate, crc, fp, rd, dfl in idx.rows():
            fs = fcache.get(flags)
            if fs is None:
                fs = fcache[flags] = frozenset(flags.split()) if flags else frozenset()
            i_uids(uid)
            i_sizes(size)
            i_dates(idate)
            i_flags(fs)
            froms(from_off)
            starts(start)
            ends(stop)
            crcs(crc)
            fps(fp)
            rds(rd)
            if dfl is None:
                dflags(None)
            else:
                dfs = fcache.get(dfl)
                if dfs is None:
                    dfs = fcache[dfl] = frozenset(dfl.split()) if dfl else frozenset()
                dflags(dfs)
        return snap

    def _sync(self, st: _FolderState, create: bool = False) -> _Update:
        """Bring the index up to date with the file; lock only if the file changed."""
        if st.detached:
            raise FolderError("Folder was renamed or deleted")
        create = create or st.name == INBOX
        try:
            s = os.stat(st.path)
        except FileNotFoundError:
            if not create:
                raise FolderError("No such folder")
            with self._refused("open", st.user, st.name):
                make_dirs(st.path.parent)
            s = None
        except NotADirectoryError:  # a level above is a mailbox (a file)
            raise FolderError("No such folder")
        if s is not None and not _is_file(s):
            raise FolderError("No such folder")
        idx = self._open_index(st)
        snap = self._load(st, idx)
        if (
            s is not None
            and not st.reload
            and idx.covered == _covered(s)
            and snap.handle is not None
            and snap.handle.ino == s.st_ino
        ):
            return _Update(snap, idx.uid_validity, idx.uid_next, False)
        try:
            with MboxLock(st.path, self.lock_timeout, create=create, reader=True) as lk:
                return self._sync_locked(st, lk.fd, snap)
        except FileNotFoundError:
            raise FolderError("No such folder")

    def _sync_locked(
        self,
        st: _FolderState,
        fd: int,
        snap: _Snapshot,
        new_flags: list[tuple[frozenset[str], float | None]] | None = None,
        ours: Sequence[tuple[int, int]] = (),
    ) -> _Update:
        """
        With the mbox locked: recover a broken append or rewrite, then index what
        changed. C{ours}: byte ranges we just appended (read mboxrd, L{_quoting}).
        """
        found = self._recover(st, fd)
        is_ours = _Ours([*found.ranges, *ours], found.fps)
        upd = self._index_changes(st, fd, snap, new_flags, is_ours)
        _unlink(st.journal)  # the appends it lists are indexed now
        return upd

    def _index_changes(
        self,
        st: _FolderState,
        fd: int,
        snap: _Snapshot,
        new_flags: list[tuple[frozenset[str], float | None]] | None,
        is_ours: _Ours,
    ) -> _Update:
        idx = self._open_index(st)
        if st.reload:
            snap = self._load(st, idx)
        s = os.fstat(fd)
        covered = _covered(s)
        handle = snap.handle
        if handle is None or handle.ino != s.st_ino:
            handle = _FileHandle(st.path)
        if idx.covered == covered:
            if handle is snap.handle:
                return _Update(snap, idx.uid_validity, idx.uid_next, False)
            snap = replace(snap, handle=handle)
            return _Update(snap, idx.uid_validity, idx.uid_next, False)
        old = idx.covered
        size = s.st_size
        tail_from = -1
        if old is not None and old[2] == s.st_ino and size > old[0]:
            if not snap.uids:
                tail_from = old[0] if old[0] == 0 else -1
            else:
                tail_from = _intact_tail(fd, _last(snap), old[0])
        if tail_from >= 0:
            res = mboxfmt.scan(fd, tail_from, size)
            rows = []
            uid = idx.uid_next
            new = _copy_snapshot(snap, handle)
            for i in range(len(res.starts)):
                flags, date = res.flags[i], res.dates[i]
                if new_flags and i < len(new_flags):
                    flags = new_flags[i][0]
                    if new_flags[i][1] is not None:
                        date = new_flags[i][1]
                fmt = _fmt(is_ours(res.from_offs[i], res.fps[i]))
                rows.append(_scan_row(res, i, uid, flags, date, fmt))
                _append_row(new, rows[-1], flags)
                uid += 1
            idx.add(rows, uid, covered)
            return _Update(new, idx.uid_validity, uid, bool(rows), append_only=True, size=size)
        # Rewritten by someone else (or a crash between expunge's rename and commit):
        # rescan, and keep UIDs and flags of the messages we recognise.
        if not snap.uids:  # nothing indexed yet: a first look, not a surprise
            self.log.info("indexing {path} ({size} bytes)", path=str(st.path), size=size)
            res = mboxfmt.scan(fd, 0, size)
            return self._index_all_new(idx, res, handle, covered, is_ours)
        self.log.info("rescanning {path}: changed outside the index", path=str(st.path))
        res = mboxfmt.scan(fd, 0, size)
        by_fp: dict[int, list[int]] = {}
        for j, fp in enumerate(snap.fps):
            by_fp.setdefault(fp, []).append(j)
        rows = []
        new = _Snapshot.empty(handle)
        uid_next = idx.uid_next
        last = -1
        renumber = False
        for i in range(len(res.starts)):
            match = -1
            cands = by_fp.get(res.fps[i])
            while cands:
                j = cands.pop(0)
                if j > last:
                    match = j
                    break
            if match >= 0:
                last = match
                info = snap.infos[match]
                flags, date = info.flags, info.internal_date
                rd = snap.rds[match]
                on_disk = snap.dflags[match]
                if on_disk is not None and on_disk != res.flags[i]:
                    # another program (mutt) changed Status:/X-Status: since we read them
                    flags = mboxfmt.merge_file_flags(flags, on_disk, res.flags[i])
                if renumber:
                    uid, uid_next = uid_next, uid_next + 1
                else:
                    uid = info.uid
            else:
                flags, date = res.flags[i], res.dates[i]
                k = i - (len(res.starts) - len(new_flags or ()))
                rd = _fmt(is_ours(res.from_offs[i], res.fps[i]))
                if new_flags and k >= 0:  # our own append, at the end
                    flags = new_flags[k][0]
                    if new_flags[k][1] is not None:
                        date = new_flags[k][1]
                uid, uid_next = uid_next, uid_next + 1
                renumber = True  # UIDs must keep ascending in file order
            row = _scan_row(res, i, uid, flags, date, rd)
            rows.append(row)
            _append_row(new, row, flags)
        idx.replace_all(rows, uid_next, covered)
        return _Update(new, idx.uid_validity, uid_next, True)

    def _index_all_new(
        self,
        idx: FolderIndex,
        res: mboxfmt.ScanResult,
        handle: _FileHandle,
        covered: tuple[int, int, int],
        is_ours: _Ours,
    ) -> _Update:
        """Index a scanned file none of whose messages were known: all get new UIDs."""
        n = len(res.starts)
        first = idx.uid_next
        uids = array("q", range(first, first + n))
        texts = [flags_text(f) if f else "" for f in res.flags]
        rds, sizes = _quoting(res, is_ours)
        idx.replace_all(
            zip(
                uids,
                res.from_offs,
                res.starts,
                res.ends,
                sizes,
                texts,
                res.dates,
                res.crcs,
                res.fps,
                rds,
                texts,
                strict=True,
            ),
            first + n,
            covered,
        )
        infos = InfoList(uids, sizes, res.dates, res.flags)
        snap = _Snapshot(
            res.from_offs, res.starts, res.ends, res.crcs, res.fps, infos, handle, rds, res.flags
        )
        return _Update(snap, idx.uid_validity, first + n, True, size=covered[0])

    def _recover(self, st: _FolderState, fd: int) -> _Ours:
        """
        With the mbox locked, before anything reads it: finish a rewrite that a
        crash interrupted, and truncate away an append that a crash left half
        written. Returns what the append journal knows of our messages that the
        index may not have yet (L{_Ours}).

        The append journal (C{<folder>.journal}) has lines
            a INO PRE POST CRC LEN HEAD   an append under way: the file was PRE
                                          long, LEN bytes before it had CRC, and
                                          it starts with the bytes HEAD (hex)
            o FP FP ...                   fingerprints of our messages whose
                                          append completed, not indexed yet
        An C{a} line is trusted only if the bytes around PRE are still those:
        another program (mutt) may have rewritten the file since.
        """
        self._recover_rewrite(st, fd)
        try:
            lines = st.journal.read_bytes().split(b"\n")[:-1]
        except FileNotFoundError:
            return _Ours()
        s = os.fstat(fd)
        ours = _Ours()
        for line in lines:
            words = line.split()
            if words[:1] == [b"o"]:
                ours.fps.update(int(w) for w in words[1:])
                continue
            try:
                if words[:1] == [b"a"] and len(words) == 7:
                    ino, pre, post, crc, length = (int(w) for w in words[1:6])
                    head = bytes.fromhex(words[6].decode())
                elif len(words) == 3:  # an older version's line: no check possible
                    ino, pre, post = (int(w) for w in words)
                    crc = length = -1
                    head = b""
                else:
                    continue
            except ValueError:
                continue
            if ino != s.st_ino or pre > s.st_size:
                continue
            if length >= 0:
                before = os.pread(fd, length, pre - length)
                seen = os.pread(fd, min(len(head), s.st_size - pre), pre)
                if zlib.crc32(before) != crc or not head.startswith(seen):
                    continue  # the file changed under this line: not ours any more
            if s.st_size >= post:
                ours.ranges.append((pre, post))
            elif pre < s.st_size:  # cut short by a crash
                self.log.warn(
                    "truncating partial append to {path} from {size} to {pre}",
                    path=str(st.path),
                    size=s.st_size,
                    pre=pre,
                )
                os.ftruncate(fd, pre)
                os.fsync(fd)
        return ours

    def _keep_ours(self, st: _FolderState, fd: int, ours: _Ours) -> None:
        """
        The index did not take our appended messages: rewrite the journal so it
        names them by fingerprint (offsets go stale when another program
        rewrites the file), for the scan that will index them.
        """
        fps = set(ours.fps)
        for a, b in ours.ranges:
            fps.update(mboxfmt.scan(fd, a, b).fps)
        write_atomic(st.journal, b"o " + b" ".join(b"%d" % fp for fp in sorted(fps)) + b"\n")

    def _recover_rewrite(self, st: _FolderState, fd: int) -> None:
        """Finish an in-place rewrite the journal describes; the index follows."""
        journal = rewrite.Journal(st.index_base)
        found = journal.read()
        if found is None:
            if journal.path.exists() or journal.save_path.exists():
                journal.remove()  # a plan cut short: nothing moved yet
            return
        plan, progress, stage = found
        s = os.fstat(fd)
        if s.st_ino != plan.ino:
            self.log.warn(
                "dropping the rewrite journal of {path}: the file was replaced", path=str(st.path)
            )
            journal.remove()
            return
        if not rewrite.still_valid(fd, plan, progress, stage):
            self.log.warn(
                "dropping the rewrite journal of {path}: the file was rewritten since;"
                " rescanning it",
                path=str(st.path),
            )
            journal.remove()
            self._open_index(st).set_covered((-1, -1, -1))  # matches no file: rescan
            st.reload = True
            return
        self.log.warn(
            "finishing an interrupted rewrite of {path} (run {run}, {done} bytes done)",
            path=str(st.path),
            run=progress[0],
            done=progress[1],
        )
        journal.reopen()
        try:
            rewrite.finish(fd, plan, journal, progress, stage)
            self._rewrite_index(st, fd, plan)
        finally:
            journal.close()
        journal.remove()
        st.reload = True

    def _rewrite_index(self, st: _FolderState, fd: int, plan: rewrite.Plan) -> None:
        """Tell the index what a finished rewrite did (idempotent)."""
        s = os.fstat(fd)
        covered = _covered(s)
        if s.st_size != plan.indexed_size:  # another program appended since: the tail scan finds it
            covered = (plan.indexed_size, -1, s.st_ino)
        self._open_index(st).rewrite(plan.removed, plan.moved, covered, plan.dflags)

    def _write_journal(
        self, st: _FolderState, fd: int, ino: int, pre: int, post: int, head: bytes
    ) -> int:
        """
        Add an append under way to the journal (L{_recover}); returns the
        journal's length before, to take the line back with L{_unwrite_journal}.
        """
        length = min(pre, 256)
        crc = zlib.crc32(os.pread(fd, length, pre - length))
        make_dirs(st.journal.parent)
        jfd = os.open(st.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            before = os.fstat(jfd).st_size
            line = b"a %d %d %d %d %d %s\n" % (ino, pre, post, crc, length, head.hex().encode())
            mboxfmt.write_all(jfd, line)
            os.fdatasync(jfd)
        finally:
            os.close(jfd)
        return before

    def _unwrite_journal(self, st: _FolderState, length: int) -> None:
        if length == 0:
            _unlink(st.journal)
        else:
            os.truncate(st.journal, length)

    @staticmethod
    def _prepare(items: list[tuple[Any, str, float]]) -> tuple[list, dict[int, BaseException]]:
        """Quote each message (before locking); a source that cannot be read fails alone."""
        prepared = []
        errors: dict[int, BaseException] = {}
        for i, (source, sender, when) in enumerate(items):
            try:
                pieces, qlen = mboxfmt.quoted_message(source)
            except Exception as e:
                errors[i] = e
                continue
            prepared.append((mboxfmt.from_line(sender, when), pieces, source, qlen))
        return prepared, errors

    def _append_locked(self, st: _FolderState, fd: int, prepared: list) -> int:
        """
        Append prepared messages in one write and one fsync; on any error truncate
        back to the old end. Returns the new size. The append stays in the journal
        (L{_recover}) until the caller has indexed it and unlinks the journal.
        """
        total = sum(len(line) + qlen + 1 for line, _, _, qlen in prepared)
        s = os.fstat(fd)
        pre = s.st_size
        pad = b""
        if pre > 0:
            tail = os.pread(fd, 2, pre - 2 if pre >= 2 else 0)
            if tail == b"\n" and pre == 1:
                pad = b""
            elif not tail.endswith(b"\n"):
                pad = b"\n\n"
            elif tail != b"\n\n":
                pad = b"\n"
        total += len(pad)
        jlen = self._write_journal(st, fd, s.st_ino, pre, pre + total, pad + prepared[0][0])
        try:
            os.lseek(fd, pre, os.SEEK_SET)
            written = 0
            buf = [pad]
            buffered = len(pad)
            for line, pieces, source, _ in prepared:
                buf.append(line)
                buffered += len(line)
                if pieces is None:
                    written += mboxfmt.write_all(fd, b"".join(buf))
                    buf, buffered = [], 0
                    written += mboxfmt.write_quoted(fd, source)
                else:
                    buf.extend(pieces)
                    buffered += sum(len(p) for p in pieces)
                buf.append(b"\n")
                buffered += 1
                if buffered >= 4 * 1024 * 1024:
                    written += mboxfmt.write_all(fd, b"".join(buf))
                    buf, buffered = [], 0
            if buf:
                written += mboxfmt.write_all(fd, b"".join(buf))
            if written != total:
                raise OSError(errno.EIO, "message changed while being stored")
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, pre)
                os.fsync(fd)
            except OSError:
                self.log.failure(
                    "could not truncate {path} after a failed append", path=str(st.path)
                )
                raise
            self._unwrite_journal(st, jlen)
            raise
        return pre + total  # the journal keeps the range until the index has the messages

    # -- deliver (group commit)

    def deliver(self, user, source, sender, folder=INBOX):
        try:
            st = self._state(user, folder)
        except Exception:
            return defer.fail()
        d: defer.Deferred = defer.Deferred()
        st.pending.append((source, sender or "", self._clock(), d))
        if not st.batch_scheduled:
            st.batch_scheduled = True
            self._job(st, lambda: self._flush(st))
        return d

    def _flush(self, st: _FolderState) -> defer.Deferred:
        items, st.pending = st.pending, []
        st.batch_scheduled = False
        d = self._in_thread(self._deliver_batch, st, [(s, f, w) for s, f, w, _ in items])

        def done(result):
            if not isinstance(result, Failure):
                size, errors, indexed = result
                if indexed is not None:
                    self._apply_indexed(st, indexed)
                for i, err in errors.items():
                    self.log.error(
                        "delivery to {user} {folder} failed: {error}",
                        user=st.user,
                        folder=st.name,
                        error=repr(err),
                    )
                    items[i][3].errback(Failure(err))
                items[:] = [it for i, it in enumerate(items) if i not in errors]
                if not items:
                    return None
                result = size
            if isinstance(result, Failure):
                if result.check(FolderError):
                    self.log.info(
                        "delivery to {user} {folder} refused: {error}",
                        user=st.user,
                        folder=st.name,
                        error=str(result.value),
                    )
                else:
                    self.log.error(
                        "delivery to {user} {folder} failed: {error}",
                        user=st.user,
                        folder=st.name,
                        error=repr(result.value),
                    )
                for *_, dd in items:
                    dd.errback(result)
                return None
            st.announced_size = max(st.announced_size, result)
            self._notify(st)
            for *_, dd in items:
                dd.callback(None)
            return None

        return d.addBoth(done)

    def _deliver_batch(
        self, st: _FolderState, items
    ) -> tuple[int, dict[int, BaseException], _Indexed | None]:
        if st.name != INBOX and not st.path.is_file():
            raise FolderError("No such folder")
        prepared, errors = self._prepare(items)
        if not prepared:
            return -1, errors, None
        created = not st.path.exists()
        if created:
            self._make_dirs(st.path.parent)
        try:
            with MboxLock(st.path, self.lock_timeout, create=st.name == INBOX) as lk:
                earlier = self._recover(st, lk.fd)
                before = os.fstat(lk.fd)
                size = self._append_locked(st, lk.fd, prepared)
                if created:
                    fsync_dir(st.path.parent)  # the new file's name is durable too
                ours = _Ours([*earlier.ranges, (before.st_size, size)], earlier.fps)
                indexed = self._index_delivered(st, lk.fd, before, ours)
                if indexed is not None:
                    _unlink(st.journal)
                else:
                    self._keep_ours(st, lk.fd, ours)
                return size, errors, indexed
        except FileNotFoundError:
            raise FolderError("No such folder")

    def _index_delivered(
        self, st: _FolderState, fd: int, before: os.stat_result, ours: _Ours
    ) -> _Indexed | None:
        """
        With the mbox locked and the append fsynced: record the new messages (and
        any another program appended since the index was last brought up to date)
        in the index, with new UIDs, in one transaction that does not wait for
        the disk. None if the index does not describe the file up to the old end
        (a rewrite by another program, or no index yet): then the next open scans.
        A failure here does not fail the delivery (the messages are safe in the mbox).
        """
        if st.reload:  # a recovered rewrite moved the messages under st.snap
            return None
        try:
            idx = self._open_index(st)
            snap = st.snap
            after = os.fstat(fd)
            old = idx.covered
            if (
                snap is not None
                and snap.uids
                and (snap.handle is None or snap.handle.ino != after.st_ino)
            ):
                return None
            if old is None:
                if before.st_size != 0:
                    return None
                tail_from = 0
            elif old == _covered(before):  # nobody touched the file since it was indexed
                tail_from = 0 if old[0] == 0 else _tail_start(fd, old[0])
            elif old[2] != after.st_ino or before.st_size <= old[0]:
                return None
            else:
                last = (
                    _last(snap)
                    if snap is not None and snap.uids
                    else None
                    if snap is not None
                    else idx.last_row()
                )
                if last is None:
                    tail_from = 0 if old[0] == 0 else -1
                else:
                    tail_from = _intact_tail(fd, last, old[0])
            if tail_from < 0:
                return None
            res = mboxfmt.scan(fd, tail_from, after.st_size)
            first = idx.uid_next
            n = len(res.starts)
            # ours: this append, and earlier ones not indexed yet; not what others appended
            rds, sizes = _quoting(res, ours)
            # A delivered message starts with no flags, whatever its header says;
            # what others appended keeps the flags its Status:/X-Status: give.
            texts = [flags_text(f) if f else "" for f in res.flags]
            flags = [
                mboxfmt.NO_FLAGS if rd & mboxfmt.READ_MBOXRD else f
                for f, rd in zip(res.flags, rds, strict=True)
            ]
            rows = list(
                zip(
                    range(first, first + n),
                    res.from_offs,
                    res.starts,
                    res.ends,
                    sizes,
                    [flags_text(f) if f else "" for f in flags],
                    res.dates,
                    res.crcs,
                    res.fps,
                    rds,
                    texts,
                    strict=True,
                )
            )
            handle = None
            if snap is not None and (snap.handle is None or snap.handle.ino != after.st_ino):
                handle = _FileHandle(st.path)
            idx.add(rows, first + n, _covered(after), durable=False)
            return _Indexed(snap, rows, flags, first + n, handle)
        except Exception:
            self.log.failure(
                "indexing delivered messages in {path} failed; the next open scans them",
                path=str(st.path),
            )
            return None

    def _apply_indexed(self, st: _FolderState, ix: _Indexed) -> None:
        """Extend the folder's loaded state with rows a delivery indexed (reactor thread)."""
        st.uid_next = ix.uid_next
        snap = st.snap
        if snap is None or snap is not ix.snap:
            return
        if ix.handle is not None:
            snap.handle = ix.handle
        for row, flags in zip(ix.rows, ix.flags, strict=True):
            _append_row(snap, row, flags)
        if ix.rows:
            st.version += 1

    def _make_dirs(self, d: Path) -> None:
        """mkdir -p, fsyncing each directory that gained an entry."""
        missing = []
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            try:
                m.mkdir(0o700)
            except FileExistsError:
                pass
            fsync_dir(m.parent)

    # -- folders

    def _install(self, upd: _Update, st: _FolderState) -> _Update:
        first = st.snap is None
        st.snap = upd.snap
        validity_changed = st.uid_validity != upd.uid_validity
        st.uid_validity = upd.uid_validity
        st.uid_next = upd.uid_next
        if upd.changed or validity_changed:
            st.version += 1
            if not upd.append_only:
                st.mutation_version = st.version
            announced = upd.append_only and 0 <= upd.size <= st.announced_size
            if not first and not announced:
                self._notify(st)
        return upd

    def write_flags(self, st: _FolderState, force: bool = False) -> defer.Deferred:
        """
        Write the flags sessions changed into the messages' Status:/X-Status:
        headers (as mutt and Dovecot keep them), in the folder's queue. Done
        lazily, when the last session leaves the folder (sessions do not see
        those fields, L{mboxfmt.HIDDEN_FIELDS}); skipped if one came back,
        unless C{force} (at shutdown, L{write_back}).
        """

        def job():
            if (st.sessions and not force) or st.detached or not st.dirty:
                return None
            uids, st.dirty = st.dirty, set()

            def failed(f: Failure) -> None:
                st.dirty |= uids  # the index has them; the next time writes them
                self.log.failure(
                    "writing flags into {user} {folder} failed", f, user=st.user, folder=st.name
                )

            d = self._in_thread(store_write_flags, self, st, uids)
            return d.addCallback(self._install, st).addErrback(failed)

        return self._job(st, job)

    def recover_pending(self) -> defer.Deferred:
        """
        Finish every in-place rewrite a crash interrupted (its journal,
        C{<folder>.rewrite}, is still in the index directory), so that other
        programs (mutt, procmail) see whole files again without waiting for a
        session to open the folder. Logs one line per folder finished; a
        folder that cannot be recovered is logged and left for its next open.
        Never fails; fires with the number of folders finished.
        """
        d = self._in_thread(self._pending_rewrites)

        def failed(f: Failure) -> list[tuple[str, str]]:
            self.log.failure("looking for interrupted rewrites failed", f)
            return []

        return d.addErrback(failed).addCallback(self._recover_folders)

    def _pending_rewrites(self) -> list[tuple[str, str]]:
        """(user, folder) of every rewrite journal under the index directory (disk thread)."""
        out = []
        for path in sorted(self.index_dir.glob("*/*/*" + rewrite.JOURNAL_SUFFIX)):
            name = name_of(path.name)
            try:
                user = normalize_user(f"{path.parent.name}@{path.parent.parent.name}")
                folder = canonical_folder(name or "")
            except (ValueError, FolderError):
                self.log.warn("ignoring the stray rewrite journal {path}", path=str(path))
                continue
            out.append((user, folder))
        return out

    def _recover_folders(self, folders: list[tuple[str, str]]) -> defer.Deferred:
        def one(user: str, name: str) -> defer.Deferred:
            st = self._state(user, name)
            d = self._job(
                st,
                lambda: self._in_thread(self._finish_rewrite, st).addCallback(self._install, st),
            )

            def done(_) -> int:
                self.log.info(
                    "finished the interrupted rewrite of {user} {folder}", user=user, folder=name
                )
                return 1

            def failed(f: Failure) -> int:
                if f.check(FolderError):
                    self.log.warn(
                        "cannot finish the interrupted rewrite of {user} {folder}: {error};"
                        " left for its next open",
                        user=user,
                        folder=name,
                        error=str(f.value),
                    )
                    return 0
                self.log.failure(
                    "finishing the interrupted rewrite of {user} {folder} failed; left for"
                    " its next open",
                    f,
                    user=user,
                    folder=name,
                )
                return 0

            return d.addCallbacks(done, failed)

        d = defer.gatherResults([one(user, name) for user, name in folders])
        return d.addCallback(sum)

    def _finish_rewrite(self, st: _FolderState) -> _Update:
        """Lock the folder's file and recover it, whatever its size and date say (disk thread)."""
        if st.detached:
            raise FolderError("Folder was renamed or deleted")
        try:
            if not _is_file(os.stat(st.path)):
                raise FolderError("No such folder")
        except (FileNotFoundError, NotADirectoryError):
            # Nothing left to finish: a journal of a folder that is gone would
            # only be met again at every start.
            rewrite.Journal(st.index_base).remove()
            raise FolderError("No such folder; its rewrite journal is removed")
        try:
            idx = self._open_index(st)
            snap = self._load(st, idx)
            with MboxLock(st.path, self.lock_timeout) as lk:
                return self._sync_locked(st, lk.fd, snap)
        except (FileNotFoundError, NotADirectoryError):
            raise FolderError("No such folder")

    def write_back(self, timeout: float) -> defer.Deferred:
        """
        At shutdown, before the thread pool stops: write the flags sessions
        changed into every folder's file (L{write_flags}), also where sessions
        are still open, after the work already queued there. Waits at most
        C{timeout} seconds, then logs the folders left. Never fails.
        """
        states = [
            st for st in self._states.values() if (st.dirty or st.queue.pending) and not st.detached
        ]
        if not states:
            return defer.succeed(None)
        left = {(st.user, st.name) for st in states}
        out: defer.Deferred = defer.Deferred()

        def one(st: _FolderState) -> defer.Deferred:
            def done(_) -> None:
                left.discard((st.user, st.name))

            return self.write_flags(st, force=True).addBoth(done)

        def finish(_=None) -> None:
            if out.called:
                return
            if left:
                self.log.warn(
                    "shutdown: flags of {count} folders not written after {timeout}s: {folders}",
                    count=len(left),
                    timeout=timeout,
                    folders=", ".join(f"{u} {n}" for u, n in sorted(left)),
                )
            out.callback(None)

        defer.DeferredList([one(st) for st in states]).addBoth(finish)
        if not out.called and IReactorTime.providedBy(self._reactor):
            call = self._reactor.callLater(timeout, finish)

            def stop_timer(result):
                if call.active():
                    call.cancel()
                return result

            out.addBoth(stop_timer)
        return out

    def _sync_job(self, st: _FolderState) -> defer.Deferred:
        return self._job(st, lambda: self._in_thread(self._sync, st).addCallback(self._install, st))

    def open_folder(self, user, name, read_only=False):
        try:
            st = self._state(user, name)
        except Exception:
            return defer.fail()

        def opened(_):
            if st.detached:
                raise FolderError("No such folder")
            return MboxFolder(self, st, read_only)

        return self._sync_job(st).addCallback(opened)

    def folder_status(self, user, name):
        try:
            st = self._state(user, name)
        except Exception:
            return defer.fail()

        def status(_):
            snap = st.snap
            assert snap is not None
            return {
                "messages": len(snap.infos),
                "uid_next": st.uid_next,
                "uid_validity": st.uid_validity,
                "unseen": sum(1 for f in snap.infos.flag_sets if SEEN not in f),
            }

        return self._sync_job(st).addCallback(status)

    def list_folders(self, user):
        try:
            user = normalize_user(user)
        except Exception:
            return defer.fail()
        return self._in_thread(self._list_folders, user)

    def _list_folders(self, user: str) -> list[tuple[str, bool]]:
        root = user_dir(self.mail_dir, user)
        out = {INBOX: True}
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            prefix = "" if rel == "." else rel.replace(os.sep, DELIMITER) + DELIMITER
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for d in dirnames:
                out.setdefault(prefix + d, False)
            for f in filenames:
                if f.startswith(".") or f.endswith(RESERVED_SUFFIXES):
                    continue
                try:
                    out[canonical_folder(prefix + f)] = True
                except FolderError:
                    continue
        return sorted(out.items())

    def _check_new_name(self, name: str) -> str:
        name = canonical_folder(name)
        if name == INBOX:
            raise FolderError("Folder already exists")
        if name.startswith(INBOX + DELIMITER):
            raise FolderError("INBOX cannot have sub-folders")
        if any(part.endswith(RESERVED_SUFFIXES) for part in name.split(DELIMITER)):
            raise FolderError("Folder names must not end with .lock")
        return name

    def create_folder(self, user, name):
        try:
            user = normalize_user(user)
            name = self._check_new_name(name)
            st = self._state(user, name)
        except Exception:
            return defer.fail()

        def job():
            return self._in_thread(self._create, st)

        return self._job(st, job)

    def _create(self, st: _FolderState) -> None:
        with self._refused("create", st.user, st.name):
            self._create_file(st)

    def _create_file(self, st: _FolderState) -> None:
        path = st.path
        if os.path.lexists(path):
            raise FolderError("Folder already exists")
        parent = path.parent
        self._check_parents(st.user, path)
        self._make_dirs(parent)
        if st.index is not None:
            st.index.close()
            st.index = None
        st.snap = None
        remove_index(st.index_base)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise FolderError("Folder already exists")
        os.fsync(fd)
        os.close(fd)
        fsync_dir(parent)

    def delete_folder(self, user, name):
        try:
            user = normalize_user(user)
            name = canonical_folder(name)
            if name == INBOX:
                raise FolderError("INBOX cannot be deleted")
            st = self._state(user, name)
        except Exception:
            return defer.fail()

        def job():
            return self._in_thread(self._delete, st).addCallback(deleted)

        def deleted(_):
            st.snap = _Snapshot.empty()
            st.version += 1
            st.mutation_version = st.version
            st.detached = True
            self._listeners_changed(st)
            self._notify(st)
            self._states.pop((st.user, st.name), None)
            self._idle.pop((st.user, st.name), None)

        return self._job(st, job)

    def _delete(self, st: _FolderState) -> None:
        with self._refused("delete", st.user, st.name):
            self._delete_file(st)

    def _delete_file(self, st: _FolderState) -> None:
        path = st.path
        if path.is_dir() and not path.is_symlink():
            try:
                path.rmdir()
            except OSError:
                raise FolderError("Folder has sub-folders")
            self._prune(st.user, path.parent)
            return
        if not path.is_file():
            raise FolderError("No such folder")
        with MboxLock(path, self.lock_timeout):
            os.unlink(path)
            fsync_dir(path.parent)
        if st.index is not None:
            st.index.close()
            st.index = None
        remove_index(st.index_base)
        self._prune(st.user, path.parent)

    def _prune(self, user: str, d: Path) -> None:
        """Remove empty directories from C{d} up to (not including) the user's directory."""
        root = user_dir(self.mail_dir, user)
        while d != root and root in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    def rename_folder(self, user, old, new):
        try:
            user = normalize_user(user)
            old = canonical_folder(old)
            new = self._check_new_name(new)
            st = self._state(user, old)
        except Exception:
            return defer.fail()
        if old == INBOX:
            return self._job(
                st,
                lambda: self._in_thread(self._rename_inbox, st, new).addCallback(self._install, st),
            )
        affected = [
            s
            for (u, n), s in list(self._states.items())
            if u == user and (n == old or n.startswith(old + DELIMITER))
        ]

        def renamed(_):
            # Sessions on the old names keep their view; new opens use the new names.
            for s in affected:
                s.detached = True
                self._listeners_changed(s)
                if self._states.get((s.user, s.name)) is s:
                    del self._states[(s.user, s.name)]
                self._idle.pop((s.user, s.name), None)
            for u, n in list(self._states):
                if u == user and (n == new or n.startswith(new + DELIMITER)):
                    self._drop((u, n))

        def job():
            return self._in_thread(self._rename, user, old, new, affected).addCallback(renamed)

        return self._job(st, job)

    def _refused(self, action: str, user: str, name: str) -> _Refused:
        """OS errors of C{action} on a folder as a L{FolderError}; the cause is logged."""
        return _Refused(self.log, action, user, name)

    def _check_parents(self, user: str, path: Path) -> None:
        """Refuse a folder below a mailbox file (the levels above it must be directories)."""
        root = user_dir(self.mail_dir, user)
        for p in path.parents:
            if p == root or root not in p.parents:
                break
            if p.exists() and not p.is_dir():
                raise FolderError(SUB_FOLDERS_REFUSED)

    def _rename(self, user: str, old: str, new: str, affected: list[_FolderState]) -> None:
        with self._refused("rename", user, old):
            self._rename_files(user, old, new, affected)

    def _rename_files(self, user: str, old: str, new: str, affected: list[_FolderState]) -> None:
        src = folder_path(self.mail_dir, user, old)
        dst = folder_path(self.mail_dir, user, new)
        if not os.path.lexists(src):
            raise FolderError("No such folder")
        if os.path.lexists(dst):
            raise FolderError("Target folder exists")
        self._check_parents(user, dst)
        make_dirs(dst.parent)
        for s in affected:
            if s.index is not None:
                s.index.close()
                s.index = None
        os.rename(src, dst)
        fsync_dir(dst.parent)
        local, domain = split_user(user)
        idir = self.index_dir / domain / local
        if idir.is_dir():
            for f in os.listdir(idir):
                n = name_of(f)
                if n is None or not (n == old or n.startswith(old + DELIMITER)):
                    continue
                suffix = f[len(str(index_base(idir, "", "", n).name)) :]
                target = index_base(self.index_dir, domain, local, new + n[len(old) :])
                os.replace(idir / f, str(target) + suffix)
        self._prune(user, src.parent)

    def _rename_inbox(self, st: _FolderState, new: str) -> _Update:
        """RFC 3501 6.3.5: move INBOX's messages to a new folder, leave INBOX empty."""
        with self._refused("rename", st.user, st.name):
            return self._move_inbox(st, new)

    def _move_inbox(self, st: _FolderState, new: str) -> _Update:
        dst = folder_path(self.mail_dir, st.user, new)
        if os.path.lexists(dst):
            raise FolderError("Target folder exists")
        self._check_parents(st.user, dst)
        upd = self._sync(st, create=True)
        snap = upd.snap
        local, domain = split_user(st.user)
        with MboxLock(st.path, self.lock_timeout, create=True) as lk:
            upd = self._sync_locked(st, lk.fd, snap)
            snap = upd.snap
            make_dirs(dst.parent)
            tmp = dst.with_name(f".{dst.name}.rename.{os.getpid()}")
            size = os.fstat(lk.fd).st_size
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _copy_range(lk.fd, out, 0, size)
                os.fsync(out)
            finally:
                os.close(out)
            base = index_base(self.index_dir, domain, local, new)
            remove_index(base)
            idx = FolderIndex(base, self.new_validity)
            rows = [
                (
                    n + 1,
                    snap.from_offs[i],
                    snap.starts[i],
                    snap.ends[i],
                    info.size,
                    flags_text(info.flags),
                    info.internal_date,
                    snap.crcs[i],
                    snap.fps[i],
                    snap.rds[i],
                    None if snap.dflags[i] is None else flags_text(snap.dflags[i]),
                )
                for n, (i, info) in enumerate(enumerate(snap.infos))
            ]
            os.rename(tmp, dst)
            fsync_dir(dst.parent)
            idx.replace_all(rows, len(rows) + 1, _covered(os.stat(dst)))
            idx.close()
            os.ftruncate(lk.fd, 0)
            os.fsync(lk.fd)
            handle = _FileHandle(st.path)
            idx_in = self._open_index(st)
            idx_in.replace_all([], idx_in.uid_next, _covered(os.fstat(lk.fd)))
        return _Update(_Snapshot.empty(handle), idx_in.uid_validity, idx_in.uid_next, True)


class _Refused:
    """
    Turns an OS error of a folder operation (disk thread) into a
    L{FolderError} with a plain text for the client, and logs the cause. A
    full disk stays an OS error: the protocols answer it with their own codes.
    """

    def __init__(self, log: Logger, action: str, user: str, name: str) -> None:
        self.log = log
        self.action = action
        self.user = user
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> None:
        if not isinstance(e, OSError) or disk_full(e):
            return
        self.log.warn(
            "cannot {action} {user} {folder}: {error}",
            action=self.action,
            user=self.user,
            folder=self.name,
            error=str(e),
        )
        if isinstance(e, (NotADirectoryError, FileExistsError)):
            raise FolderError(SUB_FOLDERS_REFUSED) from None
        raise FolderError(f"Cannot {self.action} the folder") from None


# -- a session's view ----------------------------------------------------------


def _scan_row(
    res: mboxfmt.ScanResult, i: int, uid: int, flags: frozenset[str], date: float, fmt: int
) -> tuple:
    """The index row for the C{i}th message a scan found, under C{uid}, read as C{fmt}."""
    return (
        uid,
        res.from_offs[i],
        res.starts[i],
        res.ends[i],
        res.size(i, fmt),
        flags_text(flags),
        date,
        res.crcs[i],
        res.fps[i],
        fmt,
        flags_text(res.flags[i]),
    )


class _Ours:
    """
    Which messages a scan finds are ours (we appended them: mboxrd): those
    starting in C{ranges} (appends whose place is known to be still right)
    or whose fingerprint is in C{fps}.
    """

    def __init__(self, ranges: Sequence[tuple[int, int]] = (), fps: set[int] | None = None):
        self.ranges = list(ranges)
        self.fps: set[int] = set() if fps is None else fps

    def __call__(self, off: int, fp: int) -> bool:
        return fp in self.fps or any(a <= off < b for a, b in self.ranges)


def _quoting(res: mboxfmt.ScanResult, is_ours: _Ours) -> tuple[array, array]:
    """
    (rds, sizes) for the messages a scan found; C{is_ours(from_off, fp)}: we wrote
    the message (an append whose range the journal or the caller knows).

    mboxrd or mboxo: a line ">From " in an mbox is "From " quoted by mboxrd
    (which mailsrv writes: unquoting gives back exactly what was sent) but
    ">From " itself to an mboxo writer (procmail, Postfix local, mutt,
    Python's mailbox; Dovecot and mutt never unquote when reading). The file
    does not say which. So the index records, per message, who wrote it:
    what mailsrv appended is read mboxrd, what another program wrote is read
    as it is, as mutt and Dovecot read it. A message keeps its reading for
    life (matched by fingerprint after a rewrite by another program), so
    its size and bytes under a UID never change. The index column C{rd}
    holds the reading as bits (L{mboxfmt.READ_MBOXRD}, L{mboxfmt.HIDE_FIELDS});
    rows from before hidden fields have neither or only the first.
    """
    rds = array(
        "b", (_fmt(is_ours(off, fp)) for off, fp in zip(res.from_offs, res.fps, strict=True))
    )
    sizes = array("q", (res.size(i, fmt) for i, fmt in enumerate(rds)))
    return rds, sizes


def _fmt(ours: bool) -> int:
    """How a newly found message is read: mboxrd if ours; mbox bookkeeping fields hidden."""
    return (mboxfmt.READ_MBOXRD if ours else 0) | mboxfmt.HIDE_FIELDS


@implementer(IFolder)
class MboxFolder:
    """A session's view of one mbox folder."""

    log = SafeLogger()

    def __init__(self, store: MboxMailStore, state: _FolderState, read_only: bool) -> None:
        self._store = store
        self._st = state
        self.user = state.user
        self.name = state.name
        self.read_only = read_only
        assert state.snap is not None
        self._view: InfoList = state.snap.infos.copy()
        self._exact: int | None = state.version
        self._validity = state.uid_validity
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        state.sessions += 1
        store._idle.pop((state.user, state.name), None)

    @property
    def uid_validity(self) -> int:
        return self._st.uid_validity

    @property
    def uid_next(self) -> int:
        return self._st.uid_next

    def messages(self) -> InfoList:
        """The session's view (an L{InfoList}: a list of L{MessageInfo} made on demand)."""
        return self._view.copy()

    def refresh(self) -> defer.Deferred:
        st = self._st
        if st.detached:
            # Deleted (everything is gone) or renamed (the view stays as it was).
            return defer.succeed(self._catch_up())
        return self._store._sync_job(st).addCallback(lambda _: self._catch_up())

    def _catch_up(self) -> FolderChanges:
        st = self._st
        assert st.snap is not None
        new = st.snap.infos
        old = self._view
        validity_changed = st.uid_validity != self._validity
        self._validity = st.uid_validity
        if self._exact == st.version and not validity_changed:
            return FolderChanges()
        if validity_changed:
            changes = FolderChanges(
                added=tuple(new), expunged=tuple(i.uid for i in old), uid_validity_changed=True
            )
        elif self._exact is not None and self._exact >= st.mutation_version:
            changes = FolderChanges(added=tuple(new[len(old) :]))
        else:
            changes = _diff(old, new)
        self._view = new.copy()
        self._exact = st.version
        return changes

    def _locate(self, uid: int) -> tuple[_Snapshot, int]:
        snap = self._st.snap
        if snap is None or snap.handle is None:
            raise KeyError(uid)
        return snap, snap.find(uid)

    def open_message(self, uid):
        snap, i = self._locate(uid)
        handle = snap.handle
        from_off, start, end = snap.from_offs[i], snap.starts[i], snap.ends[i]
        if end - from_off <= mboxfmt.SMALL_MESSAGE:
            data = handle.pread(end - from_off, from_off)
            if len(data) != end - from_off or zlib.crc32(data[: start - from_off]) != snap.crcs[i]:
                raise KeyError(uid)  # the file changed under us; refresh() will tell
            fmt = snap.rds[i]
            data = data[start - from_off :]
            if fmt & mboxfmt.HIDE_FIELDS:
                data = mboxfmt.hide_fields(data)
            return io.BytesIO(mboxfmt.to_crlf(data, bool(fmt & mboxfmt.READ_MBOXRD)))
        line = handle.pread(start - from_off, from_off)
        if zlib.crc32(line) != snap.crcs[i]:
            raise KeyError(uid)
        fmt = snap.rds[i]
        reader = mboxfmt.MessageReader(
            handle,
            start,
            end,
            unquote=bool(fmt & mboxfmt.READ_MBOXRD),
            hide=bool(fmt & mboxfmt.HIDE_FIELDS),
        )
        handle.readers.add(reader)
        return io.BufferedReader(reader, 64 * 1024)

    def read_headers(self, uid):
        """
        The header block as L{open_message} serves it: up to where the scanner
        says it ends (L{mboxfmt.header_end}, within L{mboxfmt.HEADER_LIMIT}),
        so that it is a prefix of the message and BODY[TEXT] starts after it.
        A message with no end of header within that reach has no hidden fields:
        all of it is header if it is that short, else its whole lines up to there.
        """
        snap, i = self._locate(uid)
        handle = snap.handle
        start, end = snap.starts[i], snap.ends[i]
        fmt = snap.rds[i]
        reach = min(end - start, mboxfmt.HEADER_LIMIT)
        want = 8192
        while True:
            data = handle.pread(min(want, reach), start)
            hend = mboxfmt.header_end(data)
            if hend >= 0 or want >= reach:
                break
            want *= 4
        if hend >= 0:
            block = data[:hend]
            if fmt & mboxfmt.HIDE_FIELDS:
                block = mboxfmt.strip_hidden(block)[0]
        elif reach < end - start:
            block = data[: data.rfind(b"\n") + 1]
        else:
            block = data
        return mboxfmt.to_crlf(block, bool(fmt & mboxfmt.READ_MBOXRD))

    def set_flags(self, changes):
        if self.read_only:
            return defer.fail(FolderError("Folder is read-only"))
        changes = {int(u): frozenset(f) for u, f in changes.items()}
        st = self._st
        store = self._store

        def job():
            snap = st.snap
            assert snap is not None
            pairs = []
            for uid, flags in changes.items():
                try:
                    snap.find(uid)
                except KeyError:
                    continue
                pairs.append((flags_text(flags), uid))
            if not pairs:
                return None
            idx = st.index

            def write():
                (idx or store._open_index(st)).set_flags(pairs)

            return store._in_thread(write).addCallback(lambda _: apply(snap))

        def apply(snap: _Snapshot):
            for uid, flags in changes.items():
                try:
                    i = snap.find(uid)
                except KeyError:
                    continue
                snap.infos.set_flags(i, flags)
                st.dirty.add(uid)
            st.version += 1
            st.mutation_version = st.version
            store._notify(st)

        view = self._view.copy()
        for uid, flags in changes.items():
            i = bisect_left(view.uids, uid)
            if i < len(view.uids) and view.uids[i] == uid:
                view.set_flags(i, flags)
        self._view = view
        self._exact = None
        return store._job(st, job)

    def append(self, source, flags=frozenset(), internal_date=None):
        st = self._st
        store = self._store
        when = store._clock() if internal_date is None else internal_date

        def work() -> _Update:
            upd = store._sync(st)
            with MboxLock(st.path, store.lock_timeout, create=st.name == INBOX) as lk:
                upd2 = store._sync_locked(st, lk.fd, upd.snap)
                before = len(upd2.snap.uids)
                prepared, errors = store._prepare([(source, "", when)])
                if errors:
                    raise errors[0]
                pre = os.fstat(lk.fd).st_size
                post = store._append_locked(st, lk.fd, prepared)
                upd3 = store._sync_locked(
                    st,
                    lk.fd,
                    upd2.snap,
                    new_flags=[(frozenset(flags), internal_date)],
                    ours=[(pre, post)],
                )
            if len(upd3.snap.uids) <= before:
                raise OSError(errno.EIO, "appended message not found")
            upd3.changed = True
            upd3.append_only = upd2.append_only or not upd2.changed
            upd3.result = upd3.snap.uids[before]
            return upd3

        def job():
            return (
                store._in_thread(work)
                .addCallback(store._install, st)
                .addCallback(lambda u: u.result)
            )

        return store._job(st, job)

    def expunge(self, uids):
        if self.read_only:
            return defer.fail(FolderError("Folder is read-only"))
        wanted = set(uids)
        st = self._st
        store = self._store

        def job():
            return store._in_thread(store_expunge, store, st, wanted).addCallback(installed)

        def installed(upd: _Update):
            store._install(upd, st)
            removed = upd.result
            gone = set(removed)
            self._view = InfoList.of(i for i in self._view if i.uid not in gone)
            self._exact = None
            return list(removed)

        return store._job(st, job)

    def add_listener(self, callback):
        self._listeners.append(callback)
        self._st.listeners.append(callback)
        self._store._listeners_changed(self._st)

    def remove_listener(self, callback):
        if callback in self._listeners:
            self._listeners.remove(callback)
            self._st.listeners.remove(callback)
            self._store._listeners_changed(self._st)

    def close(self):
        if self._closed:
            return
        self._closed = True
        for cb in list(self._listeners):
            self.remove_listener(cb)
        self._st.sessions -= 1
        if not self._st.sessions and self._st.dirty:
            self._store.write_flags(self._st)  # the last session left: lazily, now
        self._store._maybe_idle(self._st)


def store_expunge(store: MboxMailStore, st: _FolderState, wanted: set[int]) -> _Update:
    """Rewrite the folder in place without the messages in C{wanted} (disk thread)."""
    upd = store._sync(st)
    with MboxLock(st.path, store.lock_timeout, create=st.name == INBOX) as lk:
        upd = store._sync_locked(st, lk.fd, upd.snap)
        snap = upd.snap
        drop = [i for i, u in enumerate(snap.uids) if u in wanted]
        if not drop:
            upd.result = []
            return upd
        d = st.path.parent
        for f in os.listdir(d):  # temporary files of the rename-based rewrite of old versions
            if f.startswith(f".{st.path.name}.expunge."):
                _unlink(d / f)
        s = os.fstat(lk.fd)
        plan, new = _expunge_plan(snap, drop, s.st_size, s.st_ino)
        _rewrite_in_place(store, st, lk.fd, snap, plan, snap.from_offs[drop[0]])
        new.handle = snap.handle.relocation.next  # type: ignore[union-attr]
        idx = store._open_index(st)
    store.log.info(
        "expunged {count} from {user} {folder}",
        count=len(plan.removed),
        user=st.user,
        folder=st.name,
    )
    return _Update(new, idx.uid_validity, idx.uid_next, True, result=plan.removed)


def _expunge_plan(
    snap: _Snapshot, drop: list[int], size: int, ino: int
) -> tuple[rewrite.Plan, _Snapshot]:
    """The in-place rewrite that drops messages C{drop} (indexes), and the snapshot after it."""
    n = len(snap.uids)
    k = drop[0]  # messages before the first dropped one stay where they are
    new = _Snapshot(
        snap.from_offs[:k],
        snap.starts[:k],
        snap.ends[:k],
        snap.crcs[:k],
        snap.fps[:k],
        snap.infos[:k],
        None,
        snap.rds[:k],
        snap.dflags[:k],
    )
    dropset = set(drop)
    runs: list[tuple[int, int, int]] = []
    moved = []
    shift = 0
    for i in range(k, n):
        a = snap.from_offs[i]
        b = snap.from_offs[i + 1] if i + 1 < n else size
        if i in dropset:
            shift += b - a
            continue
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b, runs[-1][2])
        else:
            runs.append((a, b, a - shift))
        uid = snap.uids[i]
        new.from_offs.append(a - shift)
        new.starts.append(snap.starts[i] - shift)
        new.ends.append(snap.ends[i] - shift)
        new.crcs.append(snap.crcs[i])
        new.fps.append(snap.fps[i])
        new.rds.append(snap.rds[i])
        new.dflags.append(snap.dflags[i])
        new.infos.append(snap.infos[i])
        moved.append((a - shift, snap.starts[i] - shift, snap.ends[i] - shift, uid))
    new_size = size - shift
    tail = b""
    # A dropped last message leaves its predecessor without the blank line.
    if new.uids and drop[-1] == n - 1 and new.ends[-1] == new_size:
        tail = b"\n"
    plan = rewrite.Plan(
        ino,
        size,
        new_size + len(tail),
        runs,
        new_size,
        tail,
        [snap.uids[i] for i in drop],
        moved,
    )
    return plan, new


def _rewrite_in_place(
    store: MboxMailStore,
    st: _FolderState,
    fd: int,
    snap: _Snapshot,
    plan: rewrite.Plan,
    first: int,
) -> None:
    """
    Carry out C{plan} on the locked mbox C{fd} and update the index, with the
    journal that lets the next open finish it after a crash. The snapshot's
    read handle is relocated (see L{rewrite.Relocation}): readers with the old
    offsets keep reading the right bytes, and the new layout's handle is its
    C{relocation.next}. Messages being streamed from a part of the file that
    goes away are set aside first.
    """
    old = snap.handle
    assert old is not None and old.ino == os.fstat(fd).st_ino
    rel = rewrite.Relocation(plan.runs, first, _FileHandle(st.path, old.readers), plan.up)
    for reader in list(old.readers):
        source, pos, end = reader.remaining()
        if pos < end and (source is not old or not rel.keeps(pos, end)):
            reader.spill()
    plan.checks = rewrite.run_checks(fd, plan)
    journal = rewrite.Journal(st.index_base)
    try:
        journal.begin(plan)
    except BaseException:
        journal.remove()  # nothing moved yet
        raise
    with old.lock:
        old.relocation = rel

    def advanced(src: int) -> None:
        rel.frontier = src

    try:
        rewrite.move(fd, plan, journal, guard=lambda: old.lock, advanced=advanced)
        with old.lock:
            rel.complete()
        store._rewrite_index(st, fd, plan)
    except BaseException:
        rel.broken = True
        journal.close()
        st.reload = True  # the next sync locks, finishes the rewrite and reloads the index
        store.log.failure(
            "rewriting {path} failed; finishing it from the journal", path=str(st.path)
        )
        try:
            store._recover_rewrite(st, fd)
        except Exception:
            store.log.failure("finishing the rewrite of {path} failed", path=str(st.path))
        raise
    journal.remove()


def store_write_flags(store: MboxMailStore, st: _FolderState, uids: set[int]) -> _Update:
    """
    Rewrite, in place, the Status:/X-Status: headers of messages C{uids} whose
    flags differ from what the file says (disk thread): first the header
    blocks that shrink or keep their length (the bytes after them move down),
    then those that grow (the bytes move up), each a journaled rewrite.
    """
    upd = store._sync(st)
    with MboxLock(st.path, store.lock_timeout, create=st.name == INBOX) as lk:
        upd = store._sync_locked(st, lk.fd, upd.snap)
        snap = upd.snap
        count = 0
        for up in (False, True):
            size = os.fstat(lk.fd).st_size
            planned = _status_plan(snap, lk.fd, uids, size, os.fstat(lk.fd).st_ino, up)
            if planned is None:
                continue
            plan, new, first = planned
            _rewrite_in_place(store, st, lk.fd, snap, plan, first)
            new.handle = snap.handle.relocation.next  # type: ignore[union-attr]
            snap = new
            count += len(plan.dflags)
        idx = store._open_index(st)
    if count:
        store.log.info(
            "wrote flags of {count} into {user} {folder}",
            count=count,
            user=st.user,
            folder=st.name,
        )
    return _Update(snap, idx.uid_validity, idx.uid_next, False)


def _status_plan(
    snap: _Snapshot, fd: int, uids: set[int], size: int, ino: int, up: bool
) -> tuple[rewrite.Plan, _Snapshot, int] | None:
    """
    The rewrite that gives messages C{uids} the Status:/X-Status: of their
    flags, for those whose header block grows (C{up}) or does not; the
    snapshot after it; and the offset from which the file changes.
    """
    changes = []  # (index, header start, header end, new block)
    for uid in sorted(uids):
        try:
            i = snap.find(uid)
        except KeyError:
            continue
        if not snap.rds[i] & mboxfmt.HIDE_FIELDS:
            continue  # indexed before the fields were hidden: writing would change its size
        want = snap.infos.flag_sets[i] & mboxfmt.STATUS_FLAGS
        if snap.dflags[i] == want:
            continue
        start, end = snap.starts[i], snap.ends[i]
        head = os.pread(fd, min(mboxfmt.HEADER_LIMIT, end - start), start)
        hend = mboxfmt.header_end(head)
        if hend < 0:
            continue
        block = mboxfmt.with_status_fitted(head[:hend], want)
        grows = len(block) > hend
        if block != head[:hend] and grows == up:
            changes.append((i, start, start + hend, block))
    if not changes:
        return None
    runs: list[tuple[int, int, int]] = []
    literals: list[bytes] = []
    shift = 0
    prev = changes[0][1]
    for _, h0, h1, block in changes:
        if h0 > prev:
            runs.append((prev, h0, prev + shift))
        literals.append(block)
        runs.append((-len(literals), 0, h0 + shift))
        shift += len(block) - (h1 - h0)
        prev = h1
    if size > prev:
        runs.append((prev, size, prev + shift))
    dflags = []
    if shift == 0 and all(len(c[3]) == c[2] - c[1] for c in changes):
        # every block keeps its length (padding): no offset changes, only those headers
        new = _copy_snapshot(snap, None)
        for j, _, _, _ in changes:
            want = snap.infos.flag_sets[j] & mboxfmt.STATUS_FLAGS
            new.dflags[j] = want
            dflags.append((flags_text(want), snap.uids[j]))
        plan = rewrite.Plan(ino, size, size, runs, literals=literals, dflags=dflags)
        return plan, new, changes[0][1]
    # the snapshot and index rows after it: offsets move by the changes before them
    k = changes[0][0]
    new = _Snapshot(
        snap.from_offs[:k],
        snap.starts[:k],
        snap.ends[:k],
        snap.crcs[:k],
        snap.fps[:k],
        snap.infos.copy(),
        None,
        array("b", snap.rds),
        list(snap.dflags),
    )
    moved = []
    by_index = {c[0]: c for c in changes}
    d = 0
    for j in range(k, len(snap.uids)):
        c = by_index.get(j)
        grow = 0 if c is None else len(c[3]) - (c[2] - c[1])
        a, b, e = snap.from_offs[j] + d, snap.starts[j] + d, snap.ends[j] + d + grow
        new.from_offs.append(a)
        new.starts.append(b)
        new.ends.append(e)
        new.crcs.append(snap.crcs[j])
        new.fps.append(snap.fps[j])
        uid = snap.uids[j]
        moved.append((a, b, e, uid))
        if c is not None:
            want = snap.infos.flag_sets[j] & mboxfmt.STATUS_FLAGS
            new.dflags[j] = want
            dflags.append((flags_text(want), uid))
        d += grow
    plan = rewrite.Plan(
        ino, size, size + shift, runs, moved=moved, up=up, literals=literals, dflags=dflags
    )
    return plan, new, changes[0][1]


# -- helpers ---------------------------------------------------------------------


def _covered(s: os.stat_result) -> tuple[int, int, int]:
    return (s.st_size, s.st_mtime_ns, s.st_ino)


def _is_file(s: os.stat_result) -> bool:
    return stat.S_ISREG(s.st_mode)


def _intact_tail(fd: int, last: tuple[int, int, int], old_size: int) -> int:
    """
    Where to scan from if the file only grew: the old end (or just after a blank
    line appended there) starts a From line, and the last From line (C{last}:
    its offset, the content start after it, its crc) is unchanged.
    -1 if the file must be rescanned.
    """
    a, start, crc = last
    line = os.pread(fd, start - a, a)
    if zlib.crc32(line) != crc:
        return -1
    return _tail_start(fd, old_size)


def _tail_start(fd: int, old_size: int) -> int:
    """Where the messages appended after C{old_size} start (a From line), or -1."""
    probe = os.pread(fd, 7, old_size - 1)
    if probe.startswith(b"\nFrom "):
        return old_size
    if probe == b"\n\nFrom ":
        return old_size + 1
    return -1


def _last(snap: _Snapshot) -> tuple[int, int, int]:
    return snap.from_offs[-1], snap.starts[-1], snap.crcs[-1]


def _copy_snapshot(snap: _Snapshot, handle: _FileHandle | None) -> _Snapshot:
    return _Snapshot(
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


def _append_row(snap: _Snapshot, row: tuple, flags: frozenset[str]) -> None:
    uid, from_off, start, stop, size, _, date, crc, fp, rd, dflags = row
    snap.rds.append(rd)
    snap.dflags.append(None if dflags is None else frozenset(dflags.split()))
    snap.from_offs.append(from_off)
    snap.starts.append(start)
    snap.ends.append(stop)
    snap.crcs.append(crc)
    snap.fps.append(fp)
    snap.infos.append(MessageInfo(uid, size, frozenset(flags), date))


def _diff(old: Sequence[MessageInfo], new: Sequence[MessageInfo]) -> FolderChanges:
    """Changes from C{old} to C{new}, both in ascending UID order."""
    added, expunged, flags = [], [], []
    i = j = 0
    lo, ln = len(old), len(new)
    while i < lo and j < ln:
        a, b = old[i], new[j]
        if a is b:
            i += 1
            j += 1
        elif a.uid == b.uid:
            if a.flags != b.flags:
                flags.append(b)
            i += 1
            j += 1
        elif a.uid < b.uid:
            expunged.append(a.uid)
            i += 1
        else:
            added.append(b)
            j += 1
    expunged.extend(x.uid for x in old[i:])
    added.extend(new[j:])
    return FolderChanges(added=tuple(added), expunged=tuple(expunged), flags=tuple(flags))


def _copy_range(src: int, dst: int, a: int, b: int, out_pos: int | None = None) -> None:
    """Copy bytes C{[a, b)} of C{src} to C{dst} (at C{out_pos}, or its file position)."""
    pos = a
    while pos < b:
        n = min(b - pos, 16 * 1024 * 1024)
        try:
            if out_pos is None:
                done = os.copy_file_range(src, dst, n, pos)
            else:
                done = os.copy_file_range(src, dst, n, pos, out_pos + (pos - a))
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, n, pos)
            if out_pos is None:
                done = mboxfmt.write_all(dst, data)
            else:
                done = os.pwrite(dst, data, out_pos + (pos - a))
        if done <= 0:
            raise OSError(errno.EIO, "short copy")
        pos += done


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
