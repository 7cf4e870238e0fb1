"""
The one tail scan and index-row builder (disk threads): brings a folder's
index up to date with its mbox file. Unchanged files are not read, grown
files are scanned from the old end, rewritten files are rescanned and their
messages matched to the old index by fingerprint, so UIDs and flags survive
edits by mutt or procmail. Flags another program wrote into Status:/X-Status:
are taken over at the rescan. Every change found takes one new modseq (RFC
7162 3.1): new messages, messages whose flags changed, and the UIDs that are
gone (kept for "expunged since").
"""

from __future__ import annotations

import os
import stat
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import replace
from itertools import repeat

from mailsrv.atomic import make_dirs
from mailsrv.interfaces import FolderError, NotSelectable
from mailsrv.store import mboxfmt
from mailsrv.store.index import FolderIndex, flags_text
from mailsrv.store.infos import InfoList
from mailsrv.store.locking import MboxLock
from mailsrv.store.mbox import journal
from mailsrv.store.mbox.files import Refused, is_file, stat_covered, store_logger, unlink_quiet
from mailsrv.store.mbox.journal import Ours
from mailsrv.store.mbox.state import (
    FileHandle,
    FolderState,
    Snapshot,
    Update,
    append_row,
    copy_snapshot,
    last_from,
)
from mailsrv.store.names import INBOX

log = store_logger()


def load(st: FolderState, idx: FolderIndex) -> Snapshot:
    """The snapshot the index describes (no file access)."""
    if st.snap is not None and not st.reload:
        return st.snap
    st.reload = False
    snap = Snapshot.empty()
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
    i_modseqs = infos.modseqs.append
    for uid, from_off, start, stop, size, flags, idate, crc, fp, rd, dfl, modseq in idx.rows():
        fs = fcache.get(flags)
        if fs is None:
            fs = fcache[flags] = frozenset(flags.split()) if flags else frozenset()
        i_uids(uid)
        i_sizes(size)
        i_dates(idate)
        i_flags(fs)
        i_modseqs(modseq)
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


def sync(st: FolderState, create: bool = False) -> Update:
    """Bring the index up to date with the file; lock only if the file changed."""
    if st.detached:
        raise FolderError("Folder was renamed or deleted")
    create = create or st.name == INBOX
    try:
        s = os.stat(st.path)
    except FileNotFoundError:
        if not create:
            raise FolderError("No such folder")
        with Refused(log, "open", st.user, st.name):
            make_dirs(st.path.parent)
        s = None
    except NotADirectoryError:  # a level above is a mailbox (a file)
        raise FolderError("No such folder")
    if s is not None and not is_file(s):
        raise NotSelectable() if stat.S_ISDIR(s.st_mode) else FolderError("No such folder")
    idx = st.open_index()
    snap = load(st, idx)
    if (
        s is not None
        and not st.reload
        and idx.covered == stat_covered(s)
        and snap.handle is not None
        and snap.handle.ino == s.st_ino
    ):
        return Update(
            snap, idx.uid_validity, idx.uid_next, False, highest_modseq=idx.highest_modseq
        )
    try:
        with MboxLock(st.path, st.lock_timeout, create=create, reader=True) as lk:
            return sync_locked(st, lk.fd, snap)
    except FileNotFoundError:
        raise FolderError("No such folder")


def sync_locked(
    st: FolderState,
    fd: int,
    snap: Snapshot,
    new_flags: list[tuple[frozenset[str], float | None]] | None = None,
    ours: Sequence[tuple[int, int]] = (),
) -> Update:
    """
    With the mbox locked: recover a broken append or rewrite, then index what
    changed. C{ours}: byte ranges we just appended (read mboxrd, L{_quoting}).
    """
    found = journal.recover(st, fd)
    is_ours = Ours([*found.ranges, *ours], found.fps)
    upd = _index_changes(st, fd, snap, new_flags, is_ours)
    unlink_quiet(st.journal)  # the appends it lists are indexed now
    return upd


def _index_changes(
    st: FolderState,
    fd: int,
    snap: Snapshot,
    new_flags: list[tuple[frozenset[str], float | None]] | None,
    is_ours: Ours,
) -> Update:
    idx = st.open_index()
    if st.reload:
        snap = load(st, idx)
    s = os.fstat(fd)
    covered = stat_covered(s)
    handle = snap.handle
    if handle is None or handle.ino != s.st_ino:
        handle = FileHandle(st.path)
    if idx.covered == covered:
        if handle is not snap.handle:
            snap = replace(snap, handle=handle)
        return Update(
            snap, idx.uid_validity, idx.uid_next, False, highest_modseq=idx.highest_modseq
        )
    old = idx.covered
    size = s.st_size
    tail_from = -1
    if old is not None and old[2] == s.st_ino and size > old[0]:
        if not snap.uids:
            tail_from = old[0] if old[0] == 0 else -1
        else:
            tail_from = intact_tail(fd, last_from(snap), old[0])
    if tail_from >= 0:
        res = mboxfmt.scan(fd, tail_from, size)
        rows = []
        uid = idx.uid_next
        # As a delivery (deliver.py): HIGHESTMODSEQ grows by the count of the
        # rows found, among them any whose commit a power loss undid.
        modseq = idx.highest_modseq + max(1, len(res.starts))
        new = copy_snapshot(snap, handle)
        for i in range(len(res.starts)):
            flags, date = res.flags[i], res.dates[i]
            if new_flags and i < len(new_flags):
                flags = new_flags[i][0]
                if new_flags[i][1] is not None:
                    date = new_flags[i][1]
            fmt = read_format(is_ours(res.from_offs[i], res.fps[i]))
            rows.append(scan_row(res, i, uid, flags, date, fmt, modseq))
            append_row(new, rows[-1], flags)
            uid += 1
        idx.add(rows, uid, covered)
        return Update(
            new,
            idx.uid_validity,
            uid,
            bool(rows),
            append_only=True,
            size=size,
            highest_modseq=idx.highest_modseq,
        )
    # Rewritten by someone else (or a crash between expunge's rename and commit):
    # rescan, and keep UIDs and flags of the messages we recognise.
    if not snap.uids:  # nothing indexed yet: a first look, not a surprise
        log.info("indexing {path} ({size} bytes)", path=str(st.path), size=size)
        res = mboxfmt.scan(fd, 0, size)
        return _index_all_new(idx, res, handle, covered, is_ours)
    log.info("rescanning {path}: changed outside the index", path=str(st.path))
    res = mboxfmt.scan(fd, 0, size)
    by_fp: dict[int, list[int]] = {}
    for j, fp in enumerate(snap.fps):
        by_fp.setdefault(fp, []).append(j)
    rows = []
    new = Snapshot.empty(handle)
    uid_next = idx.uid_next
    modseq = idx.next_modseq  # for every change this rescan finds
    bumped = False
    kept: set[int] = set()  # old UIDs still there
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
            ms = snap.infos.modseqs[match]
            on_disk = snap.dflags[match]
            if on_disk is not None and on_disk != res.flags[i]:
                # another program (mutt) changed Status:/X-Status: since we read them
                flags = mboxfmt.merge_file_flags(flags, on_disk, res.flags[i])
            if renumber:
                uid, uid_next = uid_next, uid_next + 1
            else:
                uid = info.uid
                kept.add(uid)
            if uid != info.uid or flags != info.flags:
                ms = modseq
        else:
            flags, date = res.flags[i], res.dates[i]
            k = i - (len(res.starts) - len(new_flags or ()))
            rd = read_format(is_ours(res.from_offs[i], res.fps[i]))
            if new_flags and k >= 0:  # our own append, at the end
                flags = new_flags[k][0]
                if new_flags[k][1] is not None:
                    date = new_flags[k][1]
            uid, uid_next = uid_next, uid_next + 1
            renumber = True  # UIDs must keep ascending in file order
            ms = modseq
        bumped = bumped or ms == modseq
        row = scan_row(res, i, uid, flags, date, rd, ms)
        rows.append(row)
        append_row(new, row, flags)
    gone = [u for u in snap.uids if u not in kept]
    grew = bumped or bool(gone)
    idx.replace_all(rows, uid_next, covered, modseq if grew else None, gone)
    return Update(new, idx.uid_validity, uid_next, True, highest_modseq=idx.highest_modseq)


def _index_all_new(
    idx: FolderIndex,
    res: mboxfmt.ScanResult,
    handle: FileHandle,
    covered: tuple[int, int, int],
    is_ours: Ours,
) -> Update:
    """Index a scanned file none of whose messages were known: all get new UIDs."""
    n = len(res.starts)
    first = idx.uid_next
    modseq = idx.next_modseq
    uids = array("q", range(first, first + n))
    texts = [flags_text(f) if f else "" for f in res.flags]
    rds, sizes = quoting(res, is_ours)
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
            repeat(modseq, n),
            strict=True,
        ),
        first + n,
        covered,
        modseq if n else None,
    )
    infos = InfoList(uids, sizes, res.dates, res.flags, modseqs=array("q", repeat(modseq, n)))
    # dflags is a list of its own: append_row grows it beside infos.flag_sets.
    snap = Snapshot(
        res.from_offs, res.starts, res.ends, res.crcs, res.fps, infos, handle, rds, list(res.flags)
    )
    return Update(
        snap,
        idx.uid_validity,
        first + n,
        True,
        size=covered[0],
        highest_modseq=idx.highest_modseq,
    )


def scan_row(
    res: mboxfmt.ScanResult,
    i: int,
    uid: int,
    flags: frozenset[str],
    date: float,
    fmt: int,
    modseq: int,
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
        modseq,
    )


def quoting(res: mboxfmt.ScanResult, is_ours: Ours) -> tuple[array, array]:
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
        "b", (read_format(is_ours(off, fp)) for off, fp in zip(res.from_offs, res.fps, strict=True))
    )
    sizes = array("q", (res.size(i, fmt) for i, fmt in enumerate(rds)))
    return rds, sizes


def read_format(ours: bool) -> int:
    """How a newly found message is read: mboxrd if ours; mbox bookkeeping fields hidden."""
    return (mboxfmt.READ_MBOXRD if ours else 0) | mboxfmt.HIDE_FIELDS


def intact_tail(fd: int, last: tuple[int, int, int], old_size: int) -> int:
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
    return tail_start(fd, old_size)


def tail_start(fd: int, old_size: int) -> int:
    """Where the messages appended after C{old_size} start (a From line), or -1."""
    probe = os.pread(fd, 7, old_size - 1)
    if probe.startswith(b"\nFrom "):
        return old_size
    if probe == b"\n\nFrom ":
        return old_size + 1
    return -1
