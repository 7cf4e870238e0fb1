"""
C{[log] syslog = true}: the log lines go to a local syslog datagram socket
as syslog(3) writes them (C{<PRI>Mmm dd hh:mm:ss mailsrv[PID]: TEXT},
facility mail), read here from a socket the test binds. fail2ban's stock
postfix and dovecot filters (given C{_daemon=mailsrv}, as the README's jail
does) find the failing client in the file a syslog daemon makes of them,
and only that client.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.logger import Logger, LogPublisher

from mailsrv.config import ConfigError, parse
from mailsrv.syslogobserver import SyslogObserver, SyslogService, syslog_settings
from tests.e2e import PASSWORD, MailServer
from tests.test_logs_login_shapes import (
    BAD,
    FILTERS,
    GOOD,
    USER,
    imap_login,
    matched_ips,
    needs_fail2ban,
    pop3_login,
    smtp_auth,
    with_max_failures,
)

LINE = re.compile(r"^<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) mailsrv\[(\d+)\]: (.*)$")
MAIL = 2  # RFC 5424 6.2.1: facility mail


@pytest.fixture
def syslog_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound Unix datagram socket, as a syslog daemon's /dev/log (a short path: 108 octets)."""
    folder = tempfile.mkdtemp(prefix="syslog-", dir="/tmp")
    path = os.path.join(folder, "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def received(sock: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode())
        except BlockingIOError:
            return lines


class Reader(threading.Thread):
    """Reads a syslog socket as a syslog daemon does, while the server runs."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        sock.settimeout(0.05)
        self.sock = sock
        self.lines: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.lines.append(self.sock.recv(65536).decode())
            except TimeoutError:
                if self.stopping.is_set():
                    return


def test_lines_are_syslog_datagrams_with_facility_and_severity(syslog_socket) -> None:
    sock, path = syslog_socket
    publisher = LogPublisher()
    observer = SyslogObserver(path, "mail", pid=lambda: 4242)
    publisher.addObserver(observer)
    log = Logger(namespace="test", observer=publisher)
    log.warn("warning: {name}[{ip}]: refused", name="unknown", ip="192.0.2.1")
    log.info("two\nlines")
    got = [LINE.match(line) for line in received(sock)]
    assert all(got), got
    assert [(int(m[1]), m[3], m[4]) for m in got if m] == [
        (MAIL * 8 + 4, "4242", "warning: unknown[192.0.2.1]: refused"),
        (MAIL * 8 + 6, "4242", "two"),
        (MAIL * 8 + 6, "4242", "lines"),
    ]


def test_lines_wait_for_a_missing_socket() -> None:
    folder = tempfile.mkdtemp(prefix="syslog-", dir="/tmp")
    path = os.path.join(folder, "log")
    publisher = LogPublisher()
    observer = SyslogObserver(path, "local3")
    publisher.addObserver(observer)
    log = Logger(observer=publisher)
    log.info("early")  # no socket yet: kept, no exception into the logging code
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        log.info("later")
        lines = received(sock)
        assert [line.rpartition(": ")[2] for line in lines] == ["early", "later"]
        assert lines[0].startswith(f"<{19 * 8 + 6}>")  # local3.info
        assert observer.dropped == 0
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def test_the_service_adds_and_removes_its_observer(syslog_socket) -> None:
    sock, path = syslog_socket
    publisher = LogPublisher()
    config = parse(f'[log]\nsyslog = true\nsyslog_socket = "{path}"\n')
    service = SyslogService(syslog_settings(config), task.Clock(), publisher)
    service.privilegedStartService()
    service.startService()
    Logger(observer=publisher).info("Starting factory {f}", f="noise")  # quiet() drops it
    Logger(observer=publisher).info("kept")
    service.stopService()
    Logger(observer=publisher).info("after")
    assert [line.rpartition(": ")[2] for line in received(sock)] == ["kept"]


def test_the_log_section_is_checked() -> None:
    with pytest.raises(ConfigError) as e:
        parse('[log]\nsyslog = "yes"\nfacility = "mial"\n')
    assert "log.syslog" in str(e.value) and "log.facility" in str(e.value)
    settings = syslog_settings(parse(""))
    assert (settings.enabled, settings.socket, settings.facility) == (False, "/dev/log", "mail")


@pytest.fixture(scope="module")
def syslog_file(tmp_path_factory) -> Iterator[tuple[Path, list[str]]]:
    """The syslog lines a real server sent while clients failed and succeeded to log in."""
    base = tmp_path_factory.mktemp("syslog")
    folder = tempfile.mkdtemp(prefix="syslog-", dir="/tmp")
    path = os.path.join(folder, "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    reader = Reader(sock)
    server = MailServer(base)
    with_max_failures(server, 2)
    with open(server.config_path, "a") as f:
        f.write(f'\n[log]\nsyslog = true\nsyslog_socket = "{path}"\nfacility = "mail"\n')
    server.add_user(USER)
    server.start()
    reader.start()
    try:
        for _ in range(2):  # the second one is refused by the throttle
            smtp_auth(server.ports["submission"], BAD, "wrong")
        assert smtp_auth(server.ports["submission"], GOOD, PASSWORD) == 235
        assert not imap_login(server.ports["imap"], BAD, "wrong")
        assert imap_login(server.ports["imap"], GOOD, PASSWORD)
        assert not pop3_login(server.ports["pop3"], BAD, "wrong")
        assert pop3_login(server.ports["pop3"], GOOD, PASSWORD)
    finally:
        server.close()
        reader.stopping.set()
        reader.join(10)
        sock.close()
        os.unlink(path)
        os.rmdir(folder)
    # As rsyslog writes /var/log/mail.log: the priority dropped, the host name added.
    log = base / "mail.log"
    written = []
    lines = reader.lines
    for line in lines:
        m = LINE.match(line)
        assert m, line
        written.append(f"{m[2]} mx mailsrv[{m[3]}]: {m[4]}\n")
    log.write_text("".join(written))
    yield log, lines


def test_the_server_sends_its_lines_with_facility_mail(syslog_file) -> None:
    _, lines = syslog_file
    parsed = [LINE.match(line) for line in lines]
    assert parsed and all(parsed), lines
    assert {int(m[1]) >> 3 for m in parsed if m} == {MAIL}
    warnings = [int(m[1]) & 7 for m in parsed if m and m[4].startswith("warning: ")]
    assert warnings and set(warnings) == {4}
    text = "\n".join(lines)
    assert "starting on" in text and "Starting factory" not in text


@needs_fail2ban
@pytest.mark.parametrize(
    "spec",
    [
        "postfix.conf[mode=auth, _daemon=mailsrv]",
        "postfix.conf[mode=aggressive, _daemon=mailsrv]",
        "dovecot.conf[_daemon=mailsrv]",
    ],
)
def test_fail2ban_filters_find_the_failing_client(syslog_file, spec: str) -> None:
    log, _ = syslog_file
    ips = matched_ips(log, str(FILTERS / spec))
    assert len(ips) >= 2 and set(ips) == {BAD}, log.read_text()


def test_lines_wait_while_the_daemon_is_behind(syslog_socket) -> None:
    sock, path = syslog_socket
    clock = task.Clock()
    publisher = LogPublisher()
    config = parse(f'[log]\nsyslog = true\nsyslog_socket = "{path}"\n')
    service = SyslogService(syslog_settings(config), clock, publisher)
    service.privilegedStartService()
    service.startService()
    log = Logger(observer=publisher)
    for n in range(200):  # more than a datagram socket queues (max_dgram_qlen)
        log.info("line {n}", n=n)
    got = received(sock)
    assert 0 < len(got) < 200  # the rest waits; nothing raised into the logger
    while len(got) < 200:
        clock.advance(1)  # the service's flush, as the reactor runs it
        more = received(sock)
        assert more
        got += more
    assert [line.rpartition(": ")[2] for line in got] == [f"line {n}" for n in range(200)]
    assert service.observer.dropped == 0
    service.stopService()
