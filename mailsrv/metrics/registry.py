"""
The metrics of one server, in the registry it is given (never
prometheus_client's global one): names in the style of the Postfix and
Dovecot exporters, prefixed C{mailsrv_}, each with its help text.

Counters count what happened since the server started; the queue's gauges
are read from the queue folder at each scrape (the relay process removes
what it delivers, so only the folder knows the queue's size).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

# The services a connection or login is counted under (the listeners' protocols).
SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")
# The services a login line names (mailsrv.loglines; submission: SMTP AUTH).
LOGIN_SERVICES = ("smtp", "submission", "pop3", "imap")
# The spam filter's actions (mailsrv.filter.verdict), and "failed": no answer.
FILTER_ACTIONS = ("accept", "junk", "defer", "reject", "failed")
# Refusal reasons shown from the start (mailsrv.metrics.events has them all).
COMMON_REASONS = ("unknown_user", "relay_denied", "auth_required", "policy", "rate_limit")
# Delivery results, as the log lines' status= words say them.
SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"
# Seconds: from a small append to a slow fsync on a busy disk.
# Seconds a scan of the queue folder serves the scrapes after it.
QUEUE_SCAN_MAX_AGE = 5.0
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class QueueFigures:
    """The outbound queue as its folder shows it."""

    messages: int
    oldest_age: float  # seconds since the oldest message was queued; 0 when empty


def queue_figures(queue_dir: Path, now: float) -> QueueFigures:
    """
    Count the queue files (C{ID.msg}) in C{queue_dir} and the age of the
    oldest (its file's modification time: a queue file is written once, its
    later envelopes go beside it). Blocking: call it off the reactor thread.
    """
    count = 0
    oldest: float | None = None
    try:
        entries = os.scandir(queue_dir)
    except FileNotFoundError:
        return QueueFigures(0, 0.0)
    with entries:
        for entry in entries:
            if not entry.name.endswith(".msg"):
                continue
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:  # delivered meanwhile
                continue
            count += 1
            oldest = mtime if oldest is None else min(oldest, mtime)
    return QueueFigures(count, 0.0 if oldest is None else max(0.0, now - oldest))


class QueueCollector:
    """
    The queue's gauges, computed at each scrape (in the web server's thread
    pool) from a scan of the queue folder at most L{QUEUE_SCAN_MAX_AGE} old:
    a scan stats every queue file (about 0.4 s for 100,000 of them, disk
    reads the deliveries wait behind), so scrapes in a row, or many at
    once, do not each make one. Those at once wait for the scan under way.
    """

    def __init__(
        self, queue_dir: Path, now: Callable[[], float], max_age: float = QUEUE_SCAN_MAX_AGE
    ) -> None:
        self.queue_dir = queue_dir
        self.now = now
        self.max_age = max_age
        self._lock = threading.Lock()
        self._scan: tuple[float, QueueFigures] | None = None

    def figures(self) -> QueueFigures:
        """The queue's figures now, from the last scan if it is recent enough."""
        with self._lock:
            now = self.now()
            if self._scan is None or not 0.0 <= now - self._scan[0] < self.max_age:
                self._scan = (now, queue_figures(self.queue_dir, now))
            scanned_at, figures = self._scan
        if not figures.messages:
            return figures
        return QueueFigures(figures.messages, figures.oldest_age + (now - scanned_at))

    def collect(self) -> Iterator[Metric]:
        figures = self.figures()
        yield GaugeMetricFamily(
            "mailsrv_queue_messages", "Messages in the outbound queue", value=figures.messages
        )
        yield GaugeMetricFamily(
            "mailsrv_queue_oldest_age_seconds",
            "Age of the oldest message in the outbound queue (0 when it is empty)",
            value=figures.oldest_age,
        )


class MailMetrics:
    """Every metric of one server; the hooks and the log observer call its methods."""

    def __init__(
        self,
        registry: CollectorRegistry,
        queue_dir: Path | None = None,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.registry = registry
        r = registry
        self.received = Counter(
            "mailsrv_messages_received",
            "Messages accepted by the SMTP server, by service (smtp: the MX, submission)",
            ["service"],
            registry=r,
        )
        self.delivered = Counter(
            "mailsrv_messages_delivered",
            "Deliveries to one recipient that succeeded (relay: local mailbox or remote server)",
            ["relay"],
            registry=r,
        )
        self.deferred = Counter(
            "mailsrv_messages_deferred",
            "Delivery attempts to one recipient that failed for now (tried again later)",
            ["relay"],
            registry=r,
        )
        self.bounced = Counter(
            "mailsrv_messages_bounced",
            "Deliveries to one recipient that failed for good (bounced, or expired in the queue)",
            ["relay"],
            registry=r,
        )
        self.rejected = Counter(
            "mailsrv_messages_rejected",
            "SMTP commands and connections refused, by reason",
            ["reason"],
            registry=r,
        )
        self.connections_open = Gauge(
            "mailsrv_connections_open",
            "Client connections open now, by service",
            ["service"],
            registry=r,
        )
        self.connections = Counter(
            "mailsrv_connections",
            "Client connections accepted, by service",
            ["service"],
            registry=r,
        )
        self.logins = Counter(
            "mailsrv_logins", "Successful logins, by service", ["service"], registry=r
        )
        self.login_failures = Counter(
            "mailsrv_login_failures",
            "Failed logins (bad credentials, or refused after too many failures), by service",
            ["service"],
            registry=r,
        )
        self.filter_verdicts = Counter(
            "mailsrv_filter_verdicts",
            "Verdicts of the spam filter on inbound mail (failed: the filter did not answer)",
            ["action"],
            registry=r,
        )
        self.store_latency = Histogram(
            "mailsrv_store_delivery_seconds",
            "Time to store one message durably in a mailbox",
            buckets=STORE_BUCKETS,
            registry=r,
        )
        for service in SERVICES:  # every service shows 0 from the first scrape on
            self.connections_open.labels(service)
            self.connections.labels(service)
        for relay in ("local", "remote"):
            for counter in (self.delivered, self.deferred, self.bounced):
                counter.labels(relay)
        self.received.labels("smtp")
        for service in LOGIN_SERVICES:
            self.logins.labels(service)
            self.login_failures.labels(service)
        for action in FILTER_ACTIONS:
            self.filter_verdicts.labels(action)
        for reason in COMMON_REASONS:
            self.rejected.labels(reason)
        if queue_dir is not None and now is not None:
            r.register(QueueCollector(queue_dir, now))  # type: ignore[arg-type]

    # connections (the listeners' connection gate)

    def opened(self, service: str) -> None:
        self.connections.labels(service).inc()
        self.connections_open.labels(service).inc()

    def closed(self, service: str) -> None:
        self.connections_open.labels(service).dec()

    def refused(self, service: str, verdict: str) -> None:
        """The connection gate refused a client (a L{mailsrv.policy.connections.Verdict} name)."""
        self.rejected.labels("denied_network" if verdict == "denied" else "connection_limit").inc()

    # mail

    def delivery_result(self, relay: str, result: str) -> None:
        """One recipient's delivery attempt: C{relay} "local" or a next hop; C{result} sent/..."""
        kind = "local" if relay == "local" else "remote"
        counter = {SENT: self.delivered, DEFERRED: self.deferred, BOUNCED: self.bounced}.get(result)
        if counter is not None:
            counter.labels(kind).inc()

    def counters(self) -> list[Counter]:
        return [
            self.received,
            self.delivered,
            self.deferred,
            self.bounced,
            self.rejected,
            self.connections,
            self.logins,
            self.login_failures,
            self.filter_verdicts,
        ]

    def totals(self) -> dict[str, float]:
        """The counters summed over their labels, by name: C{mailsrv status}'s figures."""
        out: dict[str, float] = {}
        for counter in self.counters():
            for metric in counter.collect():
                total = sum(s.value for s in metric.samples if s.name.endswith("_total"))
                out[metric.name + "_total"] = total
        return out

    def open_connections(self) -> dict[str, int]:
        """Open connections by service."""
        return {
            s.labels["service"]: int(s.value)
            for metric in self.connections_open.collect()
            for s in metric.samples
        }
