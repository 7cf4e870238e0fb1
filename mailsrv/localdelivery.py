"""
Final delivery into a local mailbox of a message from the queue (a bounce,
a retried local delivery) for the in-process relayer: each copy goes
through the store's delivery target (L{mailsrv.store.target}), which gives
it its C{Return-Path:} field (RFC 5321 4.4) and is the one caller of
L{IMailStore.deliver}. The relay process's copies take the same path in the
server (L{mailsrv.outbound.process}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsrv import routing
from mailsrv.interfaces import IDeliveryTarget, IMailStore
from mailsrv.replies import ReplyError
from mailsrv.returnpath import ReturnPathSource
from mailsrv.store.quota import QuotaExceeded, Quotas
from mailsrv.store.target import MailboxTarget

__all__ = ["LocalDelivery", "ReturnPathSource", "deliver"]


def deliver(
    target: IDeliveryTarget, route: routing.Route, source: Any, sender: str
) -> defer.Deferred:
    """
    Deliver C{source} from C{sender} to C{route} (a L{routing.Mailbox})
    through C{target}: fires once the copy is durable, or fails, and then
    nothing was written.
    """
    delivery = target.start(sender)
    try:
        delivery.add_recipient(route)
        delivery.body(source)
    except Exception:
        delivery.abort()
        return defer.fail()
    return delivery.commit()


class LocalDelivery:
    """
    The local mailboxes as the in-process relayer reaches them
    (L{mailsrv.outbound.local.Mailboxes}): a copy for C{user}'s INBOX.
    """

    def __init__(self, store: IMailStore, quotas: Quotas | None = None) -> None:
        self.target = MailboxTarget(store, quotas)

    def deliver(self, user: str, source: Any, sender: str) -> defer.Deferred:
        d = deliver(self.target, routing.queued_mailbox(user), source, sender)
        return d.addErrback(_as_store_error)


def _as_store_error(failure: Failure) -> Failure:
    """
    A name no mailbox can have, refused by the target, fails as the store
    itself fails for it: a ValueError saying why (what the relayer records).
    """
    error = failure.value
    if isinstance(error, ReplyError) and error.cause and not isinstance(error, QuotaExceeded):
        raise ValueError(error.cause)
    return failure
