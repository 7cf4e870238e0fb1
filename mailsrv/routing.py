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

Where the next features plug in, all inside L{Router.route}, so both callers
get them at once:

  - aliases and forwarding: rewrite the address (to one or more addresses,
    local or remote) before the local-user lookup; a route then becomes a
    list of routes;
  - Sieve (fileinto, reject): choose L{Mailbox.folder}, or give L{Refused},
    after the user is known; for the relayer's local deliveries in
    L{queued_mailbox};
  - policy verdicts (block lists, quotas, DNSBL): give L{Refused} with the
    policy's reply, before or after the lookup.

Routing is synchronous and reads only cached state (the password database
keeps its file in memory): it runs on the reactor thread at RCPT time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailsrv import replies
from mailsrv.interfaces import IOutboundQueue, IPasswordDatabase, PasswordDatabaseError
from mailsrv.replies import Reply, ReplyError

INBOX = "INBOX"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """Store the message in C{user}'s C{folder}."""

    user: str  # the stored spelling of the user's address
    folder: str = INBOX

    @property
    def address(self) -> str:
        """The address that names this recipient (the envelope's, in the queue)."""
        return self.user


@dataclass(frozen=True, slots=True)
class Relay:
    """Queue the message for C{address}, at another server."""

    address: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Do not take the message for this recipient: tell the client C{reply}."""

    reply: Reply
    cause: str | None = None  # for the log only


Route = Mailbox | Relay | Refused


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Router:
    """
    The routing decisions for one server: which domains are local, who the
    local users are, whether there is an outbound queue to relay through.
    """

    def __init__(
        self,
        *,
        is_local_domain: Callable[[str], bool],
        passwords: IPasswordDatabase,
        queue: IOutboundQueue | None,
    ) -> None:
        self.is_local_domain = is_local_domain
        self.passwords = passwords
        self.queue = queue

    def route(self, address: str, *, may_relay: bool) -> Route:
        """
        Where mail for C{address} goes. C{may_relay}: the client may send to
        other domains (an authenticated submission client); the MX may not,
        and is never an open relay.
        """
        if self.is_local_domain(domain_of(address)):
            return self._local_user(address)
        if not may_relay:
            return Refused(replies.RELAY_DENIED)
        if self.queue is None:
            return Refused(replies.RELAY_UNAVAILABLE, cause="no outbound queue")
        return Relay(address)

    def route_queued(self, address: str) -> Route:
        """
        Where a queued recipient (or the sender a DSN goes back to) goes when
        the relayer delivers it: as L{route} for a client that may relay (the
        message was taken for it already), its refusals in the queue's words
        (L{replies.QUEUED_NO_SUCH_USER}, L{replies.QUEUED_USERS_UNAVAILABLE}),
        which its records and DSNs show.
        """
        route = self.route(address, may_relay=True)
        if isinstance(route, Refused):
            reply = _QUEUED_WORDING.get(route.reply)
            if reply is not None:
                return Refused(reply, route.cause)
        return route

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
