"""
The flag write-back: the flags sessions changed live in the index; when the
last session leaves a folder (or at shutdown), they are written into the
messages' Status:/X-Status: headers (as mutt and Dovecot keep them), with the
same in-place rewrite as the expunge (L{mailsrv.store.mbox.inplace}). Sessions
never see those header fields (L{mboxfmt.HIDDEN_FIELDS}), so writing them
changes no size; stored messages carry padding, so most writes overwrite a
header block of the same length.
"""

from __future__ import annotations

import os
from array import array

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsrv.store import mboxfmt, rewrite
from mailsrv.store.index import flags_text
from mailsrv.store.locking import MboxLock
from mailsrv.store.mbox import scan
from mailsrv.store.mbox.cache import FolderStates
from mailsrv.store.mbox.files import store_logger
from mailsrv.store.mbox.inplace import rewrite_in_place
from mailsrv.store.mbox.state import FolderState, Snapshot, Update, copy_snapshot
from mailsrv.store.names import INBOX

log = store_logger()


def write_flags(states: FolderStates, st: FolderState, force: bool = False) -> defer.Deferred:
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
            log.failure(
                "writing flags into {user} {folder} failed", f, user=st.user, folder=st.name
            )

        d = states.in_thread(store_write_flags, st, uids)
        return d.addCallback(states.install, st).addErrback(failed)

    return states.job(st, job)


def store_write_flags(st: FolderState, uids: set[int]) -> Update:
    """
    Rewrite, in place, the Status:/X-Status: headers of messages C{uids} whose
    flags differ from what the file says (disk thread): first the header
    blocks that shrink or keep their length (the bytes after them move down),
    then those that grow (the bytes move up), each a journaled rewrite.
    """
    upd = scan.sync(st)
    with MboxLock(st.path, st.lock_timeout, create=st.name == INBOX) as lk:
        upd = scan.sync_locked(st, lk.fd, upd.snap)
        snap = upd.snap
        count = 0
        blocks = _new_blocks(snap, lk.fd, uids)
        for up in (False, True):
            size = os.fstat(lk.fd).st_size
            planned = _status_plan(snap, blocks, size, os.fstat(lk.fd).st_ino, up)
            if planned is None:
                continue
            plan, new, first = planned
            rewrite_in_place(st, lk.fd, snap, plan, first)
            new.handle = snap.handle.relocation.next  # type: ignore[union-attr]
            snap = new
            count += len(plan.dflags)
        idx = st.open_index()
    if count:
        log.info(
            "wrote flags of {count} into {user} {folder}",
            count=count,
            user=st.user,
            folder=st.name,
        )
    return Update(snap, idx.uid_validity, idx.uid_next, False, highest_modseq=idx.highest_modseq)


def _new_blocks(snap: Snapshot, fd: int, uids: set[int]) -> dict[int, tuple[int, bytes]]:
    """
    For each message of C{uids} whose Status:/X-Status: must change: the
    length of its header block now, and the block with its flags' fields
    (read and built once for both passes: the first leaves the others' headers as they are).
    """
    out = {}
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
        if block != head[:hend]:
            out[uid] = (hend, block)
    return out


def _status_plan(
    snap: Snapshot, blocks: dict[int, tuple[int, bytes]], size: int, ino: int, up: bool
) -> tuple[rewrite.Plan, Snapshot, int] | None:
    """
    The rewrite that gives the messages of C{blocks} (L{_new_blocks}) their new
    header blocks, for those whose block grows (C{up}) or does not; the
    snapshot after it; and the offset from which the file changes.
    """
    changes = []  # (index, header start, header end, new block)
    for uid in sorted(blocks):
        hend, block = blocks[uid]
        try:
            i = snap.find(uid)
        except KeyError:
            continue
        want = snap.infos.flag_sets[i] & mboxfmt.STATUS_FLAGS
        if snap.dflags[i] == want or (len(block) > hend) != up:
            continue
        start = snap.starts[i]
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
        new = copy_snapshot(snap, None)
        for j, _, _, _ in changes:
            want = snap.infos.flag_sets[j] & mboxfmt.STATUS_FLAGS
            new.dflags[j] = want
            dflags.append((flags_text(want), snap.uids[j]))
        plan = rewrite.Plan(ino, size, size, runs, literals=literals, dflags=dflags)
        return plan, new, changes[0][1]
    # the snapshot and index rows after it: offsets move by the changes before them
    k = changes[0][0]
    new = Snapshot(
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
