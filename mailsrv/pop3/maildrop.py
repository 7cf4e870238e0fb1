"""
A POP3 session's maildrop (RFC 1939 8: the INBOX as it was at login, with
the messages marked for deletion, expunged at QUIT), the realm's avatar
factory that opens it, and the locks that keep a second session out.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.cred.error import LoginDenied
from twisted.internet import defer
from twisted.mail.interfaces import IMailboxPOP3
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.interfaces import SEEN, FolderError, MessageInfo
from mailsrv.logsafe import SafeLogger
from mailsrv.store.names import INBOX, normalize_user


class MaildropInUse(LoginDenied):
    """Another POP3 session holds this maildrop (RFC 2449 8.1.1 IN-USE)."""


class MaildropLocks:
    """
    Which maildrops have a POP3 session, so that a second one is refused.
    One object is shared by the pop3 and pop3s listeners.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()

    def acquire(self, user: str) -> bool:
        if user in self._held:
            return False
        self._held.add(user)
        return True

    def release(self, user: str) -> None:
        self._held.discard(user)

    def held(self, user: str) -> bool:
        return user in self._held


def uidl(info: MessageInfo, uid_validity: int) -> bytes:
    """The unique-id listing of a message: Dovecot's C{%08Xu%08Xv}, stable while UIDs are."""
    return b"%08X%08X" % (info.uid, uid_validity)


@implementer(IMailboxPOP3)
class Maildrop:
    """
    One POP3 session's maildrop: the INBOX as it was at login, with the
    messages marked for deletion. Mail delivered later is neither shown nor
    touched; QUIT expunges the marked messages by UID.
    """

    log = SafeLogger()

    def __init__(self, folder: Any, release: Callable[[], None]) -> None:
        self.folder = folder  # IFolder
        self.user: str = folder.user
        self.uid_validity: int = folder.uid_validity
        self.infos: list[MessageInfo] = folder.messages()
        self.deleted: set[int] = set()  # 0-based indexes
        self.retrieved: set[int] = set()  # 0-based indexes of messages sent by RETR
        self._release: Callable[[], None] | None = release
        self._busy: defer.Deferred | None = None

    # --- our API --------------------------------------------------------------

    def info(self, index: int) -> MessageInfo:
        """The message at 0-based C{index}; IndexError if none, KeyError if deleted."""
        if index < 0:
            raise IndexError(index)
        info = self.infos[index]
        if index in self.deleted:
            raise KeyError(index)
        return info

    def numbered(self, column: str) -> Any:
        """(1-based number, C{uid} or C{size}) of the messages not marked deleted (an iterator)."""
        infos = self.infos
        values = getattr(infos, column + "s", None)  # an InfoList's array: no MessageInfo made
        if values is None:
            values = [getattr(m, column) for m in infos]
        deleted = self.deleted
        return ((i + 1, v) for i, v in enumerate(values) if not deleted or i not in deleted)

    def live(self) -> list[tuple[int, MessageInfo]]:
        """(1-based number, info) of the messages not marked deleted."""
        return [(i + 1, m) for i, m in enumerate(self.infos) if i not in self.deleted]

    def commit(self) -> defer.Deferred:
        """
        The UPDATE state: expunge the marked messages, then flag the retrieved
        ones \\Seen (as Dovecot does, so IMAP shows them read). Fires with the
        UIDs removed.
        """
        uids = [self.infos[i].uid for i in sorted(self.deleted)]
        seen = {self.infos[i].uid for i in self.retrieved if i not in self.deleted}

        def expunge(_: Any) -> Any:
            # A rebuilt index renumbers the folder: the UIDs of the login no
            # longer name the messages DELE'd, so remove nothing (RFC 1939 6: -ERR).
            if self.folder.uid_validity != self.uid_validity:
                raise FolderError("UIDVALIDITY changed since login")
            return self.folder.expunge(uids)

        d: defer.Deferred = (
            defer.maybeDeferred(self.folder.refresh).addCallback(expunge)
            if uids
            else defer.succeed([])
        )
        if seen:
            d.addCallback(self._mark_seen, seen)
        self._busy = d

        def done(result: Any) -> Any:
            self._busy = None
            return result

        return d.addBoth(done)

    def _mark_seen(self, removed: list[int], uids: set[int]) -> defer.Deferred:
        def changes(_: Any) -> Any:
            # On the flags as they are then, in the folder's order: an IMAP
            # session's change between our reading and our writing is kept.
            live = {m.uid for m in self.folder.messages() if m.uid in uids and SEEN not in m.flags}
            return self.folder.change_flags(sorted(live), add=frozenset({SEEN})) if live else None

        def failed(f: Failure) -> None:
            # The deletions are done; a flag is not worth an -ERR.
            self.log.failure("pop3 could not flag messages seen for {user}", f, user=self.user)

        d = defer.maybeDeferred(self.folder.refresh).addCallback(changes)
        return d.addErrback(failed).addCallback(lambda _: removed)

    def logout(self) -> None:
        """End the session: close the folder and free the maildrop, after any expunge."""
        if self._busy is not None:
            self._busy.addBoth(self._close_after)
        else:
            self._close()

    def _close_after(self, result: Any) -> Any:
        self._close()
        return result

    def _close(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        try:
            self.folder.close()
        finally:
            release()

    # --- twisted.mail's IMailboxPOP3 ------------------------------------------

    def listMessages(self, index: int | None = None) -> Any:
        if index is None:
            return [0 if i in self.deleted else m.size for i, m in enumerate(self.infos)]
        try:
            return self.info(index).size
        except KeyError:
            return 0
        except IndexError:
            raise ValueError(index)

    def getMessage(self, index: int) -> Any:
        try:
            return self.folder.open_message(self.info(index).uid)
        except (IndexError, KeyError):
            raise ValueError(index)

    def getUidl(self, index: int) -> bytes:
        try:
            return uidl(self.info(index), self.uid_validity)
        except (IndexError, KeyError):
            raise ValueError(index)

    def deleteMessage(self, index: int) -> None:
        try:
            self.info(index)
        except (IndexError, KeyError):
            raise ValueError(index)
        self.deleted.add(index)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> defer.Deferred:
        return self.commit()


def open_maildrop(store: Any, locks: MaildropLocks, user: str) -> defer.Deferred:
    """The realm's POP3 avatar factory: lock the user's maildrop and open the INBOX."""
    user = normalize_user(user)
    if not locks.acquire(user):
        return defer.fail(MaildropInUse("maildrop in use"))
    d = defer.maybeDeferred(store.open_folder, user, INBOX)

    def opened(folder: Any) -> Maildrop:
        return Maildrop(folder, partial(locks.release, user))

    def failed(f: Failure) -> Failure:
        locks.release(user)
        return f

    return d.addCallbacks(opened, failed)
