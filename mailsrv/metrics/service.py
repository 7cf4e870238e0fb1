"""
Wiring the metrics into a built server: the log observer that counts
(L{mailsrv.metrics.events}) while the server runs, the metrics page on
C{[metrics] listen}, the connection gate's observers on each listener, and
a record of what each listener bound (for C{mailsrv status}).

The page is prometheus_client's WSGI application on twisted.web: what
C{prometheus_client.twisted.MetricsResource} builds, but with the reactor
we are given and a thread pool of its own (one thread), where the queue's
gauges read the queue folder: never the disk pool's threads, which the
deliveries need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import CollectorRegistry, make_wsgi_app
from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource
from zope.interface import implementer

from mailsrv.interfaces import IMailStore
from mailsrv.metrics.events import MetricsObserver
from mailsrv.metrics.registry import MailMetrics

METRICS_PATH = b"metrics"  # served at /metrics (and /, as the exporters do)


def metrics_site(registry: CollectorRegistry, reactor: Any, threadpool: Any) -> Site:
    """The metrics page of C{registry}, rendered in C{threadpool}."""
    page = WSGIResource(reactor, threadpool, make_wsgi_app(registry))
    root = Resource()
    root.putChild(METRICS_PATH, page)
    root.putChild(b"", page)
    site = QuietSite(root)
    site.noisy = False
    return site


class QuietSite(Site):
    """A site without an access log line per request: a scrape every few seconds is not news."""

    def log(self, request: Any) -> None:
        pass

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        """The port's "metrics starting on 9154" line."""
        return "metrics"


@dataclass
class BoundListeners:
    """What each listener bound: C{(name, endpoint description, address)}, once listening."""

    bound: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, name: str, description: str, port: Any) -> Any:
        host = port.getHost()
        where = getattr(host, "name", None)  # a Unix socket
        if where is None:
            where = f"{getattr(host, 'host', '?')}:{getattr(host, 'port', '?')}"
        else:
            where = where.decode() if isinstance(where, bytes) else str(where)
        self.bound.append((name, description, where))
        return port


class RecordedEndpoint:
    """An endpoint that notes in L{BoundListeners} what it bound."""

    def __init__(
        self, endpoint: Any, name: str, description: str, listeners: BoundListeners
    ) -> None:
        self.endpoint = endpoint
        self.name = name
        self.description = description
        self.listeners = listeners

    def listen(self, factory: Any) -> defer.Deferred:
        d = self.endpoint.listen(factory)
        return d.addCallback(lambda port: self.listeners.add(self.name, self.description, port))


@implementer(IMailStore)
class TimedStore:
    """The store, its deliveries timed into the store latency histogram."""

    def __init__(self, store: IMailStore, metrics: MailMetrics, clock: Any) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def deliver(self, user: Any, source: Any, sender: Any, folder: str = "INBOX") -> Any:
        started = self._clock.seconds()

        def observe(result: Any) -> Any:
            self._metrics.store_latency.observe(max(0.0, self._clock.seconds() - started))
            return result

        d = self._store.deliver(user, source, sender, folder)
        return d.addCallback(observe)


class MetricsService(service.MultiService):
    """Counts the log events of this process into the metrics while it runs."""

    def __init__(self, metrics: MailMetrics, publisher: Any = globalLogPublisher) -> None:
        super().__init__()
        self.metrics = metrics
        self.publisher = publisher
        self.observer = MetricsObserver(metrics)
        self._observing = False

    def _observe(self) -> None:
        if not self._observing:
            self._observing = True
            self.publisher.addObserver(self.observer)

    def privilegedStartService(self) -> None:
        self._observe()  # before the listeners start
        super().privilegedStartService()

    def startService(self) -> None:
        self._observe()
        super().startService()

    def stopService(self) -> defer.Deferred:
        if self._observing:
            self._observing = False
            self.publisher.removeObserver(self.observer)
        return defer.maybeDeferred(super().stopService)


def observe_server(ctx: Any, users: service.MultiService) -> BoundListeners:
    """
    Wire C{ctx.metrics} into the services of C{users} (the listeners built
    by L{mailsrv.service.serve}) and add the metrics listeners and the
    status socket beside them; return the record of what is bound.
    """
    from mailsrv.policy.listener import GateFactory
    from mailsrv.service import ThreadPoolService
    from mailsrv.status import StatusService

    listeners = BoundListeners()
    metrics: MailMetrics | None = getattr(ctx, "metrics", None)
    for svc in list(users):
        if not isinstance(svc, StreamServerEndpointService):
            continue
        name, _, description = (svc.name or "").partition(" ")
        svc.endpoint = RecordedEndpoint(svc.endpoint, name, description, listeners)
        if metrics is not None and isinstance(svc.factory, GateFactory):
            svc.factory.observers.append(metrics)
    if metrics is None:
        return listeners
    top = MetricsService(metrics)
    top.setServiceParent(users)
    endpoints = ctx.config.metrics.listen if hasattr(ctx.config, "metrics") else ()
    if endpoints:
        # Its own thread: scrapes, however many, never wait ahead of the
        # deliveries in the disk pool.
        pool = ThreadPoolService(ThreadPool(minthreads=0, maxthreads=1, name="mailsrv-metrics"))
        pool.setServiceParent(top)
        site = metrics_site(metrics.registry, ctx.reactor, pool.pool)
        for description in endpoints:
            svc = strports.service(description, site, reactor=cast(IReactorCore, ctx.reactor))
            svc.endpoint = RecordedEndpoint(svc.endpoint, "metrics", description, listeners)
            svc.setName(f"metrics {description}")
            svc.setServiceParent(pool)
    StatusService(ctx, metrics, listeners).setServiceParent(users)
    return listeners
