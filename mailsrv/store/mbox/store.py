"""
The mbox message store (L{IMailStore}): one mboxrd file per folder under the
mail directory, an sqlite index per folder under the index directory (see
L{mailsrv.store.index}), dotlock + fcntl locking (L{mailsrv.store.locking}).
This module ties the parts of L{mailsrv.store.mbox} together: the loaded
folders (L{cache}), delivery (L{deliver}), folder operations (L{folders}),
sessions' views (L{view}), the flag write-back (L{flagwrite}), and the
recovery at start-up of rewrites a crash interrupted.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.atomic import make_dirs
from mailsrv.interfaces import DELETED, SEEN, FolderError, IMailStore
from mailsrv.store import rewrite
from mailsrv.store.index import name_of
from mailsrv.store.locking import DEFAULT_TIMEOUT, MboxLock
from mailsrv.store.mbox import scan
from mailsrv.store.mbox.cache import POLL_INTERVAL, FolderStates
from mailsrv.store.mbox.deliver import Deliveries
from mailsrv.store.mbox.files import is_file, store_logger
from mailsrv.store.mbox.flagwrite import write_flags
from mailsrv.store.mbox.folders import Folders
from mailsrv.store.mbox.state import FolderState, StoreConfig, Update
from mailsrv.store.mbox.view import MboxFolder
from mailsrv.store.names import INBOX, canonical_folder, normalize_user


@implementer(IMailStore)
class MboxMailStore:
    """All users' folders as mbox files under C{mail_dir}, indexes under C{index_dir}."""

    log = store_logger()
    mail_folders_hold_folders = False  # a folder is an mbox file, or a directory of folders

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
        self._clock = clock
        self.poll_interval = poll_interval
        self._config = StoreConfig(self.mail_dir, self.index_dir, lock_timeout, self.new_validity)
        self.states = FolderStates(reactor, threadpool, self._new_state, poll_interval)
        self._deliveries = Deliveries(self.states, clock)
        self._folders = Folders(self.states, self._config)
        self._validity_lock = threading.Lock()
        self._last_validity = 0

    @property
    def lock_timeout(self) -> float:
        """Seconds to wait for a folder's lock (may be changed while running)."""
        return self._config.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, value: float) -> None:
        self._config.lock_timeout = value

    def _new_state(self, user: str, name: str) -> FolderState:
        return FolderState(self._config, user, name)

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

    # -- IMailStore

    def deliver(self, user, source, sender, folder=INBOX):
        return self._deliveries.deliver(user, source, sender, folder)

    def list_folders(self, user):
        return self._folders.list_folders(user)

    def create_folder(self, user, name):
        return self._folders.create_folder(user, name)

    def delete_folder(self, user, name):
        return self._folders.delete_folder(user, name)

    def rename_folder(self, user, old, new):
        return self._folders.rename_folder(user, old, new)

    def open_folder(self, user, name, read_only=False):
        try:
            st = self.states.get(user, name)
        except Exception:
            return defer.fail()

        def opened(_):
            if st.detached:
                raise FolderError("No such folder")
            return MboxFolder(self.states, st, read_only, self._clock)

        return self.states.sync_job(st).addCallback(opened)

    def folder_status(self, user, name):
        try:
            st = self.states.get(user, name)
        except Exception:
            return defer.fail()

        def work() -> tuple[Update, int]:
            return scan.sync(st), st.open_index().recent_uid()

        def status(result: tuple[Update, int]) -> dict[str, int]:
            upd, recent_uid = result
            self.states.install(upd, st)
            st.saw_recent_uid(recent_uid)
            infos = upd.snap.infos
            return {
                "messages": len(infos),
                "uid_next": st.uid_next,
                "uid_validity": st.uid_validity,
                "unseen": sum(1 for f in infos.flag_sets if SEEN not in f),
                "deleted": sum(1 for f in infos.flag_sets if DELETED in f),
                "size": sum(infos.sizes),
                "recent": len(infos.uids) - bisect_left(infos.uids, recent_uid),
                "highest_modseq": st.highest_modseq,
            }

        return self.states.job(st, lambda: self.states.in_thread(work).addCallback(status))

    def write_flags(self, st: FolderState, force: bool = False) -> defer.Deferred:
        """
        Write the flags sessions changed into the messages' Status:/X-Status:
        headers (as mutt and Dovecot keep them), in the folder's queue. Done
        lazily, when the last session leaves the folder (sessions do not see
        those fields, L{mboxfmt.HIDDEN_FIELDS}); skipped if one came back,
        unless C{force} (at shutdown, L{write_back}).
        """
        return write_flags(self.states, st, force)

    def add_user_listener(self, user, callback):
        self.states.user_feed.add(user, callback)

    def remove_user_listener(self, user, callback):
        self.states.user_feed.remove(user, callback)

    def recover_pending(self) -> defer.Deferred:
        """
        Finish every in-place rewrite a crash interrupted (its journal,
        C{<folder>.rewrite}, is still in the index directory), so that other
        programs (mutt, procmail) see whole files again without waiting for a
        session to open the folder. Logs one line per folder finished; a
        folder that cannot be recovered is logged and left for its next open.
        Never fails; fires with the number of folders finished.
        """
        d = self.states.in_thread(self._pending_rewrites)

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
            st = self.states.get(user, name)
            d = self.states.job(
                st,
                lambda: self.states.in_thread(_finish_rewrite, st).addCallback(
                    self.states.install, st
                ),
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

    def write_back(self, timeout: float) -> defer.Deferred:
        """
        At shutdown, before the thread pool stops: write the flags sessions
        changed into every folder's file (L{write_flags}), also where sessions
        are still open, after the work already queued there. Waits at most
        C{timeout} seconds, then logs the folders left. Never fails.
        """
        states = [
            st
            for st in self.states.loaded.values()
            if (st.dirty or st.queue.pending) and not st.detached
        ]
        if not states:
            return defer.succeed(None)
        left = {(st.user, st.name) for st in states}
        out: defer.Deferred = defer.Deferred()

        def one(st: FolderState) -> defer.Deferred:
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


def _finish_rewrite(st: FolderState) -> Update:
    """Lock the folder's file and recover it, whatever its size and date say (disk thread)."""
    if st.detached:
        raise FolderError("Folder was renamed or deleted")
    try:
        if not is_file(os.stat(st.path)):
            raise FolderError("No such folder")
    except (FileNotFoundError, NotADirectoryError):
        # Nothing left to finish: a journal of a folder that is gone would
        # only be met again at every start.
        rewrite.Journal(st.index_base).remove()
        raise FolderError("No such folder; its rewrite journal is removed")
    try:
        idx = st.open_index()
        snap = scan.load(st, idx)
        with MboxLock(st.path, st.lock_timeout) as lk:
            return scan.sync_locked(st, lk.fd, snap)
    except (FileNotFoundError, NotADirectoryError):
        raise FolderError("No such folder")
