"""
The folders loaded in this process (reactor thread): one L{FolderState} per
folder, kept while sessions or work need it and for a few idle folders after;
the jobs run in a folder's serial queue and installed when done; the
listeners told of changes, and the poll that looks for other programs'
changes while someone listens (IMAP IDLE).

This is the small internal API the other parts of the store use: L{get},
L{job}, L{in_thread}, L{sync_job}, L{install}, L{notify}, L{forget},
L{drop}, L{maybe_idle}, L{listeners_changed}.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from mailsrv.interfaces import FOLDER_MESSAGES, FolderError, FolderEvent
from mailsrv.store.mbox import scan
from mailsrv.store.mbox.files import store_logger
from mailsrv.store.mbox.state import FolderState, Update
from mailsrv.store.names import canonical_folder, normalize_user
from mailsrv.store.userfeed import UserFeed

IDLE_STATES = 16  # folders kept loaded with no session open
POLL_INTERVAL = 5.0  # seconds between stat()s of a folder someone listens to (IMAP IDLE)


class FolderStates:
    """The loaded folders of one store, and the reactor-side mechanics of their jobs."""

    log = store_logger()

    def __init__(
        self,
        reactor: Any,
        threadpool: Any,
        make_state: Callable[[str, str], FolderState],
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self._pool = threadpool
        self._make_state = make_state
        self.poll_interval = poll_interval
        self.loaded: dict[tuple[str, str], FolderState] = {}
        self._idle: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.user_feed = UserFeed()  # IMailStore.add_user_listener: told by notify

    def in_thread(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run C{fn(*args)} in the store's thread pool."""
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    def get(self, user: str, name: str) -> FolderState:
        """The state of a folder (loaded on first use); it is no longer idle."""
        user = normalize_user(user)
        name = canonical_folder(name)
        key = (user, name)
        st = self.loaded.get(key)
        if st is None:
            st = self.loaded[key] = self._make_state(user, name)
        self._idle.pop(key, None)
        return st

    def in_use(self, st: FolderState) -> None:
        """A session opened C{st}: it is not idle."""
        self._idle.pop(st.key, None)

    def job(self, st: FolderState, fn: Callable[[], Any]) -> defer.Deferred:
        """Run C{fn} (reactor thread, returns a Deferred) in the folder's queue."""
        d = st.queue.run(fn)
        d.addBoth(self._after_job, st)
        return d

    def _after_job(self, result: Any, st: FolderState) -> Any:
        self.maybe_idle(st)
        return result

    def sync_job(self, st: FolderState) -> defer.Deferred:
        """Bring the folder's state up to date with its file, in its queue."""
        return self.job(st, lambda: self.in_thread(scan.sync, st).addCallback(self.install, st))

    def maybe_idle(self, st: FolderState) -> None:
        """Keep C{st} as an idle folder if nothing uses it, or let it go."""
        if st.busy():
            return
        key = st.key
        if self.loaded.get(key) is not st:
            return
        if (st.snap is None and st.index is None) or st.detached:
            self.drop(key)
            return
        self._idle[key] = None
        self._idle.move_to_end(key)
        while len(self._idle) > IDLE_STATES:
            old, _ = self._idle.popitem(last=False)
            self.drop(old)

    def drop(self, key: tuple[str, str]) -> None:
        """Let go of a folder's state unless something uses it."""
        self._idle.pop(key, None)
        st = self.loaded.get(key)
        if st is None or st.busy():
            return
        del self.loaded[key]
        if st.index is not None:
            index, st.index = st.index, None
            st.queue.run(lambda: self.in_thread(index.close))

    def forget(self, st: FolderState) -> None:
        """Let go of a folder that was deleted or renamed (its sessions keep it)."""
        if self.loaded.get(st.key) is st:
            del self.loaded[st.key]
        self._idle.pop(st.key, None)

    def install(self, upd: Update, st: FolderState) -> Update:
        """Make what a disk job found the folder's state; tell listeners of changes."""
        first = st.snap is None
        st.snap = upd.snap
        validity_changed = st.uid_validity != upd.uid_validity
        st.uid_validity = upd.uid_validity
        st.uid_next = upd.uid_next
        if upd.highest_modseq:
            st.highest_modseq = upd.highest_modseq
        if upd.changed or validity_changed:
            st.version += 1
            if not upd.append_only:
                st.mutation_version = st.version
            announced = upd.append_only and 0 <= upd.size <= st.announced_size
            if not first and not announced:
                self.notify(st)
        return upd

    # -- watching for other programs' changes while someone listens

    def listeners_changed(self, st: FolderState) -> None:
        """Poll a folder while it has listeners (reactor thread)."""
        if st.listeners and st.poller is None and not st.detached:
            if not IReactorTime.providedBy(self.reactor) or self.poll_interval <= 0:
                return
            st.poller = task.LoopingCall(self._poll, st)
            st.poller.clock = self.reactor
            st.poller.start(self.poll_interval, now=False)
        elif (not st.listeners or st.detached) and st.poller is not None:
            poller, st.poller = st.poller, None
            if poller.running:
                poller.stop()

    def _poll(self, st: FolderState) -> None:
        """
        One look at a listened-to folder: a stat() compared with what the index
        covers; if another program (procmail, mutt) changed the file, the sync
        reindexes it and tells the listeners (L{install}). Skipped while other
        work on the folder is queued (that work syncs anyway).
        """
        if st.detached:
            self.listeners_changed(st)
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

        self.sync_job(st).addErrback(failed)

    def notify(self, st: FolderState) -> None:
        """Tell the folder's listeners, and its owner's user feed, that it changed."""
        for cb in list(st.listeners):
            try:
                cb()
            except Exception:
                self.log.failure("folder listener failed")
        if not st.detached:
            self.user_feed.tell(st.user, FolderEvent(FOLDER_MESSAGES, st.name))
