"""
The outbound part of the server inside one process: the queue the SMTP
server fills and the relayer beside it. The daemon runs the relayer in a
process of its own instead (L{mailsrv.outbound.process}); this in-process
form serves tests and programs that embed the server.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer

from mailsrv.localdelivery import LocalDelivery
from mailsrv.outbound.build import build_relayer, mx_resolver
from mailsrv.outbound.relayer import Relayer


class OutboundService(service.Service):
    """Starts the relayer (resuming the queue on disk) and stops it cleanly."""

    def __init__(self, relayer: Relayer) -> None:
        self.relayer = relayer
        self.setName("outbound")

    def startService(self) -> None:
        super().startService()
        self._started = self.relayer.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        d = self._started
        return d.addBoth(lambda _: self.relayer.stop())


def outbound_service(
    ctx: Any,
    *,
    resolver: Any = None,
    trust_root: Any = None,
    scan_interval: float = 5.0,
) -> OutboundService:
    """
    Build the relayer's service, working through C{ctx.queue}.
    C{resolver} replaces the DNS resolver built from C{[dns] nameservers};
    C{trust_root} the platform's CAs for the "verify" TLS policy (tests).
    """
    config = ctx.config
    queue = ctx.queue
    queue.cleanup()  # start-up: nothing is being queued yet
    relayer = build_relayer(
        config,
        queue=queue,
        reactor=ctx.reactor,
        threadpool=ctx.threadpool,
        resolver=mx_resolver(config, ctx.reactor, resolver),
        mailboxes=None
        if ctx.store is None
        else LocalDelivery(ctx.store, getattr(ctx, "quota", None)),
        passwords=ctx.passwords,
        addresses=getattr(ctx, "addresses", None),
        scan_interval=scan_interval,
        trust_root=trust_root,
    )
    return OutboundService(relayer)
