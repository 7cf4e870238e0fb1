"""
Where accepted mail goes: the recipient and sender policy of the MX and of
submission (Twisted's L{IMessageDelivery}), and the message being received
(L{IMessage}), streamed into a spool and handed to the store and the queue.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv import replies, routing
from mailsrv.logsafe import SafeLogger
from mailsrv.outbound.target import QueueTarget
from mailsrv.replies import Reply, SMTPReplyError
from mailsrv.smtp import received
from mailsrv.spool import SpooledSource, disk_full
from mailsrv.store.target import MailboxTarget

# RFC 5322 3.6.8 field-name: printable ASCII except ':'.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def _address(value: Any) -> str:
    """Our addresses are str; accept Twisted's Address/User too."""
    if isinstance(value, str):
        return value
    return str(value)


@implementer(smtp.IMessage)
class IncomingMessage:
    """
    One message in DATA, for all its recipients: lines are counted against
    the size limit, scanned for trace and origination headers, and written
    to a L{SpooledSource}. At the end the message goes where the routing
    step sent each recipient (C{routes}, decided at RCPT): through the
    store's delivery target for each local mailbox, and through the queue's
    for the others.
    """

    log = SafeLogger()

    def __init__(
        self,
        ctx: Any,
        *,
        queue_id: str,
        sender: str,
        recipients: list[str],
        trace: bytes,
        submission: bool,
        client: str,
        routes: Sequence[routing.Route] | None = None,
    ) -> None:
        self.ctx = ctx
        self.queue_id = queue_id
        self.sender = sender
        self.recipients = recipients
        if routes is None:
            router = _router(ctx)
            routes = [router.route(r, may_relay=submission) for r in recipients]
        self.routes = routes  # where each recipient goes, decided by the routing step
        self._mailboxes: dict[str, routing.Mailbox] = {}  # the local copies, by label
        self.submission = submission
        self.client = client
        self.smtputf8 = False  # received with SMTPUTF8 (RFC 6531): kept in the queue
        self.octets = 0
        self.error: Reply | None = None
        self._max_size = ctx.config.limits.max_message_size
        self._max_received = ctx.config.limits.max_received_headers
        self._source = SpooledSource(ctx.config.spool_dir)
        self._in_headers = True
        self._in_field = False
        self._dropping = False  # in a header field that is not kept
        self._received = 0
        self._seen: set[bytes] = set()
        self._source.write(trace)

    # IMessage

    def lineReceived(self, line: bytes) -> None:
        """One line of the message, dot-unstuffed, without its CRLF."""
        self.octets += len(line) + 2
        if self.error is not None:
            return
        if self.octets > self._max_size:
            # RFC 1870 6.3: keep reading, refuse after the final dot.
            self.fail(replies.MESSAGE_TOO_BIG)
            return
        if self._in_headers and not self._header_line(line):
            return
        self._source.write(line + b"\n")

    def body_received(self, data: bytes, octets: int) -> None:
        """Body lines in bulk, unstuffed, LF line ends; C{octets} as received."""
        self.octets += octets
        if self.error is not None:
            return
        if self.octets > self._max_size:
            self.fail(replies.MESSAGE_TOO_BIG)
            return
        self._source.write(data)

    @property
    def in_headers(self) -> bool:
        """Whether the header block is still being read."""
        return self._in_headers

    def eomReceived(self) -> defer.Deferred:
        """Deliver; fire once every copy is durable, or fail with L{SMTPReplyError}."""
        if self.error is not None:
            return defer.fail(SMTPReplyError(self.error))
        if self._in_headers:
            self._end_headers(blank_line_follows=False)
        self._source.finish()
        if self._source.error is not None:
            self.log.error(
                "{queue_id}: cannot spool the message: {error}",
                queue_id=self.queue_id,
                error=str(self._source.error),
            )
            return defer.fail(SMTPReplyError(_disk_error_reply(self._source.error)))
        return self._deliver()

    def connectionLost(self) -> None:
        """The client went away in DATA: forget the message."""
        self._source.discard()

    # what the protocol adds

    def fail(self, reply: Reply) -> None:
        """Refuse the message with C{reply} after the final dot; stop keeping it."""
        if self.error is None:
            self.error = reply
            self._source.discard()

    @property
    def size(self) -> int:
        return self._source.size

    # headers

    def _header_line(self, line: bytes) -> bool:
        """Note a header line; whether it is kept."""
        if line[:1] in (b" ", b"\t") and self._in_field:
            return not self._dropping  # RFC 5322 2.2.3 folded continuation
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")  # RFC 5322 4.5.3 obsolete WSP before ':'
        if colon and _FIELD_NAME.fullmatch(name):
            self._in_field = True
            lname = name.lower()
            self._seen.add(lname)
            # RFC 5321 4.4: Return-Path is added at final delivery only; one
            # from the client is dropped, as Postfix's message_drop_headers does.
            self._dropping = lname == b"return-path"
            if lname == b"received":
                self._received += 1
                if self._received > self._max_received:
                    self.fail(replies.TOO_MANY_HOPS)  # RFC 5321 6.3
            return self.error is None and not self._dropping
        self._end_headers(blank_line_follows=(line == b""))
        return True

    def _end_headers(self, blank_line_follows: bool) -> None:
        self._in_headers = False
        if self.submission:
            # RFC 6409 8.2, 8.3: the MSA may add Date and Message-ID.
            now = self.ctx.reactor.seconds()
            if b"date" not in self._seen:
                self._source.write(f"Date: {received.rfc5322_date(now)}\n".encode())
            if b"message-id" not in self._seen:
                mid = received.message_id(now, self.ctx.config.server.hostname)
                self._source.write(f"Message-ID: {mid}\n".encode())
        if not blank_line_follows:
            self._source.write(b"\n")

    # delivery

    def _deliver(self) -> defer.Deferred:
        """Deliver by route: one delivery per local mailbox, one queue file for the rest."""
        refused = [r for r in self.routes if isinstance(r, routing.Refused)]
        if refused:
            return defer.fail(SMTPReplyError(refused[0].reply, cause=refused[0].cause))
        attempts: list[defer.Deferred] = []
        labels: list[str] = []
        self._mailboxes.clear()
        relayed: list[routing.Relay] = []
        mailboxes = MailboxTarget(self.ctx.store)
        for route in self.routes:
            if isinstance(route, routing.Mailbox):
                attempts.append(self._commit(mailboxes, [route]))
                labels.append(route.user)
                self._mailboxes[route.user] = route
            elif isinstance(route, routing.Relay):
                relayed.append(route)
        if relayed:
            if self.ctx.queue is None:
                attempts.append(defer.fail(RuntimeError("no outbound queue")))
            else:
                target = QueueTarget(self.ctx.queue, smtputf8=self.smtputf8)
                attempts.append(self._commit(target, relayed))
            labels.append("queue:" + ",".join(r.address for r in relayed))
        d = defer.DeferredList(attempts, consumeErrors=True)
        d.addCallback(self._delivered, labels)
        d.addBoth(self._cleanup)
        return d

    def _commit(
        self, target: MailboxTarget | QueueTarget, routes: Sequence[routing.Route]
    ) -> defer.Deferred:
        """Deliver the message to C{routes} through C{target}, in its two phases."""
        delivery = target.start(self.sender)
        try:
            for route in routes:
                delivery.add_recipient(route)
            delivery.body(self._source)
        except Exception:
            delivery.abort()
            return defer.fail()
        return delivery.commit()

    def _delivered(self, results: list[tuple[bool, Any]], labels: list[str]) -> Any:
        failed = [(label, r) for label, (ok, r) in zip(labels, results, strict=True) if not ok]
        done = [label for label, (ok, _) in zip(labels, results, strict=True) if ok]
        for label, failure in failed:
            self.log.failure(
                "delivery of {queue_id} to {target} failed",
                failure=failure,
                queue_id=self.queue_id,
                target=label,
            )
        if failed:
            retry = [label for label, _ in failed if not label.startswith("queue:")]
            if done and len(retry) == len(failed) and self.ctx.queue is not None:
                # Some copies are stored already: a 451 would make the client
                # send them again. Queue the rest; the relayer retries locally.
                return self._queue_local_retry(retry, results, labels)
            if done:
                self.log.warn(
                    "{queue_id}: delivered to {done} before a failure; the client's retry "
                    "will deliver it again there",
                    queue_id=self.queue_id,
                    done=done,
                )
            reply = replies.LOCAL_ERROR
            if any(disk_full(f.value) for _, f in failed):
                reply = replies.STORAGE_FULL  # RFC 3463 4.3.1
            raise SMTPReplyError(reply, cause="delivery failed")
        outbound = None
        if labels and labels[-1].startswith("queue:"):
            outbound = results[-1][1]
        return self._log_accepted(outbound)

    def _queue_local_retry(
        self, retry: list[str], results: list[tuple[bool, Any]], labels: list[str]
    ) -> defer.Deferred:
        # The relayer's local delivery adds the Return-Path field.
        relays = [routing.retry_via_queue(self._mailboxes[user]) for user in retry]
        d = self._commit(QueueTarget(self.ctx.queue), relays)

        def queued(retry_id: str) -> str:
            self.log.warn(
                "{queue_id}: local delivery to {rcpts} failed; queued as {retry_id} for retry",
                queue_id=self.queue_id,
                rcpts=retry,
                retry_id=retry_id,
            )
            outbound = results[-1][1] if labels[-1].startswith("queue:") else None
            return self._log_accepted(outbound)

        def not_queued(failure: Failure) -> None:
            self.log.failure(
                "{queue_id}: queueing {rcpts} for retry failed; the client's retry will "
                "deliver it again to the others",
                failure=failure,
                queue_id=self.queue_id,
                rcpts=retry,
            )
            reply = replies.STORAGE_FULL if disk_full(failure.value) else replies.LOCAL_ERROR
            raise SMTPReplyError(reply, cause="delivery failed")

        return d.addCallbacks(queued, not_queued)

    def _log_accepted(self, outbound: Any) -> str:
        recipients = ",".join(f"<{r}>" for r in self.recipients)
        # One line per message: the text is built here with an f-string (~1 us)
        # rather than by twisted.logger's formatter in the text observer (~6 us
        # a field); the named fields stay in the event for other observers.
        self.log.info(
            "{text}",
            text=f"accepted {self.queue_id} from=<{self.sender}> to={recipients} "
            f"size={self.octets} client={self.client} queued={outbound}",
            queue_id=self.queue_id,
            sender=self.sender,
            recipients=recipients,
            size=self.octets,
            client=self.client,
            outbound=outbound,
        )
        return self.queue_id

    def _cleanup(self, result: Any) -> Any:
        self._source.discard()
        return result


class _Recipient:
    """What L{IMessageDelivery.validateTo} returns: builds a one-recipient message."""

    def __init__(self, delivery: BaseDelivery, address: str) -> None:
        self.delivery = delivery
        self.address = address

    def __call__(self) -> IncomingMessage:
        return self.delivery.new_message(self.delivery.sender or "", [self.address], b"", "unknown")


@implementer(smtp.IMessageDelivery)
class BaseDelivery:
    """The sender and recipient policy shared by the MX and submission."""

    submission = False
    may_relay = False  # whether mail for other domains is taken (to the queue)

    def __init__(self, ctx: Any, user: str | None = None) -> None:
        self.ctx = ctx
        self.user = user
        self.sender: str | None = None
        self.router = _router(ctx)
        self._routes: dict[str, routing.Route] = {}  # this transaction's, by address

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        """A plain C{Received:} field for Twisted's own DATA path (ours adds more)."""
        name, ip = helo if helo else (b"", b"")
        now = self.ctx.reactor.seconds()
        rcpts = [_address(r) for r in recipients]
        return received.received_header(
            helo=(name or b"").decode("ascii", "replace"),
            client_ip=(ip or b"").decode("ascii", "replace") if isinstance(ip, bytes) else str(ip),
            client_name=None,
            hostname=self.ctx.config.server.hostname,
            protocol="ESMTP",
            queue_id=received.new_queue_id(now),
            recipient=rcpts[0] if len(rcpts) == 1 else None,
            tls_info=None,
            now=now,
        ).rstrip(b"\n")

    def validateFrom(self, helo, origin):
        """
        Accept C{origin} or raise L{SMTPReplyError}; returns the address.
        C{sender} is then the envelope sender to use.
        """
        self.sender = _address(origin)
        self._routes.clear()
        return origin

    def validateTo(self, user):
        """
        Accept a recipient or raise L{SMTPReplyError}. The callable returned
        makes its message; its C{address} is the one to deliver to (a local
        user's stored spelling, whatever the case the client sent).
        """
        return _Recipient(self, self.check_recipient(_address(user)))

    def check_recipient(self, address: str) -> str:
        """
        Route C{address} (L{routing.Router}): return the address to deliver
        to, or raise L{SMTPReplyError} with the reply the routing step gave.
        """
        route = self.router.route(address, may_relay=self.may_relay)
        if isinstance(route, routing.Refused):
            raise SMTPReplyError(route.reply, cause=route.cause)
        self._routes[route.address] = route
        return route.address

    def new_message(
        self,
        sender: str,
        recipients: list[str],
        trace: bytes,
        client: str,
        queue_id: str | None = None,
    ) -> IncomingMessage:
        """Start receiving a message for C{recipients}."""
        if queue_id is None:
            queue_id = received.new_queue_id(self.ctx.reactor.seconds())
        routes = [
            self._routes.get(r) or self.router.route(r, may_relay=self.may_relay)
            for r in recipients
        ]
        return IncomingMessage(
            self.ctx,
            queue_id=queue_id,
            sender=sender,
            recipients=recipients,
            trace=trace,
            submission=self.submission,
            client=client,
            routes=routes,
        )


class InboundDelivery(BaseDelivery):
    """The MX: mail for local users only, from anyone; never a relay."""


class SubmissionDelivery(BaseDelivery):
    """
    The avatar of an authenticated submission client (RFC 6409): mail from
    its own address, to anyone; local recipients must exist.
    """

    submission = True
    may_relay = True

    def __init__(self, ctx: Any, user: str) -> None:
        super().__init__(ctx, user)

    def validateFrom(self, helo, origin):
        address = _address(origin)
        if not address or not _same_address(address, self.user or ""):
            raise SMTPReplyError(replies.SENDER_NOT_OWNED)  # RFC 6409 6.1
        # The user's stored spelling: bounces reach the user's own mailbox.
        self.sender = self.user
        self._routes.clear()
        return origin


def _router(ctx: Any) -> routing.Router:
    """The routing step for this server."""
    return routing.Router(
        is_local_domain=ctx.config.is_local_domain, passwords=ctx.passwords, queue=ctx.queue
    )


def _disk_error_reply(error: OSError) -> Reply:
    """452 4.3.1 for a full disk (RFC 3463), else 451 4.3.0."""
    return replies.STORAGE_FULL if disk_full(error) else replies.LOCAL_ERROR


def _same_address(a: str, b: str) -> bool:
    """Case-insensitive, as Postfix's smtpd_sender_login_maps lookups are."""
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def describe_failure(failure: Failure) -> Reply:
    """The reply for a failed delivery: the error's own, or 451 4.3.0."""
    if isinstance(failure.value, SMTPReplyError):
        return failure.value.reply
    return replies.LOCAL_ERROR
