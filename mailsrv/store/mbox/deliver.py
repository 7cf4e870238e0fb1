"""
Delivery into a folder's mbox, with group commit: deliveries that arrive
while a write to the same folder is waiting or in progress are written
together under one lock and one fsync (L{mailsrv.groupcommit}); the batch
runs in the folder's serial queue and takes its messages when it starts.
After the fsync the same job records them in the index with their UIDs (one
transaction that does not wait for the disk: a lost one is redone by the
tail scan, L{mailsrv.store.mbox.scan}).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsrv.atomic import fsync_dir
from mailsrv.groupcommit import GroupCommit, Outcome
from mailsrv.interfaces import FolderError
from mailsrv.store import mboxfmt
from mailsrv.store.index import flags_text
from mailsrv.store.locking import MboxLock
from mailsrv.store.mbox import journal
from mailsrv.store.mbox.cache import FolderStates
from mailsrv.store.mbox.files import make_dirs_synced, stat_covered, store_logger, unlink_quiet
from mailsrv.store.mbox.journal import Ours
from mailsrv.store.mbox.scan import intact_tail, quoting, tail_start
from mailsrv.store.mbox.state import FileHandle, FolderState, Snapshot, append_row, last_from
from mailsrv.store.names import INBOX

log = store_logger()

Item = tuple[Any, str, float]  # (message source, sender, internal date)


@dataclass
class Indexed:
    """Rows a delivery added to the index; applied to the folder state on the reactor."""

    snap: Snapshot | None  # the state's snapshot the rows extend (None: not loaded)
    rows: list[tuple]
    flags: list[frozenset[str]]
    uid_next: int
    handle: FileHandle | None  # a handle for a snapshot that had none
    highest_modseq: int = 0  # the index's HIGHESTMODSEQ after (the rows' modseq)


class Deliveries:
    """The reactor side of delivery: batches per folder, run in the folder's queue."""

    log = log

    def __init__(self, states: FolderStates, clock: Callable[[], float]) -> None:
        self._states = states
        self._clock = clock

    def deliver(self, user: str, source: Any, sender: str, folder: str) -> defer.Deferred:
        """Store a message at the end of a folder; fires once it is durable."""
        try:
            st = self._states.get(user, folder)
        except Exception:
            return defer.fail()
        if st.deliveries is None:
            st.deliveries = GroupCommit(self._batch_runner(st), max_batches=None)
        return st.deliveries.submit((source, sender or "", self._clock()))

    def _batch_runner(self, st: FolderState) -> Callable[[Callable[[], list[Item]]], Any]:
        def run(take: Callable[[], list[Item]]) -> defer.Deferred:
            return self._states.job(st, lambda: self._flush(st, take()))

        return run

    def _flush(self, st: FolderState, items: list[Item]) -> defer.Deferred:
        """Write a batch (in the folder's queue); fires with one outcome per message."""
        d = self._states.in_thread(deliver_batch, st, items)

        def done(result: Any) -> list[Outcome]:
            errors: dict[int, BaseException] = {}
            if not isinstance(result, Failure):
                size, errors, indexed = result
                if indexed is not None:
                    self._apply_indexed(st, indexed)
                for err in errors.values():
                    self.log.error(
                        "delivery to {user} {folder} failed: {error}",
                        user=st.user,
                        folder=st.name,
                        error=repr(err),
                    )
                if len(errors) == len(items):
                    return [(False, Failure(errors[i])) for i in range(len(items))]
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
                return [(False, result)] * len(items)
            st.announced_size = max(st.announced_size, result)
            self._states.notify(st)
            return [
                (False, Failure(errors[i])) if i in errors else (True, None)
                for i in range(len(items))
            ]

        return d.addBoth(done)

    def _apply_indexed(self, st: FolderState, ix: Indexed) -> None:
        """Extend the folder's loaded state with rows a delivery indexed (reactor thread)."""
        st.uid_next = ix.uid_next
        if ix.highest_modseq:
            st.highest_modseq = ix.highest_modseq
        snap = st.snap
        if snap is None or snap is not ix.snap:
            return
        if ix.handle is not None:
            snap.handle = ix.handle
        for row, flags in zip(ix.rows, ix.flags, strict=True):
            append_row(snap, row, flags)
        if ix.rows:
            st.version += 1


def deliver_batch(
    st: FolderState, items: list[Item]
) -> tuple[int, dict[int, BaseException], Indexed | None]:
    """Append a batch under one lock and one fsync, and index it (disk thread)."""
    if st.name != INBOX and not st.path.is_file():
        raise FolderError("No such folder")
    prepared, errors = journal.prepare(items)
    if not prepared:
        return -1, errors, None
    created = not st.path.exists()
    if created:
        make_dirs_synced(st.path.parent)
    try:
        with MboxLock(st.path, st.lock_timeout, create=st.name == INBOX) as lk:
            earlier = journal.recover(st, lk.fd)
            before = os.fstat(lk.fd)
            size = journal.append_locked(st, lk.fd, prepared)
            if created:
                fsync_dir(st.path.parent)  # the new file's name is durable too
            ours = Ours([*earlier.ranges, (before.st_size, size)], earlier.fps)
            indexed = index_delivered(st, lk.fd, before, ours)
            if indexed is not None:
                unlink_quiet(st.journal)
            else:
                journal.keep_ours(st, lk.fd, ours)
            return size, errors, indexed
    except FileNotFoundError:
        raise FolderError("No such folder")


def index_delivered(st: FolderState, fd: int, before: os.stat_result, ours: Ours) -> Indexed | None:
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
        idx = st.open_index()
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
        elif old == stat_covered(before):  # nobody touched the file since it was indexed
            tail_from = 0 if old[0] == 0 else tail_start(fd, old[0])
        elif old[2] != after.st_ino or before.st_size <= old[0]:
            return None
        else:
            last = (
                last_from(snap)
                if snap is not None and snap.uids
                else None
                if snap is not None
                else idx.last_row()
            )
            if last is None:
                tail_from = 0 if old[0] == 0 else -1
            else:
                tail_from = intact_tail(fd, last, old[0])
        if tail_from < 0:
            return None
        res = mboxfmt.scan(fd, tail_from, after.st_size)
        first = idx.uid_next
        n = len(res.starts)
        # ours: this append, and earlier ones not indexed yet; not what others appended
        rds, sizes = quoting(res, ours)
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
                # RFC 7162 3.1: new messages take a modseq. HIGHESTMODSEQ grows by
                # their count: rows of earlier batches whose commit a power loss
                # undid (one modseq each) are among them, so it never goes below a
                # value a client was shown.
                repeat(idx.highest_modseq + n, n),
                strict=True,
            )
        )
        handle = None
        if snap is not None and (snap.handle is None or snap.handle.ino != after.st_ino):
            handle = FileHandle(st.path)
        idx.add(rows, first + n, stat_covered(after), durable=False)
        return Indexed(snap, rows, flags, first + n, handle, idx.highest_modseq)
    except Exception:
        log.failure(
            "indexing delivered messages in {path} failed; the next open scans them",
            path=str(st.path),
        )
        return None
