"""
The composition root: builds, once, from a L{Config}, every part the
protocols share (the disk thread pool, the store, the password file and
portal, the login throttle, the outbound queue, TLS, the POP3 maildrop
locks) into one frozen L{ServerContext}, then one listening service per
endpoint around it. Nothing is added to the context afterwards: a factory
reads it, and anything shared is built here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import CollectorRegistry
from twisted.application import service, strports
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailsrv import settingsparts
from mailsrv.addresses.resolver import AddressRules, AliasWatcher, address_rules
from mailsrv.auth.passwd import PasswordFile
from mailsrv.auth.throttle import LoginThrottle
from mailsrv.authres.step import SenderAuthentication, build_authentication
from mailsrv.authres.workers import VerifierService
from mailsrv.config import IMPLICIT_TLS, Config
from mailsrv.dkim.signer import DkimSigner, load_signer
from mailsrv.filter.learn import TrainingQueue
from mailsrv.filter.step import FilterStep, build_filter
from mailsrv.filter.trainers import training_queue
from mailsrv.hangup import HangupService
from mailsrv.imap.server import imap_factory
from mailsrv.interfaces import IMailStore, IOutboundQueue, IPasswordDatabase
from mailsrv.malloc import tune_malloc
from mailsrv.metrics.registry import MailMetrics
from mailsrv.metrics.service import TimedStore, observe_server
from mailsrv.outbound.process import open_queue, relay_process_service
from mailsrv.policy.client import client_checks
from mailsrv.policy.connections import connection_gate
from mailsrv.policy.duplicates import DuplicateMail, build_duplicates
from mailsrv.policy.greylist import Greylist
from mailsrv.policy.greylist_store import build_greylist, greylist_service
from mailsrv.policy.listener import PROTOCOLS, GateFactory, ListenerSettings
from mailsrv.policy.networks import NetworkWatcher
from mailsrv.policy.rates import RateLimits
from mailsrv.pop3 import MaildropLocks, pop3_factory
from mailsrv.reload import Listeners, Reloader
from mailsrv.sdnotify import Notifier, NotifyService
from mailsrv.smtp.server import smtp_factory
from mailsrv.startup import (
    GatedEndpoint,
    RecoveryService,
    StartGate,
    make_data_dirs,
    upgrade_data,
)
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.quota import Quotas
from mailsrv.store.userfeed import UserFeed
from mailsrv.tls import ServerTLS, server_options

log = Logger()

WRITE_BACK_TIMEOUT = 10.0  # seconds the store may take at shutdown for its last writes
DISK_THREADS = 8  # the store's and the password file's thread pool


@dataclass(frozen=True)
class ServerContext:
    """
    Everything a protocol factory needs, built once by L{build_context} and
    passed down; frozen, so that no factory can add to it or change it.
    Tests build their own with fakes; the defaults are what a test may leave
    out (no login throttle, no outbound queue).
    """

    config: Config
    # The running reactor: also IReactorCore, IReactorTCP, IReactorProcess
    # and IReactorFromThreads (a task.Clock or MemoryReactorClock in tests).
    reactor: IReactorTime
    threadpool: ThreadPool
    store: IMailStore
    passwords: IPasswordDatabase
    portal: Portal
    tls: ServerTLS
    throttle: LoginThrottle | None = None
    queue: IOutboundQueue | None = None
    # Which maildrops have a POP3 session, shared by the pop3 and pop3s listeners.
    pop3_locks: MaildropLocks = field(default_factory=MaildropLocks)
    # The address rules (aliases, domain aliases, SRS...); None: users only.
    addresses: AddressRules | None = None
    # Signs submitted mail from the local domains with [dkim] keys; None: none.
    dkim: DkimSigner | None = None
    # The spam filter step at the end of DATA; None: no filter.
    filter: FilterStep | None = None
    # The message and recipient rate limits ([policy]); None: no limits.
    rates: RateLimits | None = None
    # The mass duplicate mail check ([policy] duplicate_recipients); None: none.
    duplicates: DuplicateMail | None = None
    # Spam filter training from IMAP moves into and out of Junk; None: none.
    training: TrainingQueue | None = None
    # Greylisting at RCPT ([policy] greylist); None: off.
    greylist: Greylist | None = None
    # SPF, DKIM, DMARC and ARC of inbound mail ([policy]); None: not checked.
    authentication: SenderAuthentication | None = None
    # The users' storage limits and usage ([quota]); None: no limits.
    quota: Quotas | None = None
    # The server's metrics (mailsrv.metrics), served on [metrics] listen; None: not counted.
    metrics: MailMetrics | None = None
    # The IMAP sessions' subscription changes (RFC 5465 NOTIFY), across reloads.
    subscriptions: UserFeed = field(default_factory=UserFeed)


class ThreadPoolService(service.MultiService):
    """
    The disk thread pool and the services that use it: the pool starts
    before them and stops only once every one of them has stopped (the
    listeners' last deliveries and the relay process's last local
    deliveries still need it) and the store has made its last writes
    (flags of sessions still open, L{IMailStore.write_back}).
    """

    def __init__(self, pool: ThreadPool, store: IMailStore | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.store = store

    def startService(self) -> None:
        self.pool.start()
        super().startService()

    def stopService(self) -> defer.Deferred:
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self._write_back())
        d.addBoth(lambda _: self.pool.stop())
        return d

    def _write_back(self) -> defer.Deferred | None:
        """Once no session can change anything more: the store's last writes."""
        if self.store is None:
            return None
        return defer.maybeDeferred(self.store.write_back, WRITE_BACK_TIMEOUT)


class GoodbyeService(service.Service):
    """
    At shutdown, tells the open sessions the server is stopping (SMTP's
    421) and waits for them to close, before the disk thread pool stops.
    """

    def __init__(self, factories: list[Any] | Callable[[], list[Any]]) -> None:
        self.factories = factories  # or a callable: those of every reload's settings

    def stopService(self) -> defer.Deferred:
        super().stopService()
        factories = self.factories() if callable(self.factories) else self.factories
        return defer.DeferredList([f.shut_down() for f in factories])


def build_context(config: Config, reactor: Any) -> ServerContext:
    """Every part the protocols share, built once from C{config}."""
    tune_malloc()
    pool = ThreadPool(minthreads=1, maxthreads=DISK_THREADS, name="mailsrv-disk")
    make_data_dirs(config)
    upgrade_data(config)
    metrics = MailMetrics(CollectorRegistry(), config.queue_dir, time.time)
    store = TimedStore(
        MboxMailStore(config.mail_dir, config.index_dir, reactor, pool), metrics, reactor
    )
    passwords = PasswordFile(config.auth.passwd_file, reactor, pool)
    portal = settingsparts.portal(config, passwords, reactor)
    server_tls = server_options(config)
    return ServerContext(
        config=config,
        reactor=reactor,
        threadpool=pool,
        store=store,
        passwords=passwords,
        portal=portal,
        tls=server_tls,
        throttle=settingsparts.login_throttle(config, reactor),
        queue=open_queue(config, reactor, pool),
        pop3_locks=MaildropLocks(),
        addresses=_address_rules(config, reactor),
        dkim=load_signer(config, lambda f: deferToThreadPool(reactor, pool, f)),
        filter=build_filter(config.filter, reactor),
        rates=settingsparts.rate_limits(config, reactor),
        duplicates=build_duplicates(config.policy, reactor),
        training=training_queue(
            config.filter, reactor, store, lambda f, *a: deferToThreadPool(reactor, pool, f, *a)
        ),
        greylist=build_greylist(config, reactor, pool),
        authentication=build_authentication(
            config, reactor, lambda f: deferToThreadPool(reactor, pool, f)
        ),
        quota=settingsparts.quotas(config, lambda f, *a: deferToThreadPool(reactor, pool, f, *a)),
        metrics=metrics,
    )


def _address_rules(config: Config, reactor: Any) -> AddressRules:
    """The address rules, their problems logged (an aliases file's bad lines)."""
    rules = address_rules(config, reactor)
    table = rules.aliases
    if table is not None:
        for problem in table.problems:
            log.warn("aliases: {problem}", problem=problem)
    if config.addresses.postmaster is None:
        log.warn(
            "[addresses] postmaster is not set: mail to postmaster@ and abuse@ of the "
            "local domains is refused unless an alias or a user takes it (RFC 5321 4.5.1)"
        )
    return rules


def _factories(ctx: ServerContext) -> dict[str, Any]:
    """Listener name -> protocol factory."""
    return {
        "smtp": smtp_factory(ctx, submission=False),
        "submission": smtp_factory(ctx, submission=True),
        "submissions": smtp_factory(ctx, submission=True, implicit_tls=True),
        "pop3": pop3_factory(ctx),
        "pop3s": pop3_factory(ctx, implicit_tls=True),
        "imap": imap_factory(ctx),
        "imaps": imap_factory(ctx, implicit_tls=True),
    }


def build_service(config: Config, reactor: Any = None) -> service.MultiService:
    """The whole server as one MultiService."""
    if reactor is None:
        # The global reactor only when none is given: importing it installs
        # the default reactor, which twistd chooses before it gets here.
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return serve(build_context(config, reactor))


def serve(ctx: ServerContext) -> service.MultiService:
    """The services of a server built as C{ctx}: the relay process and the listeners."""
    top = service.MultiService()
    notifier = Notifier.from_environ()  # systemd's Type=notify; nothing without NOTIFY_SOCKET
    gate = StartGate()
    # SIGHUP handled from the first moment (its reloader is set below).
    hangup = HangupService(ctx.tls, ctx.reactor, notifier, gate)
    hangup.setServiceParent(top)
    users = ThreadPoolService(ctx.threadpool, ctx.store)
    users.setServiceParent(top)  # everything in users stops before the disk thread pool
    aliases = None
    if ctx.addresses is not None and ctx.addresses.aliases is not None:
        aliases = AliasWatcher(ctx.addresses.aliases, ctx.reactor, ctx.threadpool)
        aliases.setServiceParent(users)
    # The relayer runs in a process of its own, beside this one.
    relay = relay_process_service(ctx)
    relay.setServiceParent(users)
    listeners = _listeners(ctx)
    goodbye = GoodbyeService(list(listeners.sessions))
    goodbye.setServiceParent(users)
    if ctx.authentication is not None and ctx.authentication.workers is not None:
        # Its processes (started by the first message) gone when it has stopped.
        VerifierService(ctx.authentication.workers).setServiceParent(users)
    connections = connection_gate(ctx.config.policy, ctx.reactor)
    greylist_networks = []
    greylisting = greylist_service(ctx)
    if greylisting is not None:
        assert ctx.greylist is not None
        # [policy] allow_file, for the greylist too
        greylist_networks.append(ctx.greylist.allowed_networks)
        greylisting.setServiceParent(users)
    networks = NetworkWatcher(
        [connections.allow, connections.deny, *greylist_networks], ctx.reactor, ctx.threadpool
    )
    networks.setServiceParent(users)
    RecoveryService(ctx.store, gate).setServiceParent(users)
    gates: dict[str, GateFactory] = {}
    for name, endpoints in ctx.config.listen.items():
        if not endpoints:
            continue
        settings = listeners.settings.get(name)
        if settings is None:
            log.warn(
                "no server for listener {name}; not listening on {endpoints}",
                name=name,
                endpoints=endpoints,
            )
            continue
        # Every listener: the connection gate first (limits, allowed and
        # denied networks), then the pregreet wait on the MX listener only.
        factory = gates[name] = GateFactory(
            settings.factory,
            connections,
            name,
            ctx.reactor,
            settings.hostname,
            pregreet_wait=settings.pregreet_wait,
            refusal_tls=_tls_wrapper(ctx) if name in IMPLICIT_TLS else None,
            client_checks=settings.client_checks,
        )
        for description in endpoints:
            svc = strports.service(description, factory, reactor=cast(IReactorCore, ctx.reactor))
            svc.endpoint = GatedEndpoint(svc.endpoint, gate)
            svc.setName(f"{name} {description}")
            svc.setServiceParent(users)
    observe_server(ctx, users)  # metrics: counting, [metrics] listen, the status socket
    NotifyService(notifier, gate, ctx.reactor).setServiceParent(users)  # after every listener
    # SIGHUP: new connections get the new settings (mailsrv.reload).
    reloader = Reloader(
        ctx, _listeners, listeners, gates, connections, networks, greylist_networks, aliases, relay
    )
    goodbye.factories = reloader.session_factories
    hangup.reloader = reloader
    return top


def _listeners(ctx: ServerContext) -> Listeners:
    """What each listener serves new connections with, built from C{ctx}."""
    factories = _factories(ctx)
    checks = client_checks(ctx.config, ctx.reactor)  # reverse DNS, DNS lists
    policy = ctx.config.policy
    settings = {}
    for name, factory in factories.items():
        if name in IMPLICIT_TLS:
            factory = TLSMemoryBIOFactory(ctx.tls, False, factory)
        settings[name] = ListenerSettings(
            factory,
            ctx.config.server.hostname,
            pregreet_wait=policy.pregreet_wait if name == "smtp" and policy.pregreet else 0.0,
            client_checks=checks if PROTOCOLS.get(name) == "smtp" else None,
        )
    sessions = [f for f in factories.values() if hasattr(f, "shut_down")]
    return Listeners(settings, sessions)


def _tls_wrapper(ctx: ServerContext) -> Any:
    """Wraps a factory in the server's TLS (a refusal on an implicit TLS listener)."""
    return lambda factory: TLSMemoryBIOFactory(ctx.tls, False, factory)


__all__ = [
    "ServerContext",
    "ThreadPoolService",
    "GoodbyeService",
    "build_context",
    "build_service",
    "serve",
    "tune_malloc",  # the relay process's import; mailsrv.malloc is its home
]
