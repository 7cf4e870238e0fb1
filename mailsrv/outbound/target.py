"""
The outbound queue as a delivery target (L{IDeliveryTarget}): routed mail
for other servers (L{mailsrv.routing.Relay}) is queued through it, one queue
file for all of a message's recipients, using only the queue's public
L{IOutboundQueue.enqueue}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailsrv import replies
from mailsrv.interfaces import IDelivery, IDeliveryTarget, IOutboundQueue
from mailsrv.replies import ReplyError
from mailsrv.routing import Relay, Route


@implementer(IDeliveryTarget)
class QueueTarget:
    """
    An L{IOutboundQueue}. C{smtputf8}: the messages were received with
    SMTPUTF8 (RFC 6531), which their queue envelopes keep for the relayer.
    C{signer}: a L{mailsrv.dkim.signer.DkimSigner} that DKIM-signs each
    message as it is queued (None: queued as it is).
    """

    def __init__(
        self,
        queue: IOutboundQueue,
        *,
        smtputf8: bool = False,
        signer: Any = None,
        queue_id: str | None = None,
    ) -> None:
        self.queue = queue
        self.smtputf8 = smtputf8
        self.signer = signer
        self.queue_id = queue_id  # the id received under, for the log; None: a new one

    def start(self, sender: str) -> QueueDelivery:
        delivery = QueueDelivery(
            self.queue, sender or "", smtputf8=self.smtputf8, signer=self.signer
        )
        delivery.queue_id = self.queue_id
        return delivery


@implementer(IDelivery)
class QueueDelivery:
    """
    One message for the queue. The queue file is written (fsync, atomic
    rename) only at L{commit}, so L{abort} leaves nothing behind.
    """

    def __init__(
        self, queue: IOutboundQueue, sender: str, *, smtputf8: bool = False, signer: Any = None
    ) -> None:
        self.queue = queue
        self.sender = sender
        self.smtputf8 = smtputf8
        self.signer = signer
        self.recipients: dict[str, None] = {}
        self.source: Any = None
        self.state = "open"
        self.queue_id: str | None = None

    def add_recipient(self, recipient: Route) -> None:
        self._check_open()
        if not isinstance(recipient, Relay):
            raise TypeError(f"not a relayed recipient: {recipient!r}")
        address = recipient.address
        local, _, domain = address.rpartition("@")
        # An envelope line must hold the address whole: a control character
        # (CR, LF, NUL) has no place in an RFC 5321 4.1.2 path.
        if not local or not domain or any(ord(c) < 32 or ord(c) == 127 for c in address):
            raise ReplyError(replies.MAILBOX_NAME_NOT_ALLOWED, cause=f"not an address: {address!r}")
        self.recipients[address] = None

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
        recipients = list(self.recipients)

        def enqueue(source: Any) -> defer.Deferred:
            extra = {} if self.queue_id is None else {"queue_id": self.queue_id}
            return defer.maybeDeferred(
                self.queue.enqueue,
                self.sender,
                recipients,
                source,
                smtputf8=self.smtputf8,
                **extra,
            )

        if self.signer is None:
            return enqueue(self.source)
        return self.signer.sign(self.source).addCallback(enqueue)

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"
            self.source = None

    def _check_open(self) -> None:
        if self.state != "open":
            raise RuntimeError(f"delivery already {self.state}")
