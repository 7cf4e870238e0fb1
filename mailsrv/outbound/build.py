"""
Building the relayer: L{build_relayer} is the one place where its parts
(results, remote and local delivery, bounces, the schedule, the routing
step that says which recipients are local) are put together, for the relay
process (with its own password file), the in-process outbound service and
tests.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mailsrv.addresses.resolver import AddressRules
from mailsrv.config import Config
from mailsrv.dkim.signer import load_signer
from mailsrv.interfaces import IPasswordDatabase
from mailsrv.outbound.bounces import Bounces
from mailsrv.outbound.local import LocalRecipients, Mailboxes
from mailsrv.outbound.mx import MXResolver, listening_addresses, make_resolver
from mailsrv.outbound.queue import OutboundQueue
from mailsrv.outbound.relayer import Relayer
from mailsrv.outbound.remote import RemoteDelivery
from mailsrv.outbound.results import Results
from mailsrv.outbound.schedule import RetrySchedule
from mailsrv.routing import Router


def mx_resolver(config: Config, reactor: Any, dns: Any = None) -> MXResolver:
    """
    The MX lookups of C{config}: through C{dns} (a twisted.names resolver),
    by default one asking C{[dns] nameservers}; never a hop that is this
    server's own SMTP listener.
    """
    if dns is None:
        dns = make_resolver(config.dns.nameservers, reactor)
    return MXResolver(dns, config.relay.port, listening_addresses(config.listen.get("smtp", ())))


def queued_router(
    config: Config,
    *,
    queue: OutboundQueue,
    passwords: IPasswordDatabase | None,
    local: bool,
    addresses: AddressRules | None = None,
) -> Router:
    """
    The routing step as the relayer asks it (L{Router.route_queued}): the
    local domains of C{config} with C{passwords}' users (None: every
    address is a user of that spelling), the rest through C{queue}.
    Without C{local} mailboxes here it knows no local domain: every
    recipient goes to another server.
    """
    return Router(
        is_local_domain=config.is_local_domain if local else _no_local_domain,
        passwords=_EveryAddress() if passwords is None else passwords,
        queue=queue,
        addresses=addresses if local else None,
    )


def _no_local_domain(domain: str) -> bool:
    return False


@implementer(IPasswordDatabase)
class _EveryAddress:
    """No user database given (tests): every local address is a user of that spelling."""

    def lookup(self, address: str) -> str:
        return address

    def has_user(self, address: str) -> bool:
        return True

    def verify(self, address: str, password: str) -> defer.Deferred:
        return defer.succeed(False)  # never a login: the relayer only routes


def build_relayer(
    config: Config,
    *,
    queue: OutboundQueue,
    reactor: Any,
    threadpool: Any,
    resolver: Any = None,
    mailboxes: Mailboxes | None = None,
    passwords: IPasswordDatabase | None = None,
    router: Router | None = None,
    addresses: AddressRules | None = None,
    schedule: RetrySchedule | None = None,
    scan_interval: float = 5.0,
    trust_root: Any = None,
) -> Relayer:
    """
    The relayer of C{queue}. C{threadpool} runs its disk work (None: in line,
    for tests on a fake clock). C{resolver} finds a domain's hops (an
    L{MXResolver} or a fake with its C{resolve}; by default
    L{mx_resolver}). C{mailboxes} take the local recipients' copies (None:
    no local delivery, every recipient is remote); C{passwords} give a local
    address's user (None: the address as it is); C{router}, the routing
    step, defaults to L{queued_router}'s (with the address rules
    C{addresses}, None: users only). C{schedule} defaults to
    C{[relay]}'s; C{trust_root} replaces the platform's CAs for the "verify"
    TLS policy (tests).
    """
    if resolver is None:
        resolver = mx_resolver(config, reactor)
    if schedule is None:
        schedule = RetrySchedule.from_config(config.relay)
    results = Results(queue, reactor, threadpool)
    local = None
    if mailboxes is not None:
        local = LocalRecipients(queue=queue, mailboxes=mailboxes, results=results)
    if router is None:
        router = queued_router(
            config,
            queue=queue,
            passwords=passwords,
            local=local is not None,
            addresses=addresses,
        )
    return Relayer(
        config=config,
        queue=queue,
        reactor=reactor,
        results=results,
        remote=RemoteDelivery(
            config=config,
            queue=queue,
            reactor=reactor,
            resolver=resolver,
            results=results,
            trust_root=trust_root,
        ),
        local=local,
        router=router,
        bounces=Bounces(
            config=config,
            queue=queue,
            reactor=reactor,
            results=results,
            local=local,
            router=router,
            signer=load_signer(config, results.in_pool),
        ),
        schedule=schedule,
        scan_interval=scan_interval,
    )
