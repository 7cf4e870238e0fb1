"""
The metrics of a real ``twistd -n mailsrv``: its page on [metrics] listen
as Prometheus reads it (and as the real ``prometheus`` scrapes it, where
installed), ``mailsrv status`` from the daemon's status socket, and the
Grafana dashboard in etc/grafana, whose every metric the page has.
"""

from __future__ import annotations

import imaplib
import json
import re
import shutil
import smtplib
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import PASSWORD, ROOT, MailServer, free_port

USER = "alice@example.test"
DASHBOARD = ROOT / "etc" / "grafana" / "mailsrv-dashboard.json"
WAIT = 60.0  # seconds a bounded loop waits for a figure


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailServer]:
    base = tmp_path_factory.mktemp("metrics")
    port = free_port()
    srv = MailServer(base, extra=f'[metrics]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n')
    srv.metrics_port = port  # type: ignore[attr-defined]
    srv.add_user(USER)
    # The socket a daemon killed with SIGKILL left: the new one replaces it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(srv.data / "status.sock"))
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def scrape(server: MailServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's metrics page: (sample name, labels) -> value."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=10) as page:
        assert page.headers["Content-Type"].startswith("text/plain")
        text = page.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(server: MailServer, name: str, **labels: str) -> float:
    return scrape(server).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(server: MailServer, name: str, minimum: float, **labels: str) -> float:
    deadline = time.monotonic() + WAIT
    while True:
        got = sample(server, name, **labels)
        if got >= minimum or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def send(server: MailServer, rcpts: list[str], submission: bool = False) -> dict:
    """Send a message to C{rcpts} on the MX (or submission, as L{USER}): the refused ones."""
    port = server.ports["submission" if submission else "smtp"]
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        if submission:
            s.login(USER, PASSWORD)
        s.mail(USER if submission else "someone@example.net")
        refused = {}
        accepted = []
        for rcpt in rcpts:
            code, _ = s.rcpt(rcpt)
            (accepted.append(rcpt) if code == 250 else refused.setdefault(rcpt, code))
        if accepted:
            code, _ = s.data(b"Subject: metrics\r\n\r\nhello\r\n")
            assert code == 250
    return refused


def test_counts_of_a_running_server(server: MailServer) -> None:
    before = sample(server, "mailsrv_messages_received_total", service="smtp")
    delivered = sample(server, "mailsrv_messages_delivered_total", relay="local")
    assert send(server, ["nobody@example.test", USER]) == {"nobody@example.test": 550}
    got = scrape(server)
    assert got[("mailsrv_messages_received_total", (("service", "smtp"),))] == before + 1
    assert got[("mailsrv_messages_delivered_total", (("relay", "local"),))] == delivered + 1
    assert got[("mailsrv_messages_rejected_total", (("reason", "unknown_user"),))] >= 1
    assert got[("mailsrv_store_delivery_seconds_count", ())] >= 1
    assert got[("mailsrv_connections_total", (("service", "smtp"),))] >= 1
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(USER, "wrong password")
        assert sample(server, "mailsrv_connections_open", service="imap") == 1
    finally:
        imap.shutdown()
    assert sample(server, "mailsrv_login_failures_total", service="imap") == 1
    assert sample(server, "mailsrv_messages_received_total", service="submission") == 0
    # The relay process's result (no DNS here: the remote domain is not found).
    bounced = sample(server, "mailsrv_messages_bounced_total", relay="remote")
    assert send(server, ["bob@example.net"], submission=True) == {}
    assert wait_for(server, "mailsrv_messages_bounced_total", bounced + 1, relay="remote") == (
        bounced + 1
    )
    assert sample(server, "mailsrv_messages_received_total", service="submission") == 1
    assert sample(server, "mailsrv_logins_total", service="submission") == 1


def test_status_from_the_running_daemon(server: MailServer) -> None:
    queued = server.data / "queue" / "0000TEST.msg"  # the queue's gauges read the folder
    queued.write_text("MAILSRV-QUEUE 1 0\n\n")
    try:
        shown = server.cli("status")
        doc = json.loads(server.cli("status", "--json").stdout)
    finally:
        queued.unlink()
    assert doc["running"] is True
    assert {entry["name"] for entry in doc["listeners"]} >= {"smtp", "imap", "metrics"}
    smtp = next(e for e in doc["listeners"] if e["name"] == "smtp")
    assert smtp["address"] == f"127.0.0.1:{server.ports['smtp']}"
    assert doc["queue"]["messages"] >= 1
    assert doc["counters"]["mailsrv_messages_received_total"] >= 1
    assert "mailsrv is running" in shown.stdout
    assert re.search(r"^  smtp +127\.0\.0\.1:\d+", shown.stdout, re.M), shown.stdout
    assert re.search(r"^queue: \d+ messages?, oldest \d+s$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^  received +\d+$", shown.stdout, re.M), shown.stdout
    mode = (server.data / "status.sock").stat().st_mode & 0o777
    assert mode == 0o600


def test_status_without_a_daemon_says_so(tmp_path: Path) -> None:
    srv = MailServer(tmp_path)
    (srv.data / "queue").mkdir(parents=True)
    (srv.data / "queue" / "0000TEST.msg").write_text("x")
    result = srv.cli("status", check=False)
    assert result.returncode == 1
    assert "mailsrv is not running" in result.stdout
    assert "queue: 1 message, oldest" in result.stdout
    result = srv.cli("status", "--json", check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["queue"]["messages"] == 1


def test_the_grafana_dashboard_uses_only_metrics_the_server_has(server: MailServer) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"]
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\bmailsrv_[a-z_]+\b", expr)}
    have = {name for name, _ in scrape(server)}
    assert used and used <= have, used - have
    counters = {name for name in have if name.endswith(("_total", "_bucket"))}
    for expr in exprs:  # counters only through rate() / increase()
        for name in re.findall(r"\bmailsrv_[a-z_]+\b", expr):
            if name in counters:
                assert re.search(rf"(rate|increase)\(\s*{name}\b", expr), expr


def test_real_prometheus_scrapes_the_received_counter(server: MailServer, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed")
    port = free_port()
    target = f"127.0.0.1:{server.metrics_port}"  # type: ignore[attr-defined]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: mailsrv\n    static_configs:\n      - targets: ['{target}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(tmp_path),
    )
    try:
        before = sample(server, "mailsrv_messages_received_total", service="smtp")
        send(server, [USER])
        query = urllib.parse.urlencode(
            {"query": 'mailsrv_messages_received_total{job="mailsrv",service="smtp"}'}
        )
        url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
        seen = None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    result = json.load(answer)["data"]["result"]
            except OSError:
                result = []  # not listening yet
            if result:
                seen = float(result[0]["value"][1])
                if seen >= before + 1:
                    break
            time.sleep(0.3)
        assert seen is not None and seen >= before + 1, (tmp_path / "prometheus.log").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
