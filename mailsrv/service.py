"""
Build the running server from a L{Config}: the disk thread pool, the store,
the password file and portal, and one listening service per endpoint.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from twisted.application import service, strports
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailsrv.config import IMPLICIT_TLS, Config
from mailsrv.interfaces import IMailStore, IOutboundQueue, IPasswordDatabase
from mailsrv.tls import ServerTLS

log = Logger()

M_ARENA_MAX = -8  # glibc mallopt parameter
WRITE_BACK_TIMEOUT = 10.0  # seconds the store may take at shutdown for its last writes


def tune_malloc() -> None:
    """
    glibc: one malloc arena for all threads (call before any thread starts).
    By default each thread that mallocs gets its own arena, and memory freed
    there stays in the RSS: the 19 MiB an argon2id check takes (one per login,
    in whichever pool thread runs it) is kept once per thread that ever ran one
    (a 100k INBOX server grew to 110 MB, not 91, after a few logins). Python
    holds the GIL for nearly all its allocations, so one arena costs no speed.
    MALLOC_ARENA_MAX in the environment still wins.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, 1)


@dataclass
class ServerContext:
    """Everything a protocol factory needs, built once and passed down."""

    config: Config
    reactor: Any
    threadpool: ThreadPool
    store: IMailStore
    passwords: IPasswordDatabase
    portal: Portal
    tls: ServerTLS
    throttle: Any = None  # mailsrv.auth.throttle.LoginThrottle
    queue: IOutboundQueue | None = None
    services: service.MultiService | None = None
    pop3_locks: Any = None  # mailsrv.pop3.MaildropLocks, shared by pop3 and pop3s


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

    def __init__(self, factories: list[Any]) -> None:
        self.factories = factories

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.DeferredList([f.shut_down() for f in self.factories])


def build_context(config: Config, reactor: Any, parent: service.MultiService) -> ServerContext:
    from mailsrv import tls
    from mailsrv.auth.checkers import PasswordChecker
    from mailsrv.auth.passwd import PasswordFile
    from mailsrv.auth.realm import MailRealm
    from mailsrv.auth.throttle import LoginThrottle
    from mailsrv.startup import make_data_dirs
    from mailsrv.store.mbox import MboxMailStore

    tune_malloc()
    pool = ThreadPool(minthreads=1, maxthreads=8, name="mailsrv-disk")
    make_data_dirs(config)
    store = MboxMailStore(config.mail_dir, config.index_dir, reactor, pool)
    users = ThreadPoolService(pool, store)
    users.setServiceParent(parent)
    passwords = PasswordFile(config.auth.passwd_file, reactor, pool)
    realm = MailRealm()
    portal = Portal(realm, [PasswordChecker(passwords, reactor, config.auth.failure_delay)])
    ctx = ServerContext(
        config=config,
        reactor=reactor,
        threadpool=pool,
        store=store,
        passwords=passwords,
        portal=portal,
        tls=tls.server_options(config),
        throttle=LoginThrottle(reactor, config.auth.max_failures, config.auth.failure_window),
        services=users,
    )
    return ctx


def _factories(ctx: ServerContext) -> dict[str, Any]:
    """Listener name -> protocol factory, for the protocols that exist."""
    out: dict[str, Any] = {}
    from mailsrv.smtp.server import smtp_factory

    out["smtp"] = smtp_factory(ctx, submission=False)
    out["submission"] = smtp_factory(ctx, submission=True)
    out["submissions"] = smtp_factory(ctx, submission=True, implicit_tls=True)
    from mailsrv.pop3 import pop3_factory

    out["pop3"] = pop3_factory(ctx)
    out["pop3s"] = pop3_factory(ctx, implicit_tls=True)
    try:
        from mailsrv.imap.server import imap_factory
    except ImportError:
        pass
    else:
        out["imap"] = imap_factory(ctx)
        out["imaps"] = imap_factory(ctx, implicit_tls=True)
    return out


def build_service(config: Config, reactor: Any = None) -> service.MultiService:
    """The whole server as one MultiService."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    top = service.MultiService()
    ctx = build_context(config, reactor, top)
    from mailsrv.hangup import HangupService
    from mailsrv.startup import GatedEndpoint, RecoveryService, StartGate

    HangupService(ctx.tls, reactor).setServiceParent(top)
    users = ctx.services  # everything below stops before the disk thread pool
    assert users is not None
    # The relayer runs in a process of its own, beside this one.
    from mailsrv.outbound.process import relay_process_service

    relay_process_service(ctx).setServiceParent(users)
    factories = _factories(ctx)
    GoodbyeService([f for f in factories.values() if hasattr(f, "shut_down")]).setServiceParent(
        users
    )
    gate = StartGate()
    RecoveryService(ctx.store, gate).setServiceParent(users)
    for name, endpoints in config.listen.items():
        if not endpoints:
            continue
        if name not in factories:
            log.warn(
                "no server for listener {name}; not listening on {endpoints}",
                name=name,
                endpoints=endpoints,
            )
            continue
        factory = factories[name]
        if name in IMPLICIT_TLS:
            factory = TLSMemoryBIOFactory(ctx.tls, False, factory)
        for description in endpoints:
            svc = strports.service(description, factory, reactor=reactor)
            svc.endpoint = GatedEndpoint(svc.endpoint, gate)
            svc.setName(f"{name} {description}")
            svc.setServiceParent(users)
    return top
