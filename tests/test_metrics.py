"""
The metrics (mailsrv.metrics), each counted from what the server really
does: SMTP sessions on a StringTransport (an unknown recipient, a delivery,
a refused login), the connection gate, the relay process's Counted command,
the queue's gauges read from a queue folder, and the metrics page.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogPublisher
from zope.interface.verify import verifyObject

from mailsrv import loglines
from mailsrv.config import parse
from mailsrv.interfaces import IMailStore
from mailsrv.metrics.events import reject_reason
from mailsrv.metrics.registry import QUEUE_SCAN_MAX_AGE, MailMetrics, queue_figures
from mailsrv.metrics.relaycounts import ResultCounter
from mailsrv.metrics.service import MetricsService, TimedStore
from mailsrv.outbound import ipc
from mailsrv.outbound.process import ServerSide
from mailsrv.policy.connections import ConnectionGate, ConnectionLimits
from mailsrv.policy.listener import GateFactory
from mailsrv.store.memory import MemoryMailStore

from .test_policy_connections import GreeterFactory
from .test_smtp_helpers import PASSWORD, Session, make_context

ALICE = "alice@example.test"


def value(metrics: MailMetrics, name: str, **labels: str) -> float:
    """A sample's value, 0 when it does not exist yet."""
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


@pytest.fixture
def metrics(tmp_path: Path) -> Iterator[MailMetrics]:
    """Metrics counting the log events of this process while the test runs."""
    m = MailMetrics(CollectorRegistry(), tmp_path / "queue", time.time)
    svc = MetricsService(m)
    svc.startService()
    yield m
    svc.stopService()


def test_an_unknown_recipient_counts_as_rejected_unknown_user(metrics: MailMetrics) -> None:
    s = Session(make_context())
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<x@example.net>")
    assert s.codes("RCPT TO:<nobody@example.test>\r\n") == ["550 5.1.1"]
    assert value(metrics, "mailsrv_messages_rejected_total", reason="unknown_user") == 1
    assert s.codes("RCPT TO:<x@elsewhere.example>\r\n") == ["554 5.7.1"]
    assert value(metrics, "mailsrv_messages_rejected_total", reason="relay_denied") == 1


def test_a_local_delivery_counts_received_delivered_and_store_latency(
    metrics: MailMetrics,
) -> None:
    ctx = make_context()
    clock = ctx.reactor
    store = TimedStore(ctx.store, metrics, clock)
    verifyObject(IMailStore, store)
    from dataclasses import replace

    s = Session(replace(ctx, store=store))
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<x@example.net>")
    s.cmd(f"RCPT TO:<{ALICE}>")
    s.cmd("DATA")
    assert s.codes("Subject: hi\r\n\r\nhello\r\n.\r\n") == ["250 2.0.0"]
    assert value(metrics, "mailsrv_messages_received_total", service="smtp") == 1
    assert value(metrics, "mailsrv_messages_delivered_total", relay="local") == 1
    assert value(metrics, "mailsrv_store_delivery_seconds_count") == 1


def test_mail_before_auth_on_submission_counts_as_auth_required(metrics: MailMetrics) -> None:
    s = Session(make_context(), submission=True, peer="127.0.0.1")
    s.cmd("EHLO client.test")
    assert s.codes("MAIL FROM:<x@example.test>\r\n") == ["530 5.7.0"]
    assert value(metrics, "mailsrv_messages_rejected_total", reason="auth_required") == 1


def test_a_failed_smtp_login_counts_as_a_login_failure(metrics: MailMetrics) -> None:
    ctx = make_context()
    s = Session(ctx, submission=True, peer="127.0.0.1")  # cleartext AUTH on loopback
    s.cmd("EHLO client.test")
    s.cmd("AUTH PLAIN " + _plain(ALICE, "wrong"))
    ctx.reactor.advance(ctx.config.auth.failure_delay + 1)
    assert value(metrics, "mailsrv_login_failures_total", service="submission") == 1
    s.cmd("AUTH PLAIN " + _plain(ALICE, PASSWORD))
    ctx.reactor.advance(ctx.config.auth.failure_delay + 1)
    assert value(metrics, "mailsrv_logins_total", service="submission") == 1


def _plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_imap_and_pop3_login_lines_count_by_service() -> None:
    # The lines of mailsrv.loglines, as the IMAP and POP3 servers write them.
    m = MailMetrics(CollectorRegistry())
    publisher = LogPublisher()
    svc = MetricsService(m, publisher)
    svc.startService()
    log = Logger(observer=publisher)
    fields = dict(user="a", method="PLAIN", client="192.0.2.1", local="127.0.0.1")
    log.info(loglines.LOGIN_FAILED, service="imap", **fields)
    log.info(loglines.LOGIN_THROTTLED, service="pop3", **fields)
    log.info(loglines.LOGIN_OK, service="imap", **fields)
    svc.stopService()
    log.info(loglines.LOGIN_FAILED, service="imap", **fields)  # stopped: not counted
    assert value(m, "mailsrv_login_failures_total", service="imap") == 1
    assert value(m, "mailsrv_login_failures_total", service="pop3") == 1
    assert value(m, "mailsrv_logins_total", service="imap") == 1


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("550 5.1.1 No such user here", "unknown_user"),
        ("554 5.7.1 Relay access denied", "relay_denied"),
        ("530 5.7.0 Authentication required", "auth_required"),
        ("552 5.3.4 Message size exceeds fixed maximum message size", "size"),
        ("451 4.7.1 Greylisted, please try again in 5 minutes", "greylist"),
        ("550 5.7.1 Message rejected as spam", "filter"),
        ("451 4.7.1 Too many messages from your address this hour, try", "rate_limit"),
        ("550 5.7.1 The same message to more than 50 recipients within 1h is refused", "duplicate"),
        ("450 4.7.25 Client host rejected: cannot find your hostname", "policy"),
        ("550 5.7.23 SPF validation failed", "sender_authentication"),
        ("451 4.3.0 Local error in processing, try again later", "temporary"),
        ("501 5.1.3 Bad recipient address syntax", "other"),
    ],
)
def test_reject_reasons(reply: str, reason: str) -> None:
    assert reject_reason(reply) == reason


def _connect(factory: GateFactory) -> tuple[object, StringTransport]:
    addr = IPv4Address("TCP", "192.0.2.9", 40000)
    p = factory.buildProtocol(addr)
    assert p is not None
    t = StringTransport(peerAddress=addr)
    p.makeConnection(t)
    return p, t


def test_connections_open_and_total_and_refusals_by_service() -> None:
    m = MailMetrics(CollectorRegistry())
    clock = Clock()
    gate = ConnectionGate(clock, ConnectionLimits(max_connections_per_ip=1))
    factory = GateFactory(GreeterFactory(), gate, "imap", clock, "mx.example.test")
    factory.observers.append(m)
    first, _ = _connect(factory)
    assert value(m, "mailsrv_connections_open", service="imap") == 1
    _connect(factory)  # over the per-address limit: refused
    assert value(m, "mailsrv_messages_rejected_total", reason="connection_limit") == 1
    assert value(m, "mailsrv_connections_total", service="imap") == 1
    first.connectionLost(None)  # type: ignore[attr-defined]
    assert value(m, "mailsrv_connections_open", service="imap") == 0
    assert value(m, "mailsrv_connections_total", service="imap") == 1


def test_queue_gauges_read_the_queue_folder(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    clock = Clock()
    clock.advance(10_000.0 - QUEUE_SCAN_MAX_AGE)
    m = MailMetrics(CollectorRegistry(), queue, clock.seconds)
    assert value(m, "mailsrv_queue_messages") == 0  # no folder yet
    clock.advance(QUEUE_SCAN_MAX_AGE)
    queue.mkdir()
    for name, mtime in (("A.msg", 9_000.0), ("B.msg", 9_900.0), ("A.env", 1.0)):
        (queue / name).write_text("x")
        os.utime(queue / name, (mtime, mtime))
    (queue / "tmp").mkdir()
    assert value(m, "mailsrv_queue_messages") == 2
    assert value(m, "mailsrv_queue_oldest_age_seconds") == 1000.0
    assert queue_figures(queue, 10_000.0).messages == 2


def test_scrapes_in_a_row_share_one_scan_of_a_big_queue(tmp_path: Path) -> None:
    # A scan stats every queue file: a scrape each second, or many at once,
    # must not hold a disk thread for each.
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / "A.msg").write_text("x")
    os.utime(queue / "A.msg", (9_000.0, 9_000.0))
    clock = Clock()
    clock.advance(10_000.0)
    m = MailMetrics(CollectorRegistry(), queue, clock.seconds)
    assert value(m, "mailsrv_queue_messages") == 1
    (queue / "B.msg").write_text("x")
    clock.advance(QUEUE_SCAN_MAX_AGE - 1)
    assert value(m, "mailsrv_queue_messages") == 1  # not scanned again
    assert value(m, "mailsrv_queue_oldest_age_seconds") == 1000.0 + QUEUE_SCAN_MAX_AGE - 1
    clock.advance(1)
    assert value(m, "mailsrv_queue_messages") == 2


class _Pipe:
    """The relay process's end of the pipe, as L{ResultCounter} uses it."""

    transport = object()

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def callRemote(self, command: object, items: bytes) -> None:
        assert command is ipc.Counted
        self.sent.append(items)


def test_the_relay_process_results_reach_the_server_registry(tmp_path: Path) -> None:
    # Relay side: the relayer's result events become one Counted command a turn.
    clock = Clock()
    pipe = _Pipe()
    counter = ResultCounter(pipe, clock)
    log = Logger(observer=counter)
    log.info("{text}", text="x", relay="mx.example.net[192.0.2.1]:25", result="sent")
    log.info("{text}", text="x", relay="local", result="deferred")
    log.info("{text}", text="x", relay="none", result="bounced")
    log.info("{queue_id}: to=<{rcpt}>, status=expired ({reply})", queue_id="Q", rcpt="a", reply="")
    log.info("relayer started")
    clock.advance(0)
    assert len(pipe.sent) == 1
    # Server side: the responder counts them into the server's registry.
    m = MailMetrics(CollectorRegistry())
    ServerSide(MemoryMailStore(), tmp_path, None, m).counted(pipe.sent[0])
    assert value(m, "mailsrv_messages_delivered_total", relay="remote") == 1
    assert value(m, "mailsrv_messages_deferred_total", relay="local") == 1
    assert value(m, "mailsrv_messages_bounced_total", relay="remote") == 2


def test_every_metric_is_on_the_page_from_the_first_scrape(tmp_path: Path) -> None:
    # rate() in a dashboard needs the series before the first event.
    m = MailMetrics(CollectorRegistry(), tmp_path, time.time)
    text = generate_latest(m.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for name, labels in [
        ("mailsrv_messages_received_total", (("service", "smtp"),)),
        ("mailsrv_messages_delivered_total", (("relay", "remote"),)),
        ("mailsrv_messages_rejected_total", (("reason", "unknown_user"),)),
        ("mailsrv_logins_total", (("service", "imap"),)),
        ("mailsrv_login_failures_total", (("service", "pop3"),)),
        ("mailsrv_filter_verdicts_total", (("action", "reject"),)),
        ("mailsrv_connections_open", (("service", "imaps"),)),
        ("mailsrv_store_delivery_seconds_count", ()),
        ("mailsrv_queue_messages", ()),
        ("mailsrv_queue_oldest_age_seconds", ()),
    ]:
        assert (name, labels) in samples, name


def test_metrics_config() -> None:
    assert parse("").metrics.listen == ()
    config = parse('[metrics]\nlisten = ["tcp:9154:interface=127.0.0.1"]\n')
    assert config.metrics.listen == ("tcp:9154:interface=127.0.0.1",)
    with pytest.raises(Exception, match="metrics.listen"):
        parse('[metrics]\nlisten = ["nonsense:1"]\n')
