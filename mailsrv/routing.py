"""
The routing step: the one place that decides, for each recipient of a
message, where it goes. A recipient is routed to

  - L{Mailbox}: a local user's folder (the user named by its stored
    spelling, whatever the case the client sent), stored through the mail
    store's delivery target (L{mailsrv.store.target});
  - L{Relay}: the outbound queue, for the relayer to deliver to another
    server (L{mailsrv.outbound.target});
  - L{Refused}: not at all, with the L{Reply} the client is given (and a
    cause for the log only).

Its callers: SMTP intake (L{mailsrv.smtp.delivery}: at RCPT, for the MX and
for submission; the message is then delivered by route), the relayer
(L{mailsrv.outbound.relayer}, L{mailsrv.outbound.bounces}: L{Router.route_queued}
for each queued recipient and each DSN's sender: a mailbox here, another
server, or a refusal recorded as the attempt's result) and the server's end
of the relay process's local deliveries (L{mailsrv.outbound.process}),
which store what the relayer routed to a mailbox.

The address rules (L{mailsrv.addresses.resolver}: aliases, domain aliases,
sub-addressing, postmaster and abuse, catch-alls, SRS) are part of this
step: one address may stand for several routes (L{Router.resolve}); each
copy forwarded to another server is marked (L{Relay.forwarded}) to be sent
with an SRS sender, and each copy through a list alias names its list
(C{mailing_list}), which the duplicate-mail defences let through.

Where the next features plug in, all inside L{Router.resolve}, so every
caller gets them at once:

  - Sieve (fileinto, reject, redirect): choose L{Mailbox.folder}, give
    L{Refused}, or add routes, after the user is known;
  - policy verdicts (block lists, quotas, DNSBL): give L{Refused} with the
    policy's reply, before or after the lookup.

Routing is synchronous and reads only cached state (the password database
keeps its file in memory): it runs on the reactor thread at RCPT time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailsrv import replies
from mailsrv.addresses.resolver import AddressRules, ExpansionBudget
from mailsrv.interfaces import IOutboundQueue, IPasswordDatabase, PasswordDatabaseError
from mailsrv.logsafe import SafeLogger
from mailsrv.replies import Reply, ReplyError

INBOX = "INBOX"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """
    Store the message in C{user}'s C{folder}; with a C{detail} (the
    sub-address of C{alice+lists@}), in the folder of that name when it
    exists.
    """

    user: str  # the stored spelling of the user's address
    folder: str = INBOX
    detail: str | None = None
    mailing_list: str | None = None  # the list alias it was reached through

    @property
    def address(self) -> str:
        """The address that names this recipient (the envelope's, in the queue)."""
        return self.user


@dataclass(frozen=True, slots=True)
class Relay:
    """
    Queue the message for C{address}, at another server; C{forwarded}: it
    was sent to one of our addresses and goes on (an alias, a returning SRS
    bounce), so the copy gets an SRS envelope sender.
    """

    address: str
    forwarded: bool = False
    mailing_list: str | None = None  # the list alias it was reached through


@dataclass(frozen=True, slots=True)
class Refused:
    """Do not take the message for this recipient: tell the client C{reply}."""

    reply: Reply
    cause: str | None = None  # for the log only


Route = Mailbox | Relay | Refused
#: What one recipient address stands for: its routes, or a refusal.
Resolution = tuple[Mailbox | Relay, ...] | Refused


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Router:
    """
    The routing decisions for one server: which domains are local, who the
    local users are, the address rules (None: users only), whether there is
    an outbound queue to relay through.
    """

    log = SafeLogger()

    def __init__(
        self,
        *,
        is_local_domain: Callable[[str], bool],
        passwords: IPasswordDatabase,
        queue: IOutboundQueue | None,
        addresses: AddressRules | None = None,
    ) -> None:
        self.is_local_domain = is_local_domain
        self.passwords = passwords
        self.queue = queue
        self.addresses = addresses

    def resolve(
        self, address: str, *, may_relay: bool, budget: ExpansionBudget | None = None
    ) -> Resolution:
        """
        Where mail for C{address} goes: its routes (several for an alias), or
        a refusal. C{may_relay}: the client may send to other domains (an
        authenticated submission client); the MX may not, and is never an
        open relay. Mail to one of our addresses that the rules forward to
        another server (an alias, a returning SRS bounce) goes there whoever
        sent it. C{budget}: what the client's transaction may still spend on
        alias expansion (L{ExpansionBudget}); past it, 452 4.5.3.
        """
        rules = self.addresses
        if rules is None:
            route = self._plain(address, may_relay)
            return route if isinstance(route, Refused) else (route,)
        domain = domain_of(address)
        if not (rules.is_local_domain(domain) or rules.is_srs_address(address)):
            return self._remote(address, may_relay)
        result = rules.resolve(address, self.passwords, budget)
        if result.temporary is not None:
            return Refused(replies.LOCAL_ERROR, cause=result.temporary)
        if result.error_kind == "budget":
            return Refused(replies.TOO_MANY_RECIPIENTS, cause=result.error)  # RFC 5321 4.5.3.1.10
        if result.error is not None:
            self.log.warn("<{address}> refused: {why}", address=address, why=result.error)
            reply = replies.BAD_SRS_ADDRESS if result.error_kind == "srs" else replies.ALIAS_LOOP
            if result.error_kind == "syntax":
                reply = replies.NO_SUCH_USER
            return Refused(reply, cause=result.error)
        if result.unknown and result.finals:
            self.log.warn(
                "<{address}>: alias members that are nobody, skipped: {unknown}",
                address=address,
                unknown=", ".join(result.unknown),
            )
        if not result.finals:
            return Refused(replies.NO_SUCH_USER)  # RFC 5321 3.3, 550 5.1.1
        routes: list[Mailbox | Relay] = []
        for f in result.finals:
            if f.local:
                routes.append(Mailbox(f.address, INBOX, f.detail, f.mailing_list))
            elif self.queue is None:
                return Refused(replies.RELAY_UNAVAILABLE, cause="no outbound queue")
            else:
                routes.append(Relay(f.address, f.forwarded, f.mailing_list))
        return tuple(routes)

    def route(self, address: str, *, may_relay: bool) -> Route:
        """
        Where mail for C{address} goes when it stands for one route (a user,
        another server): as L{resolve}, the one route. An address that stands
        for several (an alias with several members) is not one recipient, for
        good (a queued message, or a DSN to a forged sender that is one of our
        list aliases, would otherwise wait in the queue until it expires):
        callers that can take several use L{resolve}.
        """
        resolution = self.resolve(address, may_relay=may_relay)
        if isinstance(resolution, Refused):
            return resolution
        if len(resolution) == 1:
            return resolution[0]
        return Refused(
            replies.NO_SUCH_USER,
            cause=f"{address} stands for {len(resolution)} recipients, not one",
        )

    def route_queued(self, address: str) -> Route:
        """
        Where a queued recipient (or the sender a DSN goes back to) goes when
        the relayer delivers it: as L{route} for a client that may relay (the
        message was taken for it already), its refusals in the queue's words
        (L{replies.QUEUED_NO_SUCH_USER}, L{replies.QUEUED_USERS_UNAVAILABLE}),
        which its records and DSNs show. Queued recipients are final (intake
        followed the aliases): a local user is that user, not an alias of the
        same name again; one that stands for several is refused (L{route}).
        """
        if self.addresses is not None and self.is_local_domain(domain_of(address)):
            try:
                stored = self.passwords.lookup(address)
            except PasswordDatabaseError as e:
                return Refused(replies.QUEUED_USERS_UNAVAILABLE, cause=str(e))
            if stored is not None:
                return Mailbox(stored)
        route = self.route(address, may_relay=True)
        if isinstance(route, Refused):
            reply = _QUEUED_WORDING.get(route.reply)
            if reply is not None:
                return Refused(reply, route.cause)
        elif isinstance(route, Mailbox) and route.detail is not None:
            return Mailbox(route.user)  # the queue keeps addresses only: the INBOX
        return route

    def owned_by(self, address: str, user: str) -> bool:
        """
        Whether the logged-in C{user} may use C{address} as sender (envelope
        and C{From:}): the user's own address, or one of ours that reaches
        only that user. L{PasswordDatabaseError} when that cannot be known now.
        """
        if self.addresses is None:
            return address.lower().rstrip(".") == user.lower().rstrip(".")
        return self.addresses.owned_by(address, user, self.passwords)

    def is_srs_address(self, address: str) -> bool:
        """Whether C{address} has the form of one of our SRS addresses (genuine or not)."""
        return self.addresses is not None and self.addresses.is_srs_address(address)

    def forward_sender(self, sender: str) -> str:
        """The envelope sender of a copy forwarded to another server (SRS)."""
        if self.addresses is None:
            return sender
        return self.addresses.forward_sender(sender)

    def list_id(self, mailing_list: str | None) -> str | None:
        """The List-Id field value for copies through C{mailing_list}, or None."""
        if self.addresses is None:
            return None
        return self.addresses.list_id(mailing_list)

    def _remote(self, address: str, may_relay: bool) -> Resolution:
        if not may_relay:
            return Refused(replies.RELAY_DENIED)
        if self.queue is None:
            return Refused(replies.RELAY_UNAVAILABLE, cause="no outbound queue")
        return (Relay(address),)

    def _plain(self, address: str, may_relay: bool) -> Route:
        """Users only, no address rules."""
        if self.is_local_domain(domain_of(address)):
            return self._local_user(address)
        remote = self._remote(address, may_relay)
        return remote if isinstance(remote, Refused) else remote[0]

    def _local_user(self, address: str) -> Route:
        try:
            stored = self.passwords.lookup(address)
        except PasswordDatabaseError as e:
            # A local problem: "try again", never "no such user".
            return Refused(replies.LOCAL_ERROR, cause=str(e))
        if stored is None:
            return Refused(replies.NO_SUCH_USER)  # RFC 5321 3.3, 550 5.1.1
        return Mailbox(stored)


_QUEUED_WORDING = {
    replies.NO_SUCH_USER: replies.QUEUED_NO_SUCH_USER,
    replies.LOCAL_ERROR: replies.QUEUED_USERS_UNAVAILABLE,
}


class RefusedError(ReplyError):
    """
    A L{Refused} route raised where a refusal travels as an error (a DSN
    that cannot go to its sender now); C{str()} is the cause, for the log and
    the queue's record, as L{ReplyError.cause} is.
    """

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.reply, cause=refused.cause)
        self.refused = refused

    def __str__(self) -> str:
        return self.cause or str(self.reply)


def queued_mailbox(user: str) -> Route:
    """
    Where a queued message for local user C{user} goes when the server
    stores it for the relayer (a retried local delivery, a DSN): the relayer
    routed it to this user's mailbox (L{Router.route_queued}) and names the
    user by its stored spelling.
    """
    return Mailbox(user)


def retry_via_queue(route: Mailbox) -> Relay:
    """
    A local copy that could not be stored while other copies were: it goes
    to the queue, whose relayer stores it later (and adds the Return-Path
    field then). The queue keeps addresses only: the relayer delivers it to
    the user's INBOX.
    """
    return Relay(route.user)
