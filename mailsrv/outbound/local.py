"""
Local delivery from the queue: the recipients of a queued message (and the
senders of DSNs) that the routing step (L{mailsrv.routing.Router.route_queued})
sends to a mailbox here get their copy in it. Only the server process writes
mailboxes (one writer per file), so the relay process hands each copy to it
over AMP (L{ServerMailboxes}, C{DeliverLocal}); the in-process relayer gives
it to the store's delivery target (L{mailsrv.localdelivery.LocalDelivery}).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.protocols import amp

from mailsrv import routing
from mailsrv.outbound import ipc
from mailsrv.outbound.client import RemoteReply
from mailsrv.outbound.envelope import Envelope, Recipient
from mailsrv.outbound.queue import FileSource, OutboundQueue
from mailsrv.outbound.results import Results
from mailsrv.replies import MAILBOX_FULL
from mailsrv.store.quota import over_quota


def recipient_domain(address: str) -> str:
    """The domain of C{address}, lower case, without a trailing dot."""
    return address.rpartition("@")[2].rstrip(".").lower()


# What the relayer hands local delivery: a mailbox here, or a refusal.
LocalRoute = routing.Mailbox | routing.Refused


class Mailboxes(Protocol):
    """Where local copies go: C{deliver} stores C{source} in C{user}'s INBOX."""

    def deliver(self, user: str, source: Any, sender: str) -> defer.Deferred: ...


class LocalRecipients:
    """Delivers to the local users among a message's recipients; see the module docstring."""

    def __init__(self, *, queue: OutboundQueue, mailboxes: Mailboxes, results: Results) -> None:
        self.queue = queue
        self.mailboxes = mailboxes
        self.results = results

    @defer.inlineCallbacks
    def deliver(self, env: Envelope, routed: Sequence[tuple[Recipient, LocalRoute]]):
        """
        Deliver C{env} to its recipients the routing step did not send to
        another server: a mailbox gets its copy, a refusal is the result;
        each recorded before the next.
        """
        source = self.queue.message_source(env)
        for r, route in routed:
            if isinstance(route, routing.Refused):
                # No such user (bounced), or a local problem such as an
                # unreadable user database (logged by it): try again later.
                reply = RemoteReply(route.reply.code, route.reply.line().decode())
                self.results.record(env, r, reply, "", "local")
                continue
            try:
                yield self.mailboxes.deliver(route.user, source, env.sender)
            except Exception as e:
                reply = RemoteReply(451, f"4.3.0 local delivery failed: {e}")
                if over_quota(e):  # deferred, as Postfix's local defers to a full mailbox
                    reply = RemoteReply(MAILBOX_FULL.code, MAILBOX_FULL.line().decode())
                self.results.record(env, r, reply, "", "local")
            else:
                self.results.record(
                    env, r, RemoteReply(250, "2.0.0 delivered to mailbox"), "", "local"
                )
                # Recorded before the next mailbox: a crash in between must not
                # deliver this copy again.
                yield self.results.checkpoint(env, [r])
        yield self.results.checkpoint(env, [r for r, _ in routed])


class ServerMailboxes:
    """
    The server's mailboxes as the relay process reaches them: only the server
    writes mailboxes (and their indexes), so local deliveries go through it.
    """

    def __init__(self, proto: amp.AMP, reactor: Any, pool: Any, queue: OutboundQueue) -> None:
        """C{proto} is the relay process's end of the pipes to the server."""
        self.proto = proto
        self.reactor = reactor
        self.pool = pool
        self.queue = queue

    def deliver(self, user: str, source: Any, sender: str) -> defer.Deferred:
        if isinstance(source, FileSource):
            return self.proto.callRemote(
                ipc.DeliverLocal,
                recipient=user,
                sender=sender or "",
                size=source.size,
                path=str(source.path),
                offset=source.offset,
            )
        return self._deliver_bytes(user, source, sender)

    @defer.inlineCallbacks
    def _deliver_bytes(self, user: str, source: Any, sender: str):
        """A message made here (a DSN): in the command when it fits, else in a queue file."""
        with source.open() as f:  # in memory
            data = f.read()
        if ipc.fits(data):
            yield self.proto.callRemote(
                ipc.DeliverLocal, recipient=user, sender=sender or "", size=len(data), data=data
            )
            return
        path = yield deferToThreadPool(self.reactor, self.pool, self._write_temp, data)
        try:
            yield self.proto.callRemote(
                ipc.DeliverLocal, recipient=user, sender=sender or "", size=len(data), path=path
            )
        finally:
            yield deferToThreadPool(self.reactor, self.pool, Path(path).unlink, True)

    def _write_temp(self, data: bytes) -> str:
        return str(self.queue.write_temp(data, "local"))  # 0600, like every file the server writes
