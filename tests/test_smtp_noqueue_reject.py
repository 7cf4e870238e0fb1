"""
MAIL and RCPT refused before any check (a C{SIZE=} over the limit, an
address or argument that does not parse) are logged in Postfix's shape,
C{NOQUEUE: reject: MAIL from NAME[IP]: 552 5.3.4 ...; proto=ESMTP
helo=<...>}, and counted in C{mailsrv_messages_rejected_total} (reasons
C{size} and C{syntax}): on a StringTransport session, and on a real
``twistd -n mailsrv`` over loopback, its log and its metrics page.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator

import pytest
from twisted.logger import LogPublisher, globalLogPublisher

from mailsrv.metrics.registry import MailMetrics
from tests.e2e import MailServer, free_port
from tests.test_metrics import metrics, value  # noqa: F401 (a fixture)
from tests.test_metrics_e2e import wait_for
from tests.test_smtp_helpers import Session, make_context

REJECTED = "mailsrv_messages_rejected_total"
TOO_BIG = "MAIL FROM:<x@example.net> SIZE=999999999999"


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """The text of the log events of this process while the test runs."""
    from mailsrv.syslogobserver import event_text

    got: list[str] = []
    publisher: LogPublisher = globalLogPublisher

    def observer(event: dict) -> None:
        got.append(event_text(event))

    publisher.addObserver(observer)
    yield got
    publisher.removeObserver(observer)


def test_size_over_the_limit_is_logged_and_counted(metrics: MailMetrics, lines) -> None:  # noqa: F811
    s = Session(make_context(), peer="192.0.2.7")
    s.cmd("EHLO client.test")
    assert s.codes(TOO_BIG + "\r\n") == ["552 5.3.4"]
    assert value(metrics, REJECTED, reason="size") == 1
    assert [line for line in lines if "NOQUEUE" in line] == [
        "NOQUEUE: reject: MAIL from unknown[192.0.2.7]: 552 5.3.4 Message size exceeds "
        "fixed maximum message size; proto=ESMTP helo=<client.test>"
    ]


def test_syntax_errors_in_mail_and_rcpt_are_logged_and_counted(
    metrics: MailMetrics,  # noqa: F811
    lines,
) -> None:
    s = Session(make_context(), peer="192.0.2.7")
    s.cmd("HELO client.test")
    assert s.codes("MAIL FROM:<x@@example.net>\r\n") == ["501 5.1.7"]
    assert s.codes("MAIL FROM:<x@example.net> SIZE=1\r\n") == ["555 5.5.4"]  # SMTP, not ESMTP
    assert s.codes("MAIL FROM:<x@example.net>\r\n") == ["250 2.1.0"]
    assert s.codes("RCPT TO:<no address>\r\n") == ["501 5.1.3"]
    assert s.codes("RCPT FROM:<alice@example.test>\r\n") == ["501 5.5.4"]
    assert value(metrics, REJECTED, reason="syntax") == 4
    noqueue = [line for line in lines if "NOQUEUE" in line]
    assert noqueue == [
        "NOQUEUE: reject: MAIL from unknown[192.0.2.7]: 501 5.1.7 Bad sender address syntax; "
        "proto=SMTP helo=<client.test>",
        "NOQUEUE: reject: MAIL from unknown[192.0.2.7]: 555 5.5.4 MAIL FROM/RCPT TO parameter "
        "not recognized; proto=SMTP helo=<client.test>",
        "NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 501 5.1.3 Bad recipient address syntax; "
        "from=<x@example.net> proto=SMTP helo=<client.test>",
        "NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 501 5.5.4 Syntax error in parameters "
        "or arguments; from=<x@example.net> proto=SMTP helo=<client.test>",
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailServer]:
    base = tmp_path_factory.mktemp("refusals")
    port = free_port()
    srv = MailServer(base, extra=f'[metrics]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n')
    srv.metrics_port = port  # type: ignore[attr-defined]
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def test_a_real_server_logs_and_counts_size_and_syntax_refusals(server: MailServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        assert s.docmd(TOO_BIG)[0] == 552
        assert s.docmd("MAIL FROM:<x@example.net>")[0] == 250
        assert s.docmd("RCPT TO:<no address>")[0] == 501
    assert wait_for(server, REJECTED, 1, reason="size") == 1
    assert wait_for(server, REJECTED, 1, reason="syntax") == 1
    log = (server.base / "server.log").read_text()
    client = r"\S+\[127\.0\.0\.1\]"
    assert re.search(
        rf"NOQUEUE: reject: MAIL from {client}: 552 5\.3\.4 Message size exceeds fixed "
        r"maximum message size; proto=ESMTP helo=<client\.test>$",
        log,
        re.MULTILINE,
    ), log
    assert re.search(
        rf"NOQUEUE: reject: RCPT from {client}: 501 5\.1\.3 Bad recipient address syntax; "
        r"from=<x@example\.net> proto=ESMTP helo=<client\.test>$",
        log,
        re.MULTILINE,
    ), log
