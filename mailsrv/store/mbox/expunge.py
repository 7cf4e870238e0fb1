"""
Expunge (disk thread): the folder's file is rewritten in place without the
expunged messages (L{mailsrv.store.mbox.inplace}), the messages after the
first one expunged moving down; the index follows in the same job.
"""

from __future__ import annotations

import os

from mailsrv.store import rewrite
from mailsrv.store.locking import MboxLock
from mailsrv.store.mbox import scan
from mailsrv.store.mbox.files import store_logger, unlink_quiet
from mailsrv.store.mbox.inplace import rewrite_in_place
from mailsrv.store.mbox.state import FolderState, Snapshot, Update
from mailsrv.store.names import INBOX

log = store_logger()


def store_expunge(st: FolderState, wanted: set[int]) -> Update:
    """Rewrite the folder in place without the messages in C{wanted} (disk thread)."""
    upd = scan.sync(st)
    with MboxLock(st.path, st.lock_timeout, create=st.name == INBOX) as lk:
        upd = scan.sync_locked(st, lk.fd, upd.snap)
        snap = upd.snap
        drop = [i for i, u in enumerate(snap.uids) if u in wanted]
        if not drop:
            upd.result = []
            return upd
        d = st.path.parent
        for f in os.listdir(d):  # temporary files of the rename-based rewrite of old versions
            if f.startswith(f".{st.path.name}.expunge."):
                unlink_quiet(d / f)
        s = os.fstat(lk.fd)
        plan, new = _expunge_plan(snap, drop, s.st_size, s.st_ino)
        rewrite_in_place(st, lk.fd, snap, plan, snap.from_offs[drop[0]])
        new.handle = snap.handle.relocation.next  # type: ignore[union-attr]
        idx = st.open_index()
    log.info(
        "expunged {count} from {user} {folder}",
        count=len(plan.removed),
        user=st.user,
        folder=st.name,
    )
    return Update(
        new,
        idx.uid_validity,
        idx.uid_next,
        True,
        result=plan.removed,
        highest_modseq=idx.highest_modseq,
    )


def _expunge_plan(
    snap: Snapshot, drop: list[int], size: int, ino: int
) -> tuple[rewrite.Plan, Snapshot]:
    """The in-place rewrite that drops messages C{drop} (indexes), and the snapshot after it."""
    n = len(snap.uids)
    k = drop[0]  # messages before the first dropped one stay where they are
    new = Snapshot(
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
