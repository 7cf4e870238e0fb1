"""
Bounces: the delivery status notifications (RFC 3464) the relayer sends to
a message's envelope sender when recipients failed for good or are delayed.
L{mailsrv.outbound.dsn} builds the report; this sends it, into the sender's
mailbox when the routing step routes the sender to one, else through the
queue. A message from the null sender <> is never bounced (RFC 5321 4.5.5:
no bounce of a bounce).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer

from mailsrv import routing
from mailsrv.config import Config
from mailsrv.dkim.signer import DkimSigner
from mailsrv.outbound import dsn
from mailsrv.outbound.envelope import Envelope, Recipient
from mailsrv.outbound.local import LocalRecipients
from mailsrv.outbound.queue import OutboundQueue
from mailsrv.outbound.results import Results, relayer_logger
from mailsrv.spool import BytesSource


class Bounces:
    """Sends DSNs to envelope senders; see the module docstring."""

    def __init__(
        self,
        *,
        config: Config,
        queue: OutboundQueue,
        reactor: Any,
        results: Results,
        local: LocalRecipients | None,
        router: routing.Router,
        signer: DkimSigner | None = None,
    ) -> None:
        """
        C{local} None: no local mailboxes here, every DSN goes through the
        queue. C{router}: the routing step, which says where the sender is.
        C{signer}: DKIM-signs the DSNs that go through the queue (RFC 6376),
        by the key of their From: domain (the server's host name).
        """
        self.config = config
        self.queue = queue
        self.reactor = reactor
        self.results = results
        self.local = local
        self.router = router
        self.signer = signer
        self.log = relayer_logger(self)

    @defer.inlineCallbacks
    def notify(
        self, env: Envelope, rcpts: Sequence[Recipient], action: str, retry_until: float | None
    ):
        """Send a DSN to the envelope sender; never for mail from <> (no bounce of a bounce)."""
        who = ", ".join(r.address for r in rcpts)
        if not env.sender:
            self.log.info(
                "{queue_id}: not sending a {action} DSN for <{rcpts}>: the sender "
                "is <> (a bounce is never bounced); dropped",
                queue_id=env.id,
                action=action,
                rcpts=who,
            )
            return

        def headers() -> bytes:
            with self.queue.open_message(env) as f:
                return dsn.read_headers(f)

        original = yield self.results.in_pool(headers)
        report = dsn.build_dsn(
            hostname=self.config.server.hostname,
            envelope=env,
            recipients=rcpts,
            action=action,
            original_headers=original,
            now=self.reactor.seconds(),
            retry_until=retry_until,
        )
        source = BytesSource(report)
        sender = env.sender
        try:
            route = self.router.route_queued(sender)  # the one routing step
            if isinstance(route, routing.Refused):
                if not route.reply.permanent:
                    raise routing.RefusedError(route)  # a local problem: try again later
                self.log.warn(
                    "{queue_id}: {action} DSN for unknown local sender <{sender}> dropped",
                    queue_id=env.id,
                    action=action,
                    sender=sender,
                )
                return
            if isinstance(route, routing.Mailbox):
                assert self.local is not None  # the router has local domains only with it
                yield self.local.mailboxes.deliver(route.user, source, "")
                where = "mailbox"
            else:
                # Where routing sends it: the sender, or the original sender
                # behind an SRS address of ours. RFC 6533: a DSN naming a UTF-8
                # address needs SMTPUTF8 on its way.
                if self.signer is not None:
                    source = yield self.signer.sign(source)
                where = yield self.queue.enqueue(
                    "", [route.address], source, smtputf8=dsn.is_international(env, rcpts)
                )
        except Exception as e:
            self.log.error(
                "{queue_id}: could not send the {action} DSN to <{sender}>: {why}",
                queue_id=env.id,
                action=action,
                sender=sender,
                why=str(e),
            )
            raise
        self.log.info(
            "{queue_id}: sender {action} notification to <{sender}> ({where}) for <{rcpts}>",
            queue_id=env.id,
            action=action,
            sender=sender,
            where=where,
            rcpts=who,
        )
