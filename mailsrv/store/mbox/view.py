"""
A session's view of an mbox folder (L{IFolder}): the list of messages the
session has been shown, changed only by its own L{MboxFolder.refresh}; message
bytes read through the folder's current snapshot (L{FileHandle}), in the
caller's thread; changes queued in the folder's serial queue.
"""

from __future__ import annotations

import errno
import io
import os
import zlib
from bisect import bisect_left
from collections.abc import Callable, Sequence

from twisted.internet import defer
from zope.interface import implementer

from mailsrv.interfaces import FlagResult, FolderChanges, FolderError, IFolder, MessageInfo
from mailsrv.logsafe import SafeLogger
from mailsrv.store import mboxfmt
from mailsrv.store.index import flags_text
from mailsrv.store.infos import InfoList
from mailsrv.store.locking import MboxLock
from mailsrv.store.mbox import journal, scan
from mailsrv.store.mbox.cache import FolderStates
from mailsrv.store.mbox.expunge import store_expunge
from mailsrv.store.mbox.flagwrite import write_flags
from mailsrv.store.mbox.state import FolderState, Snapshot, Update
from mailsrv.store.names import INBOX


@implementer(IFolder)
class MboxFolder:
    """A session's view of one mbox folder."""

    log = SafeLogger()

    def __init__(
        self,
        states: FolderStates,
        state: FolderState,
        read_only: bool,
        clock: Callable[[], float],
    ) -> None:
        self._states = states
        self._clock = clock
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
        states.in_use(state)

    @property
    def uid_validity(self) -> int:
        return self._st.uid_validity

    @property
    def uid_next(self) -> int:
        return self._st.uid_next

    @property
    def highest_modseq(self) -> int:
        return self._st.highest_modseq

    def messages(self) -> InfoList:
        """The session's view (an L{InfoList}: a list of L{MessageInfo} made on demand)."""
        return self._view.copy()

    def refresh(self) -> defer.Deferred:
        st = self._st
        if st.detached:
            # Deleted (everything is gone) or renamed (the view stays as it was).
            return defer.succeed(self._catch_up())
        return self._states.sync_job(st).addCallback(lambda _: self._catch_up())

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
            changes = diff(old, new)
        self._view = new.copy()
        self._exact = st.version
        return changes

    def _locate(self, uid: int) -> tuple[Snapshot, int]:
        snap = self._st.snap
        if snap is None or snap.handle is None:
            raise KeyError(uid)
        return snap, snap.find(uid)

    def open_message(self, uid):
        snap, i = self._locate(uid)
        handle = snap.handle
        assert handle is not None  # a snapshot that holds messages has its file open
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
        assert handle is not None  # a snapshot that holds messages has its file open
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
        self._show_flags(changes)
        d = self._flag_job(list(changes), lambda uid, old: changes[uid], None)
        return d.addCallback(self._show_modseqs).addCallback(lambda _: None)

    def change_flags(self, uids, add=frozenset(), remove=frozenset(), unchanged_since=None):
        if self.read_only:
            return defer.fail(FolderError("Folder is read-only"))
        add, remove = frozenset(add), frozenset(remove)
        d = self._flag_job(
            [int(u) for u in uids], lambda uid, old: (old | add) - remove, unchanged_since
        )

        def shown(now: FlagResult) -> FlagResult:
            self._show_flags(now, now.modseqs)
            return now

        return d.addCallback(shown)

    def _show_modseqs(self, now: FlagResult) -> FlagResult:
        self._show_flags(now, now.modseqs)
        return now

    def _show_flags(
        self, flags: dict[int, frozenset[str]], modseqs: dict[int, int] | None = None
    ) -> None:
        """Give the messages of the session's view these flags (the next refresh diffs)."""
        view = self._view.copy()
        for uid, fs in flags.items():
            i = bisect_left(view.uids, uid)
            if i < len(view.uids) and view.uids[i] == uid:
                view.set_flags(i, fs, None if modseqs is None else modseqs.get(uid))
        self._view = view
        self._exact = None

    def changed_since(self, modseq):
        st = self._st
        states = self._states
        if st.detached:
            return defer.succeed([])

        def work():
            return st.open_index().changed_since(int(modseq))

        return states.job(st, lambda: states.in_thread(work))

    def vanished_since(self, modseq):
        st = self._st
        states = self._states
        if st.detached:
            return defer.succeed([])

        def work():
            return st.open_index().vanished_since(int(modseq))

        return states.job(st, lambda: states.in_thread(work))

    def _flag_job(
        self,
        uids: list[int],
        new_flags: Callable[[int, frozenset[str]], frozenset[str]],
        unchanged_since: int | None,
    ) -> defer.Deferred:
        """
        In the folder's queue: give each message of C{uids} that exists the
        flags C{new_flags(uid, flags now)}, in the index (one new modseq for
        all that change), then in the shared snapshot; fires with a
        L{FlagResult}. A message whose modseq is above C{unchanged_since} is
        left alone (RFC 7162 3.2), tested in the same job that changes the
        others. Others are told if any changed.
        """
        st = self._st
        states = self._states

        def job():
            snap = st.snap
            assert snap is not None
            infos = snap.infos
            now = FlagResult()
            failed = set()
            pairs = []
            for uid in uids:
                try:
                    i = snap.find(uid)
                except KeyError:
                    continue
                old = infos.flag_sets[i]
                now.modseqs[uid] = infos.modseqs[i]
                if unchanged_since is not None and infos.modseqs[i] > unchanged_since:
                    now[uid] = old
                    failed.add(uid)
                    continue
                now[uid] = new = new_flags(uid, old)
                if new != old:
                    pairs.append((flags_text(new), uid))
            now.failed = frozenset(failed)
            if not pairs:
                return now
            idx = st.index

            def write() -> int:
                return (idx or st.open_index()).set_flags(pairs)

            return states.in_thread(write).addCallback(apply, snap, now, pairs)

        def apply(modseq: int, snap: Snapshot, now: FlagResult, pairs: list) -> FlagResult:
            changed = []
            for _, uid in pairs:
                now.modseqs[uid] = modseq
                changed.append(uid)
                try:
                    i = snap.find(uid)
                except KeyError:
                    continue
                snap.infos.set_flags(i, now[uid], modseq)
                st.dirty.add(uid)
            now.changed = frozenset(changed)
            st.highest_modseq = max(st.highest_modseq, modseq)
            st.version += 1
            st.mutation_version = st.version
            states.notify(st)
            return now

        return states.job(st, job)

    def claim_recent(self):
        st = self._st
        uids = self._view.uids
        upto = uids[-1] + 1 if len(uids) else 0
        if st.detached or st.recent_uid >= upto:
            return defer.succeed((upto, upto))  # all given already: no disk work
        states = self._states
        take = not self.read_only  # RFC 3501 6.3.2: EXAMINE takes \Recent from no one

        def work() -> int:
            idx = st.open_index()
            return idx.claim_recent(upto) if take else idx.recent_uid()

        def got(first: int) -> tuple[int, int]:
            st.saw_recent_uid(max(first, upto if take else 0))
            return (first, upto)

        return states.job(st, lambda: states.in_thread(work).addCallback(got))

    def append(self, source, flags=frozenset(), internal_date=None):
        return self.append_many([(source, flags, internal_date)]).addCallback(lambda u: u[0])

    def append_many(self, items):
        st = self._st
        states = self._states
        now = self._clock()
        items = list(items)
        count = len(items)

        def work() -> Update:
            upd = scan.sync(st)
            with MboxLock(st.path, st.lock_timeout, create=st.name == INBOX) as lk:
                upd2 = scan.sync_locked(st, lk.fd, upd.snap)
                before = len(upd2.snap.uids)
                prepared, errors = journal.prepare(
                    [(src, "", now if when is None else when) for src, _, when in items]
                )
                if errors:
                    raise next(iter(errors.values()))
                pre = os.fstat(lk.fd).st_size
                # One write and one fsync for all (journal.append_locked): a
                # crash part way is truncated away whole at the next lock.
                post = journal.append_locked(st, lk.fd, prepared)
                upd3 = scan.sync_locked(
                    st,
                    lk.fd,
                    upd2.snap,
                    new_flags=[(frozenset(flags), when) for _, flags, when in items],
                    ours=[(pre, post)],
                )
            if len(upd3.snap.uids) < before + count:
                raise OSError(errno.EIO, "appended message not found")
            upd3.changed = True
            upd3.append_only = upd2.append_only or not upd2.changed
            upd3.result = list(upd3.snap.uids[before : before + count])
            return upd3

        def job():
            return (
                states.in_thread(work)
                .addCallback(states.install, st)
                .addCallback(lambda u: u.result)
            )

        return states.job(st, job)

    def expunge(self, uids):
        if self.read_only:
            return defer.fail(FolderError("Folder is read-only"))
        wanted = set(uids)
        st = self._st
        states = self._states

        def job():
            return states.in_thread(store_expunge, st, wanted).addCallback(installed)

        def installed(upd: Update):
            states.install(upd, st)
            removed = upd.result
            gone = set(removed)
            self._view = InfoList.of(i for i in self._view if i.uid not in gone)
            self._exact = None
            return list(removed)

        return states.job(st, job)

    def add_listener(self, callback):
        self._listeners.append(callback)
        self._st.listeners.append(callback)
        self._states.listeners_changed(self._st)

    def remove_listener(self, callback):
        if callback in self._listeners:
            self._listeners.remove(callback)
            self._st.listeners.remove(callback)
            self._states.listeners_changed(self._st)

    def close(self):
        if self._closed:
            return
        self._closed = True
        for cb in list(self._listeners):
            self.remove_listener(cb)
        self._st.sessions -= 1
        if not self._st.sessions and self._st.dirty:
            write_flags(self._states, self._st)  # the last session left: lazily, now
        self._states.maybe_idle(self._st)


def diff(old: Sequence[MessageInfo], new: Sequence[MessageInfo]) -> FolderChanges:
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
