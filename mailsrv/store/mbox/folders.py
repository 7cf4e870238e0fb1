"""
Folder create, delete, rename and list: the reactor side (the folder's queue,
letting go of the states of folders that moved) and the file work (disk
threads). RFC 3501 6.3.3-6.3.5, 6.3.8: a rename of INBOX moves its messages
and leaves it empty; names ending in .lock are refused (dotlock files).

A folder is an mbox file, which holds no folders, or a directory, which
holds folders and no mail (listed \\Noselect): the directory of a name
created with a trailing delimiter, or of the names above a folder. A
directory stays when the folders in it are deleted or renamed away, until
it is deleted itself (RFC 3501 6.3.4's example, and Dovecot's mbox).
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer

from mailsrv.atomic import fsync_dir, make_dirs
from mailsrv.interfaces import (
    FOLDER_CREATED,
    FOLDER_DELETED,
    FOLDER_MESSAGES,
    FOLDER_RENAMED,
    FolderError,
    FolderEvent,
)
from mailsrv.store.index import FolderIndex, flags_text, index_base, name_of, remove_index
from mailsrv.store.locking import MboxLock
from mailsrv.store.mbox import scan
from mailsrv.store.mbox.cache import FolderStates
from mailsrv.store.mbox.files import (
    SUB_FOLDERS_REFUSED,
    Refused,
    copy_range,
    make_dirs_synced,
    stat_covered,
    store_logger,
)
from mailsrv.store.mbox.state import FileHandle, FolderState, Snapshot, StoreConfig, Update
from mailsrv.store.names import (
    DELIMITER,
    INBOX,
    canonical_folder,
    folder_path,
    normalize_user,
    split_user,
    user_dir,
)

RESERVED_SUFFIXES = (".lock",)


class Folders:
    """A store's folder operations (L{IMailStore}'s create/delete/rename/list)."""

    log = store_logger()

    def __init__(self, states: FolderStates, config: StoreConfig) -> None:
        self._states = states
        self._config = config
        self.mail_dir = config.mail_dir
        self.index_dir = config.index_dir

    def list_folders(self, user):
        try:
            user = normalize_user(user)
        except Exception:
            return defer.fail()
        return self._states.in_thread(self._list_folders, user)

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
            # RFC 3501 6.3.3: a trailing delimiter asks for a name to hold names.
            holder = isinstance(name, str) and name.endswith(DELIMITER)
            name = self._check_new_name(name[:-1] if holder else name)
            st = self._states.get(user, name)
        except Exception:
            return defer.fail()

        def job():
            return self._states.in_thread(self._create, st, holder)

        def created(_):
            self._states.user_feed.tell(user, FolderEvent(FOLDER_CREATED, name))

        return self._states.job(st, job).addCallback(created)

    def _create(self, st: FolderState, holder: bool) -> None:
        with Refused(self.log, "create", st.user, st.name):
            self._create_file(st, holder)

    def _create_file(self, st: FolderState, holder: bool) -> None:
        path = st.path
        if os.path.lexists(path):
            raise FolderError("Folder already exists")
        parent = path.parent
        self._check_parents(st.user, path)
        if holder:
            make_dirs_synced(path)
            return
        make_dirs_synced(parent)
        st.close_index()
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
            st = self._states.get(user, name)
        except Exception:
            return defer.fail()

        def job():
            return self._states.in_thread(self._delete, st).addCallback(deleted)

        def deleted(_):
            st.snap = Snapshot.empty()
            st.version += 1
            st.mutation_version = st.version
            st.detached = True
            self._states.listeners_changed(st)
            self._states.notify(st)
            self._states.forget(st)
            self._states.user_feed.tell(user, FolderEvent(FOLDER_DELETED, name))

        return self._states.job(st, job)

    def _delete(self, st: FolderState) -> None:
        with Refused(self.log, "delete", st.user, st.name):
            self._delete_file(st)

    def _delete_file(self, st: FolderState) -> None:
        path = st.path
        if path.is_dir() and not path.is_symlink():
            try:
                path.rmdir()
            except OSError:
                # RFC 3501 6.3.4: a \\Noselect name with inferiors is not deleted.
                raise FolderError("Mailbox has children, delete them first")
            fsync_dir(path.parent)
            return
        if not path.is_file():
            raise FolderError("No such folder")
        with MboxLock(path, st.lock_timeout):
            os.unlink(path)
            fsync_dir(path.parent)
        st.close_index()
        remove_index(st.index_base)

    def rename_folder(self, user, old, new):
        try:
            user = normalize_user(user)
            old = canonical_folder(old)
            new = self._check_new_name(new)
            st = self._states.get(user, old)
        except Exception:
            return defer.fail()
        if old == INBOX:

            def moved(upd: Update) -> None:
                # RFC 3501 6.3.5: a new folder holds INBOX's messages.
                self._states.user_feed.tell(user, FolderEvent(FOLDER_CREATED, new))
                first = st.snap is None  # install tells only of a change to a known state
                self._states.install(upd, st)
                if first:
                    self._states.user_feed.tell(user, FolderEvent(FOLDER_MESSAGES, INBOX))

            return self._states.job(
                st,
                lambda: self._states.in_thread(self._rename_inbox, st, new).addCallback(moved),
            )
        affected = [
            s
            for (u, n), s in list(self._states.loaded.items())
            if u == user and (n == old or n.startswith(old + DELIMITER))
        ]

        def renamed(children: list[str]):
            # Sessions on the old names keep their view; new opens use the new names.
            for s in affected:
                s.detached = True
                self._states.listeners_changed(s)
                self._states.forget(s)
            for u, n in list(self._states.loaded):
                if u == user and (n == new or n.startswith(new + DELIMITER)):
                    self._states.drop((u, n))
            # RFC 5465 5.4: each name renamed, the children too
            feed = self._states.user_feed
            for rel in ["", *children]:
                feed.tell(user, FolderEvent(FOLDER_RENAMED, new + rel, old + rel))

        def job():
            return self._states.in_thread(self._rename, user, old, new, affected).addCallback(
                renamed
            )

        return self._states.job(st, job)

    def _check_parents(self, user: str, path: Path) -> None:
        """Refuse a folder below a mailbox file (the levels above it must be directories)."""
        root = user_dir(self.mail_dir, user)
        for p in path.parents:
            if p == root or root not in p.parents:
                break
            if p.exists() and not p.is_dir():
                raise FolderError(SUB_FOLDERS_REFUSED)

    def _rename(self, user: str, old: str, new: str, affected: list[FolderState]) -> list[str]:
        """Rename the files; return the names below the new one ("/child", ...), for the feed."""
        with Refused(self.log, "rename", user, old):
            self._rename_files(user, old, new, affected)
        if not self._states.user_feed.listening(user):
            return []
        dst = folder_path(self.mail_dir, user, new)
        children = []
        for dirpath, dirnames, filenames in os.walk(dst):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, dst)
            prefix = (
                DELIMITER if rel == "." else DELIMITER + rel.replace(os.sep, DELIMITER) + DELIMITER
            )
            for n in dirnames + sorted(filenames):
                if not n.startswith(".") and not n.endswith(RESERVED_SUFFIXES):
                    children.append(prefix + n)
        return sorted(children)

    def _rename_files(self, user: str, old: str, new: str, affected: list[FolderState]) -> None:
        src = folder_path(self.mail_dir, user, old)
        dst = folder_path(self.mail_dir, user, new)
        if not os.path.lexists(src):
            raise FolderError("No such folder")
        if os.path.lexists(dst):
            raise FolderError("Target folder exists")
        self._check_parents(user, dst)
        make_dirs(dst.parent)
        for s in affected:
            s.close_index()
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

    def _rename_inbox(self, st: FolderState, new: str) -> Update:
        """RFC 3501 6.3.5: move INBOX's messages to a new folder, leave INBOX empty."""
        with Refused(self.log, "rename", st.user, st.name):
            return self._move_inbox(st, new)

    def _move_inbox(self, st: FolderState, new: str) -> Update:
        dst = folder_path(self.mail_dir, st.user, new)
        if os.path.lexists(dst):
            raise FolderError("Target folder exists")
        self._check_parents(st.user, dst)
        upd = scan.sync(st, create=True)
        snap = upd.snap
        local, domain = split_user(st.user)
        with MboxLock(st.path, st.lock_timeout, create=True) as lk:
            upd = scan.sync_locked(st, lk.fd, snap)
            snap = upd.snap
            make_dirs(dst.parent)
            tmp = dst.with_name(f".{dst.name}.rename.{os.getpid()}")
            size = os.fstat(lk.fd).st_size
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                copy_range(lk.fd, out, 0, size)
                os.fsync(out)
            finally:
                os.close(out)
            base = index_base(self.index_dir, domain, local, new)
            remove_index(base)
            idx = FolderIndex(base, self._config.new_validity)
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
                    idx.next_modseq,  # a new folder (new UIDVALIDITY): all new
                )
                for n, (i, info) in enumerate(enumerate(snap.infos))
            ]
            os.rename(tmp, dst)
            fsync_dir(dst.parent)
            idx.replace_all(
                rows, len(rows) + 1, stat_covered(os.stat(dst)), idx.next_modseq if rows else None
            )
            idx.close()
            os.ftruncate(lk.fd, 0)
            os.fsync(lk.fd)
            handle = FileHandle(st.path)
            idx_in = st.open_index()
            gone = list(snap.uids)  # expunged from INBOX (RFC 7162 3.6: VANISHED)
            idx_in.replace_all(
                [],
                idx_in.uid_next,
                stat_covered(os.fstat(lk.fd)),
                idx_in.next_modseq if gone else None,
                gone,
            )
        return Update(
            Snapshot.empty(handle),
            idx_in.uid_validity,
            idx_in.uid_next,
            True,
            highest_modseq=idx_in.highest_modseq,
        )
