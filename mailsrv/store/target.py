"""
The mail store as a delivery target (L{IDeliveryTarget}): routed mail for
local mailboxes (L{mailsrv.routing.Mailbox}) is stored through it, each copy
with its C{Return-Path:} field first (L{mailsrv.returnpath}), using only
the store's public L{IMailStore.deliver}.
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv import replies
from mailsrv.interfaces import FolderError, IDelivery, IDeliveryTarget, IMailStore
from mailsrv.replies import ReplyError
from mailsrv.returnpath import ReturnPathSource
from mailsrv.routing import INBOX, Mailbox, Route
from mailsrv.store import quota
from mailsrv.store.names import canonical_folder, split_user


@implementer(IDeliveryTarget)
class MailboxTarget:
    """The local mailboxes of an L{IMailStore}."""

    def __init__(self, store: IMailStore, quotas: quota.Quotas | None = None) -> None:
        self.store = store
        self.quotas = quotas  # the users' storage limits ([quota]); None: no limits

    def start(self, sender: str) -> MailboxDelivery:
        return MailboxDelivery(self.store, sender or "", self.quotas)


@implementer(IDelivery)
class MailboxDelivery:
    """
    One message for some local mailboxes. The store writes a copy durably
    when asked to, so nothing is written before L{commit}: L{abort} only
    forgets. At commit the copies are stored side by side; concurrent
    deliveries to one folder share the store's lock and fsync.
    """

    def __init__(self, store: IMailStore, sender: str, quotas: quota.Quotas | None = None) -> None:
        self.store = store
        self.sender = sender
        self.quotas = quotas
        self.recipients: dict[Mailbox, None] = {}
        self.source: Any = None
        self.state = "open"

    def add_recipient(self, recipient: Route) -> None:
        self._check_open()
        if not isinstance(recipient, Mailbox):
            raise TypeError(f"not a local mailbox: {recipient!r}")
        problem = _unusable(recipient.user, recipient.folder)
        if problem is not None:
            raise ReplyError(replies.MAILBOX_NAME_NOT_ALLOWED, cause=problem)
        self.recipients[recipient] = None

    def body(self, source: Any) -> None:
        self._check_open()
        self.source = source

    def commit(self) -> defer.Deferred:
        self._check_open()
        self.state = "committed"
        if not self.recipients:
            return defer.succeed(None)
        if self.source is None:
            return defer.fail(ValueError("commit before body"))
        if len(self.recipients) == 1:
            [only] = self.recipients
            return self._store(only)  # IMailStore.deliver fires with None
        copies = [self._store(r) for r in self.recipients]
        return defer.DeferredList(copies, consumeErrors=True).addCallback(_first_failure)

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"
            self.source = None

    def _store(self, r: Mailbox) -> defer.Deferred:
        """A copy for C{r}, unless it would take its user over quota (L{quota.QuotaExceeded})."""
        d = quota.check(self.quotas, r.user, quota.size_of(self.source))
        return d.addCallback(lambda _: self._store_copy(r))

    def _store_copy(self, r: Mailbox) -> defer.Deferred:
        source = ReturnPathSource(self.sender, self.source)
        if r.detail is not None and r.folder == INBOX and _unusable(r.user, r.detail) is None:
            # Sub-addressing: alice+lists@ is filed in "lists" when alice has
            # such a folder (the store refuses a folder that does not exist,
            # and never makes one), else in the INBOX.
            d = self._deliver(r.user, source, r.detail)

            def no_such_folder(f: Failure) -> defer.Deferred:
                f.trap(FolderError)
                return self._deliver(r.user, source, r.folder)

            return d.addErrback(no_such_folder)
        return self._deliver(r.user, source, r.folder)

    def _deliver(self, user: str, source: Any, folder: str) -> defer.Deferred:
        if folder == INBOX:
            return defer.maybeDeferred(self.store.deliver, user, source, self.sender)
        return defer.maybeDeferred(self.store.deliver, user, source, self.sender, folder)

    def _check_open(self) -> None:
        if self.state != "open":
            raise RuntimeError(f"delivery already {self.state}")


@functools.lru_cache(maxsize=4096)
def _unusable(user: str, folder: str) -> str | None:
    """
    Why no mailbox can be named C{user}, C{folder}, or None. A pure function
    of the names, remembered: the same few users get mail again and again.
    """
    try:
        split_user(user)
        if folder != INBOX:
            canonical_folder(folder)
    except (ValueError, FolderError) as e:
        return str(e)
    return None


def _first_failure(results: list[tuple[bool, Any]]) -> Failure | None:
    """None once every copy is stored, else the first copy's failure."""
    for ok, value in results:
        if not ok:
            return value
    return None
