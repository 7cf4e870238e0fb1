"""
Building the relayer: L{build_relayer} is the one place where its parts
(results, remote and local delivery, bounces, the schedule) are put
together, for the relay process, the in-process outbound service and tests.
"""

from __future__ import annotations

from typing import Any

from mailsrv.config import Config
from mailsrv.interfaces import IPasswordDatabase
from mailsrv.outbound.bounces import Bounces
from mailsrv.outbound.local import LocalRecipients, Mailboxes
from mailsrv.outbound.mx import MXResolver, listening_addresses, make_resolver
from mailsrv.outbound.queue import OutboundQueue
from mailsrv.outbound.relayer import Relayer
from mailsrv.outbound.remote import RemoteDelivery
from mailsrv.outbound.results import Results
from mailsrv.outbound.schedule import RetrySchedule


def mx_resolver(config: Config, reactor: Any, dns: Any = None) -> MXResolver:
    """
    The MX lookups of C{config}: through C{dns} (a twisted.names resolver),
    by default one asking C{[dns] nameservers}; never a hop that is this
    server's own SMTP listener.
    """
    if dns is None:
        dns = make_resolver(config.dns.nameservers, reactor)
    return MXResolver(dns, config.relay.port, listening_addresses(config.listen.get("smtp", ())))


def build_relayer(
    config: Config,
    *,
    queue: OutboundQueue,
    reactor: Any,
    threadpool: Any,
    resolver: Any = None,
    mailboxes: Mailboxes | None = None,
    passwords: IPasswordDatabase | None = None,
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
    address's user (None: the address as it is). C{schedule} defaults to
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
        local = LocalRecipients(
            queue=queue, mailboxes=mailboxes, passwords=passwords, results=results
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
        bounces=Bounces(config=config, queue=queue, reactor=reactor, results=results, local=local),
        schedule=schedule,
        scan_interval=scan_interval,
    )
