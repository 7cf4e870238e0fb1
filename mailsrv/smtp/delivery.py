"""
Where accepted mail goes: the recipient and sender policy of the MX and of
submission (Twisted's L{IMessageDelivery}); the message being received is
L{mailsrv.smtp.message.IncomingMessage}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.mail import smtp
from zope.interface import implementer

from mailsrv import replies, routing
from mailsrv.addresses.resolver import ExpansionBudget
from mailsrv.interfaces import PasswordDatabaseError
from mailsrv.replies import SMTPReplyError
from mailsrv.smtp import received
from mailsrv.smtp.message import IncomingMessage, describe_failure, router_for, routes_of


def _address(value: Any) -> str:
    """Our addresses are str; accept Twisted's Address/User too."""
    if isinstance(value, str):
        return value
    return str(value)


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
        self.router = router_for(ctx)
        self.routes_of: dict[str, routing.Resolution] = {}  # this transaction's, by address
        # What this transaction may still spend on alias expansion (reactor time).
        self._budget = ExpansionBudget.for_transaction()

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
        self.routes_of.clear()
        self._budget = ExpansionBudget.for_transaction()
        return origin

    def validateTo(self, user):
        """
        Accept a recipient or raise L{SMTPReplyError}. The callable returned
        makes its message; its C{address} is the one to deliver to (a local
        user's stored spelling, whatever the case the client sent).
        """
        address = self.check_recipient(_address(user))
        routes, quotas = routes_of(self.routes_of[address]), getattr(self.ctx, "quota", None)
        if quotas is not None and len(routes) == 1 and isinstance(routes[0], routing.Mailbox):
            return quotas.refuse_if_full(routes[0].user, _Recipient(self, address))  # 452 4.2.2
        return _Recipient(self, address)

    def check_recipient(self, address: str) -> str:
        """
        Route C{address} (L{routing.Router}): return the address to deliver
        to (a single local user's stored spelling; else C{address}), or
        raise L{SMTPReplyError} with the reply the routing step gave.
        """
        if self.sender and self.router.is_srs_address(address):
            # Our SRS addresses are for bounces, sent from <> (RFC 3464 2; RFC 5321 4.5.5).
            raise SMTPReplyError(replies.SRS_BOUNCES_ONLY, cause=f"from <{self.sender}>")
        resolution = self.router.resolve(address, may_relay=self.may_relay, budget=self._budget)
        if isinstance(resolution, routing.Refused):
            raise SMTPReplyError(resolution.reply, cause=resolution.cause)
        if len(resolution) == 1 and isinstance(resolution[0], routing.Mailbox):
            # The user's own address in another case is that user's: one
            # recipient, however it was spelt. An alias (or a domain alias) of
            # the user stays as given: the Received field's "for" and the log
            # name what the client sent, and do not disclose where it leads.
            if _same_address(address, resolution[0].user):
                address = resolution[0].user
        self.routes_of[address] = resolution
        return address

    def new_message(
        self,
        sender: str,
        recipients: list[str],
        trace: bytes,
        client: str,
        queue_id: str | None = None,
        helo: str | None = None,
        client_name: str | None = None,
    ) -> IncomingMessage:
        """Start receiving a message for C{recipients}."""
        if queue_id is None:
            queue_id = received.new_queue_id(self.ctx.reactor.seconds())
        resolved = [
            (
                r,
                routes_of(
                    self.routes_of.get(r) or self.router.resolve(r, may_relay=self.may_relay)
                ),
            )
            for r in recipients
        ]
        routes = [route for _, rs in resolved for route in rs]
        return IncomingMessage(
            self.ctx,
            queue_id=queue_id,
            sender=sender,
            recipients=recipients,
            trace=trace,
            submission=self.submission,
            client=client,
            routes=routes,
            user=self.user if self.submission else None,
            router=self.router,
            helo=helo,
            client_name=client_name,
            list_recipients=[r for r, rs in resolved if _through_lists(rs)],
        )


class InboundDelivery(BaseDelivery):
    """The MX: mail for local users only, from anyone; never a relay."""

    _spf: Any = None  # the SPF evaluation the last MAIL started

    def validateFrom(self, helo, origin):
        """The sender; SPF starts now, and may refuse it (C{[policy] spf_reject}, mailsrv.authres)."""
        origin = super().validateFrom(helo, origin)
        authentication = getattr(self.ctx, "authentication", None)
        if authentication is None:
            return origin
        name, ip = (_text(part) for part in (helo or (b"", b"")))
        if not authentication.spf_reject and self._spf is not None and not self._spf.done:
            # One evaluation at a time per session: MAIL after RSET without
            # end must not queue lookups without end (before every message's
            # checks); this sender's starts at the end of DATA, if it gets there.
            return origin
        self._spf = authentication.spf(ip, name, self.sender or "")
        refusal = authentication.mail(ip, name, self.sender or "")
        return origin if refusal is None else refusal.addCallback(lambda _: origin)


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
        # RFC 6409 6.1: the user's own address, or one of ours that reaches only it.
        try:
            owned = bool(address) and self.router.owned_by(address, self.user or "")
        except PasswordDatabaseError as e:
            raise SMTPReplyError(replies.LOCAL_ERROR, cause=str(e))  # "try again"
        if not owned:
            raise SMTPReplyError(replies.SENDER_NOT_OWNED)
        # The user's stored spelling: bounces reach the user's own mailbox.
        self.sender = self.user if _same_address(address, self.user or "") else address
        self.routes_of.clear()
        self._budget = ExpansionBudget.for_transaction()
        return origin


def _text(value: Any) -> str:
    """A HELO name or client address as Twisted keeps it (bytes or None) as text."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return "" if value is None else str(value)


def _through_lists(routes: Sequence[routing.Route]) -> bool:
    """Whether a recipient is a list alias: each of its routes goes through a list."""
    return bool(routes) and all(getattr(r, "mailing_list", None) for r in routes)


def _same_address(a: str, b: str) -> bool:
    """Case-insensitive, as Postfix's smtpd_sender_login_maps lookups are."""
    return a.lower().rstrip(".") == b.lower().rstrip(".")


__all__ = [
    "BaseDelivery",
    "InboundDelivery",
    "IncomingMessage",
    "SubmissionDelivery",
    "describe_failure",
]
