"""
The message being received (Twisted's L{IMessage}): its lines counted
against the size limit, its header scanned and trimmed, streamed into a
spool, put through the checks at the end of DATA (L{mailsrv.smtp.checks}),
and handed to the store for each local mailbox and to the queue for the
others, as the routing step sent each recipient.
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
from mailsrv.authres import header as authres_header
from mailsrv.filter import step as filter_step
from mailsrv.logsafe import SafeLogger
from mailsrv.outbound.target import QueueTarget
from mailsrv.policy.duplicates import BodyDigest
from mailsrv.replies import Reply, SMTPReplyError
from mailsrv.returnpath import PrefixSource
from mailsrv.smtp import checks as message_checks
from mailsrv.smtp import received
from mailsrv.smtp.sendas import FromField
from mailsrv.spool import SpooledSource, disk_full
from mailsrv.store.quota import QuotaExceeded
from mailsrv.store.target import MailboxTarget

# RFC 5322 3.6.8 field-name: printable ASCII except ':'.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


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
        user: str | None = None,
        router: routing.Router | None = None,
        helo: str | None = None,
        client_name: str | None = None,
        list_recipients: Sequence[str] = (),
    ) -> None:
        self.ctx = ctx
        self.queue_id = queue_id
        self.sender = sender
        self.recipients = recipients
        self.router = router if router is not None else router_for(ctx)
        if routes is None:
            routes = [
                route
                for r in recipients
                for route in routes_of(self.router.resolve(r, may_relay=submission))
            ]
        self.routes = routes  # where each recipient goes, decided by the routing step
        self.user = user  # the logged-in user of a submission client
        self._mailboxes: dict[str, routing.Mailbox] = {}  # the local copies, by label
        self.submission = submission
        self.client = client
        self.helo = helo  # the name the client gave in HELO/EHLO
        self.client_name = client_name  # its forward-confirmed reverse DNS name
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
        self._message_id: bytes | None = None  # for the log's "ID: message-id=" line
        self._from = FromField()  # for the send-as check
        self._in_from = False
        self._trace_size = len(trace)
        self._source.write(trace)
        # The spam filter step (not for submission clients: README, [filter]).
        self._filter = None if submission else getattr(ctx, "filter", None)
        # [policy] duplicate mail: this message's check, its body hashed as it streams in.
        duplicates = getattr(ctx, "duplicates", None)
        self._duplicates = None if duplicates is None else duplicates.message(list_recipients)
        self._body = None if self._duplicates is None else self._duplicates.body
        self._list_id_to: BodyDigest | None = None  # in a List-Id field: where its value goes
        # The checks at the end of DATA (mailsrv.smtp.checks), in order.
        self._checks = message_checks.message_checks(ctx, submission, self._duplicates)
        # Authentication-Results fields from outside go when ours is added (RFC 8601 5).
        self._authenticating = not submission and getattr(ctx, "authentication", None) is not None
        self._verdict = filter_step.ACCEPTED  # what they said together
        self._started = ctx.reactor.seconds()  # for the delivery lines' delay=
        self._log_client()

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
        if self._body is not None and not self._in_headers:
            self._body.update(line + b"\n")
        self._source.write(line + b"\n")

    def body_received(self, data: bytes, octets: int) -> None:
        """Body lines in bulk, unstuffed, LF line ends; C{octets} as received."""
        self.octets += octets
        if self.error is not None:
            return
        if self.octets > self._max_size:
            self.fail(replies.MESSAGE_TOO_BIG)
            return
        if self._body is not None:
            self._body.update(data)
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
        if self._checks:
            envelope = filter_step.Envelope(
                self.queue_id,
                self.sender,
                tuple(self.recipients),
                self.client,
                helo=self.helo,
                user=self.user,
                client_name=self.client_name,
            )
            d = message_checks.run_checks(self._checks, self._source, envelope)
            return d.addCallback(self._screened)
        return self._deliver()

    def _screened(self, verdict: filter_step.Verdict) -> defer.Deferred:
        """Deliver as the checks' verdict says, or refuse."""
        self._verdict = verdict
        if verdict.reply is not None:
            self._source.discard()
            raise SMTPReplyError(verdict.reply, cause=f"message checks: {verdict.action}")
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
            if self._in_from:
                self._from.add(line)
            if self._list_id_to is not None:
                self._list_id_to.list_id_field(line)
            return not self._dropping  # RFC 5322 2.2.3 folded continuation
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")  # RFC 5322 4.5.3 obsolete WSP before ':'
        if colon and _FIELD_NAME.fullmatch(name):
            self._in_field = True
            lname = name.lower()
            self._seen.add(lname)
            # RFC 5321 4.4: Return-Path is added at final delivery only; one
            # from the client is dropped, as Postfix's message_drop_headers does.
            self._dropping = (
                lname == b"return-path"
                or (self._filter is not None and filter_step.is_filter_field(lname))
                or (self._authenticating and authres_header.dropped_field(lname))
            )
            self._in_from = lname == b"from" and self.user is not None
            if self._in_from:
                self._from.add(line.partition(b":")[2])
            self._list_id_to = self._body if lname == b"list-id" else None
            if self._list_id_to is not None:
                self._list_id_to.list_id_field(line.partition(b":")[2])
            if lname == b"message-id" and self._message_id is None:
                self._message_id = line.partition(b":")[2].strip()[:998]
            if lname == b"received":
                self._received += 1
                if self._received > self._max_received:
                    self.fail(replies.TOO_MANY_HOPS)  # RFC 5321 6.3
            return self.error is None and not self._dropping
        self._end_headers(blank_line_follows=(line == b""))
        return True

    def _end_headers(self, blank_line_follows: bool) -> None:
        self._in_headers = False
        self._in_from = False
        if self.user is not None:
            self._check_from()
        if self.submission:
            # RFC 6409 8.2, 8.3: the MSA may add Date and Message-ID.
            now = self.ctx.reactor.seconds()
            if b"date" not in self._seen:
                self._source.write(f"Date: {received.rfc5322_date(now)}\n".encode())
            if b"message-id" not in self._seen:
                mid = received.message_id(now, self.ctx.config.server.hostname)
                self._source.write(f"Message-ID: {mid}\n".encode())
                self._message_id = mid.encode()
        if self._message_id:
            self.log.info(
                "{queue_id}: message-id={message_id}",
                queue_id=self.queue_id,
                message_id=self._message_id,
            )
        if not blank_line_follows:
            self._source.write(b"\n")

    def _check_from(self) -> None:
        """A submission client may claim in C{From:} only its own addresses."""
        assert self.user is not None
        claim = self._from.check(self.router, self.user)
        if claim is not None:
            self.fail(claim.reply)
            self.log.info(
                "{queue_id}: From: <{address}> refused: {why}",
                queue_id=self.queue_id,
                address=claim.address,
                why=claim.cause,
            )

    # delivery

    def _deliver(self) -> defer.Deferred:
        """
        Deliver by route: one delivery per local mailbox (each user once,
        however many recipients reach it), and one queue file per kind of
        relayed copy (as sent; forwarded with an SRS sender; through a list,
        one per remote domain).
        """
        refused = [r for r in self.routes if isinstance(r, routing.Refused)]
        if refused:
            return defer.fail(SMTPReplyError(refused[0].reply, cause=refused[0].cause))
        attempts: list[defer.Deferred] = []
        labels: list[str] = []
        self._mailboxes.clear()
        users: set[str] = set()
        # (forwarded, list, domain) -> its copies: a list's copies are one
        # queue file per remote domain (each domain retried on its own).
        relayed: dict[tuple[bool, str | None, str | None], dict[str, routing.Relay]] = {}
        addresses: set[str] = set()  # each address at another server once, in any group
        mailboxes = MailboxTarget(self.ctx.store, getattr(self.ctx, "quota", None))
        for route in self.routes:
            if isinstance(route, routing.Mailbox):
                key = route.user  # the stored spelling: one per user
                if key in users:
                    continue  # one copy for a user reached twice
                users.add(key)
                route = filter_step.filed(route, self._verdict)
                source = self._source_for(route.mailing_list)
                attempts.append(self._commit(mailboxes, [route], source, self.sender))
                labels.append(route.user)
                self._mailboxes[route.user] = route
            elif isinstance(route, routing.Relay):
                key = _relay_key(route.address)
                if key in addresses:
                    continue  # one copy for an address reached twice (the first route's)
                addresses.add(key)
                domain = routing.domain_of(route.address) if route.mailing_list else None
                group = relayed.setdefault((route.forwarded, route.mailing_list, domain), {})
                group[route.address] = route
        queued_one = False
        for (forwarded, mailing_list, _), group in relayed.items():
            routes = list(group.values())
            if self.ctx.queue is None:
                attempts.append(defer.fail(RuntimeError("no outbound queue")))
            else:
                sender = self.router.forward_sender(self.sender) if forwarded else self.sender
                source = self._source_for(mailing_list)
                # The first queued copy keeps the id the message came in under.
                target = QueueTarget(
                    self.ctx.queue,
                    smtputf8=self.smtputf8,
                    signer=self._signer(),
                    queue_id=None if queued_one else self.queue_id,
                )
                queued_one = True
                attempts.append(self._commit(target, routes, source, sender))
            labels.append("queue:" + ",".join(r.address for r in routes))
        d = defer.DeferredList(attempts, consumeErrors=True)
        d.addCallback(self._delivered, labels)
        d.addBoth(self._cleanup)
        return d

    def _signer(self) -> Any:
        """
        The DKIM signer for this message's queued copies: only mail an
        authenticated user submitted is signed here, never mail merely
        relayed or forwarded (it keeps its own signatures).
        """
        return getattr(self.ctx, "dkim", None) if self.user is not None else None

    def _source_for(self, mailing_list: str | None) -> Any:
        """The message as a copy through C{mailing_list} is sent: with its List-Id."""
        list_id = self.router.list_id(mailing_list)
        fields = self._verdict.headers  # the checks' (mailsrv.smtp.checks)
        if list_id is not None and b"list-id" not in self._seen:
            fields = f"List-Id: {list_id}\n".encode() + fields  # RFC 2919
        if not fields:
            return self._source
        # Below our Received field, which stays with the trace block.
        return PrefixSource(fields, self._source, after=self._trace_size)

    def _commit(
        self,
        target: MailboxTarget | QueueTarget,
        routes: Sequence[routing.Route],
        source: Any = None,
        sender: str | None = None,
    ) -> defer.Deferred:
        """Deliver the message to C{routes} through C{target}, in its two phases."""
        delivery = target.start(self.sender if sender is None else sender)
        try:
            for route in routes:
                delivery.add_recipient(route)
            delivery.body(self._source if source is None else source)
        except Exception:
            delivery.abort()
            return defer.fail()
        return delivery.commit()

    def _delivered(self, results: list[tuple[bool, Any]], labels: list[str]) -> Any:
        failed = [(label, r) for label, (ok, r) in zip(labels, results, strict=True) if not ok]
        done = [label for label, (ok, _) in zip(labels, results, strict=True) if ok]
        stored = [label for label in done if label in self._mailboxes]
        for label, failure in failed:
            if failure.check(QuotaExceeded):  # the user's doing, not a fault: no traceback
                self.log.info("{queue_id}: {why}", queue_id=self.queue_id, why=failure.value.cause)
                continue
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
                return self._queue_local_retry(retry, results, labels, stored)
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
            elif all(f.check(QuotaExceeded) for _, f in failed):
                reply = replies.MAILBOX_FULL  # RFC 3463 3.3: 4.2.2 mailbox full
            self._log_sent(stored)
            raise SMTPReplyError(reply, cause="delivery failed")
        return self._log_accepted(_queue_ids(results, labels), stored)

    def _queue_local_retry(
        self,
        retry: list[str],
        results: list[tuple[bool, Any]],
        labels: list[str],
        stored: list[str],
    ) -> defer.Deferred:
        # The relayer's local delivery adds the Return-Path field. Each copy
        # as it was to be stored: one queue file per list (its List-Id).
        by_list: dict[str | None, list[routing.Relay]] = {}
        for user in retry:
            route = self._mailboxes[user]
            by_list.setdefault(route.mailing_list, []).append(routing.retry_via_queue(route))
        target = QueueTarget(self.ctx.queue)
        d = defer.gatherResults(
            [
                self._commit(target, relays, self._source_for(mailing_list))
                for mailing_list, relays in by_list.items()
            ],
            consumeErrors=True,
        )
        d.addErrback(_first_error)

        def queued(retry_ids: list[str]) -> str:
            self.log.warn(
                "{queue_id}: local delivery to {rcpts} failed; queued as {retry_id} for retry",
                queue_id=self.queue_id,
                rcpts=retry,
                retry_id=",".join(retry_ids),
            )
            return self._log_accepted(_queue_ids(results, labels), stored)

        def not_queued(failure: Failure) -> None:
            self.log.failure(
                "{queue_id}: queueing {rcpts} for retry failed; the client's retry will "
                "deliver it again to the others",
                failure=failure,
                queue_id=self.queue_id,
                rcpts=retry,
            )
            self._log_sent(stored)
            reply = replies.STORAGE_FULL if disk_full(failure.value) else replies.LOCAL_ERROR
            raise SMTPReplyError(reply, cause="delivery failed")

        return d.addCallbacks(queued, not_queued)

    def _log_client(self) -> None:
        """Postfix's first line about a message: who sent it (and as which user)."""
        self.log.info(
            "{queue_id}: client={client_name}[{client}]"
            + (", sasl_username={user}" if self.user is not None else ""),
            queue_id=self.queue_id,
            client_name=self.client_name or "unknown",
            client=self.client,
            user=self.user,
        )

    def _log_sent(self, users: list[str]) -> None:
        """The relay process's C{to=} line, for each mailbox stored during the session."""
        delay = self.ctx.reactor.seconds() - self._started
        for user in users:
            self.log.info(
                "{text}",
                text=f"{self.queue_id}: to=<{user}>, relay=local, delay={delay:.2f}, "
                "dsn=2.0.0, status=sent (delivered to mailbox)",
                queue_id=self.queue_id,
                rcpt=user,
                relay="local",
                delay=delay,
                status="2.0.0",
                result="sent",
                reply="delivered to mailbox",
            )

    def _log_accepted(self, outbound: Any, stored: list[str]) -> str:
        """The C{from=} and C{accepted} lines, then a C{to=} line per mailbox stored."""
        recipients = ",".join(f"<{r}>" for r in self.recipients)
        self.log.info(
            "{text}",
            text=f"{self.queue_id}: from=<{self.sender}>, size={self.octets}, "
            f"nrcpt={len(self.recipients)} (queue active)",
            queue_id=self.queue_id,
            sender=self.sender,
            size=self.octets,
            nrcpt=len(self.recipients),
        )
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
        self._log_sent(stored)
        return self.queue_id

    def _cleanup(self, result: Any) -> Any:
        self._source.discard()
        return result


def router_for(ctx: Any) -> routing.Router:
    """The routing step for this server."""
    return routing.Router(
        is_local_domain=ctx.config.is_local_domain,
        passwords=ctx.passwords,
        queue=ctx.queue,
        addresses=getattr(ctx, "addresses", None),
    )


def routes_of(resolution: routing.Resolution) -> Sequence[routing.Route]:
    """A resolution as a list of routes (a refusal is one)."""
    return [resolution] if isinstance(resolution, routing.Refused) else resolution


def _queue_ids(results: list[tuple[bool, Any]], labels: list[str]) -> str | None:
    """The ids of the queue files written for a message, for its log line."""
    ids = [
        str(value)
        for label, (ok, value) in zip(labels, results, strict=True)
        if ok and label.startswith("queue:")
    ]
    return ",".join(ids) or None


def _first_error(failure: Failure) -> Failure:
    """The failure of the first of several attempts (L{defer.gatherResults})."""
    failure.trap(defer.FirstError)
    assert isinstance(failure.value, defer.FirstError)
    return failure.value.subFailure


def _relay_key(address: str) -> str:
    """
    An address at another server as duplicates are found: the domain in
    any case, the local part as it is (RFC 5321 2.4: only its own server
    may treat it as case-insensitive).
    """
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower().rstrip('.')}"


def _disk_error_reply(error: OSError) -> Reply:
    """452 4.3.1 for a full disk (RFC 3463), else 451 4.3.0."""
    return replies.STORAGE_FULL if disk_full(error) else replies.LOCAL_ERROR


def describe_failure(failure: Failure) -> Reply:
    """The reply for a failed delivery: the error's own, or 451 4.3.0."""
    if isinstance(failure.value, SMTPReplyError):
        return failure.value.reply
    return replies.LOCAL_ERROR
