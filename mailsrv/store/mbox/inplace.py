"""
An in-place rewrite of a folder's mbox (disk threads), as the expunge and the
flag write-back plan it (L{mailsrv.store.rewrite} is the engine): carried out
with a journal, so that the next lock finishes one a crash cut short
(L{recover_rewrite}); the inode never changes, so other programs' appends are
never lost. Readers of the old layout are relocated, not waited for.
"""

from __future__ import annotations

import os

from mailsrv.store import rewrite
from mailsrv.store.mbox.files import stat_covered, store_logger
from mailsrv.store.mbox.state import FileHandle, FolderState, Snapshot

log = store_logger()


def rewrite_in_place(
    st: FolderState,
    fd: int,
    snap: Snapshot,
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
    rel = rewrite.Relocation(plan.runs, first, FileHandle(st.path, old.readers), plan.up)
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
        rewrite_index(st, fd, plan)
    except BaseException:
        rel.broken = True
        journal.close()
        st.reload = True  # the next sync locks, finishes the rewrite and reloads the index
        log.failure("rewriting {path} failed; finishing it from the journal", path=str(st.path))
        try:
            recover_rewrite(st, fd)
        except Exception:
            log.failure("finishing the rewrite of {path} failed", path=str(st.path))
        raise
    journal.remove()


def recover_rewrite(st: FolderState, fd: int) -> None:
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
        log.warn("dropping the rewrite journal of {path}: the file was replaced", path=str(st.path))
        journal.remove()
        return
    if not rewrite.still_valid(fd, plan, progress, stage, journal):
        log.warn(
            "dropping the rewrite journal of {path}: the file was rewritten since; rescanning it",
            path=str(st.path),
        )
        journal.remove()
        st.open_index().set_covered((-1, -1, -1))  # matches no file: rescan
        st.reload = True
        return
    log.warn(
        "finishing an interrupted rewrite of {path} (run {run}, {done} bytes done)",
        path=str(st.path),
        run=progress[0],
        done=progress[1],
    )
    journal.reopen()
    try:
        rewrite.finish(fd, plan, journal, progress, stage)
        rewrite_index(st, fd, plan)
    finally:
        journal.close()
    journal.remove()
    st.reload = True


def rewrite_index(st: FolderState, fd: int, plan: rewrite.Plan) -> None:
    """Tell the index what a finished rewrite did (idempotent)."""
    s = os.fstat(fd)
    covered = stat_covered(s)
    if s.st_size != plan.indexed_size:  # another program appended since: the tail scan finds it
        covered = (plan.indexed_size, -1, s.st_ino)
    st.open_index().rewrite(plan.removed, plan.moved, covered, plan.dflags)
