"""
Native journal entries (mailsrv.journal): each log event is one datagram in
systemd's native protocol on the journal socket, read here from a socket the
test binds. A real twistd started as systemd starts it (JOURNAL_STREAM names
its standard output) sends its lines there and not to standard output, and
fail2ban's stock postfix and dovecot filters find the failing client in
them as C{journalctl -o short} prints them, and only that client.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.logger import Logger, LogPublisher, textFileLogObserver

from mailsrv.config import ConfigError, parse
from mailsrv.journal import (
    JournalObserver,
    JournalService,
    journal_service,
    journal_settings,
    journal_stream,
)
from mailsrv.syslogobserver import MAX_PENDING_BYTES, rfc3164_time
from tests.e2e import LISTENING, PASSWORD, START_TIMEOUT, MailServer
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

MAIL = "2"  # RFC 5424 6.2.1: facility mail


def parse_entry(data: bytes) -> dict[str, str]:
    """The fields of one native-protocol datagram (both forms of a field)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:  # NAME\n, 64-bit little-endian length, value, \n
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture
def journal_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound Unix datagram socket standing for journald's (a short path: 108 octets)."""
    folder = tempfile.mkdtemp(prefix="journal-", dir="/tmp")
    path = os.path.join(folder, "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def received(sock: socket.socket) -> list[dict[str, str]]:
    entries = []
    while True:
        try:
            entries.append(parse_entry(sock.recv(1 << 20)))
        except BlockingIOError:
            return entries


def test_events_are_native_entries_with_priority_facility_and_fields(journal_socket) -> None:
    sock, path = journal_socket
    publisher = LogPublisher()
    publisher.addObserver(JournalObserver(path, "mail", pid=lambda: 4242))
    log = Logger(namespace="mailsrv.test", observer=publisher)
    log.warn("warning: {name}[{client}]: refused", name="unknown", client="192.0.2.1")
    log.info("{queue_id}: from=<a@example.test>", queue_id="4QX7Gk2abc")
    log.error("two\nlines")
    got = received(sock)
    assert [(e["MESSAGE"], e["PRIORITY"]) for e in got] == [
        ("warning: unknown[192.0.2.1]: refused", "4"),
        ("4QX7Gk2abc: from=<a@example.test>", "6"),
        ("two\nlines", "3"),  # one entry, in the length form
    ]
    for e in got:
        assert e["SYSLOG_FACILITY"] == MAIL
        assert e["SYSLOG_IDENTIFIER"] == "mailsrv"
        assert e["SYSLOG_PID"] == "4242"
        assert e["MAILSRV_LOGGER"] == "mailsrv.test"
    assert got[0]["MAILSRV_CLIENT"] == "192.0.2.1"
    assert got[1]["MAILSRV_QUEUE_ID"] == "4QX7Gk2abc"
    assert "MAILSRV_QUEUE_ID" not in got[0]


def test_a_full_or_missing_socket_keeps_the_newest_and_says_how_many_were_lost() -> None:
    folder = tempfile.mkdtemp(prefix="journal-", dir="/tmp")
    path = os.path.join(folder, "socket")
    publisher = LogPublisher()
    observer = JournalObserver(path)
    observer.max_pending = 5
    publisher.addObserver(observer)
    log = Logger(observer=publisher)
    for n in range(8):  # no journal yet: nothing raised into the logger
        log.info("line {n}", n=n)
    assert observer.dropped == 3
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        observer.flush()
        got = received(sock)
        assert [e["MESSAGE"] for e in got] == [f"line {n}" for n in range(3, 8)] + [
            "warning: 3 log lines lost: the journal socket was full or absent"
        ]
        assert got[-1]["PRIORITY"] == "4"
        log.info("later")
        assert [e["MESSAGE"] for e in received(sock)] == ["later"]
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def test_the_entries_kept_for_a_missing_journal_are_bounded_in_octets() -> None:
    # Long lines (a client's 64 KiB name, escaped) while journald is away:
    # 10,000 of them would be 640 MiB kept in memory.
    folder = tempfile.mkdtemp(prefix="journal-", dir="/tmp")
    path = os.path.join(folder, "socket")
    publisher = LogPublisher()
    observer = JournalObserver(path)
    publisher.addObserver(observer)
    log = Logger(observer=publisher)
    long_name = "x" * 60_000
    for n in range(200):
        log.info("{n} {name}", n=n, name=long_name)
    assert 0 < observer.dropped < 200  # the oldest went
    assert observer.pending_bytes <= MAX_PENDING_BYTES
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    try:
        observer.flush()
        got = [e["MESSAGE"].split(" ")[0] for e in received(sock)]
        assert got[0] == str(observer.dropped)  # the newest were kept
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def test_journal_stream_names_the_device_and_inode(tmp_path) -> None:
    with open(tmp_path / "out", "w") as f, open(tmp_path / "other", "w") as g:
        st = os.fstat(f.fileno())
        environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_stream(f.fileno(), environ)
        assert not journal_stream(g.fileno(), environ)
        assert not journal_stream(f.fileno(), {})


def test_the_setting_is_checked_and_auto_follows_journal_stream() -> None:
    with pytest.raises(ConfigError) as e:
        parse('[log]\njournal = "yes"\n')
    assert "log.journal" in str(e.value)
    st = os.fstat(1)
    under_systemd = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    clock = task.Clock()
    assert journal_settings(parse("")).mode == "auto"
    assert journal_service(parse(""), clock, {}) is None
    assert journal_service(parse(""), clock, under_systemd) is not None
    assert journal_service(parse("[log]\njournal = false\n"), clock, under_systemd) is None
    assert journal_service(parse("[log]\njournal = true\n"), clock, {}) is not None


def test_twistds_copy_on_the_journal_stream_stops_while_the_journal_gets_the_lines(
    journal_socket,
) -> None:
    sock, path = journal_socket
    st = os.fstat(1)
    publisher = LogPublisher()
    out = open(1, "w", closefd=False)  # twistd -n's log: standard output
    written: list[str] = []
    stdout_log = textFileLogObserver(out)
    publisher.addObserver(stdout_log)
    other = written.append  # an observer of another kind stays
    publisher.addObserver(other)
    config = parse(f'[log]\njournal_socket = "{path}"\n')
    service = JournalService(
        journal_settings(config),
        task.Clock(),
        {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        publisher,
    )
    service.privilegedStartService()
    service.startService()
    assert stdout_log not in publisher._observers and other in publisher._observers
    Logger(observer=publisher).info("kept")
    service.stopService()
    Logger(observer=publisher).info("stopped")  # the stop's last lines: to the journal too
    assert stdout_log not in publisher._observers
    assert [e["MESSAGE"] for e in received(sock)] == ["kept", "stopped"]
    assert len(written) == 2


def test_without_the_journal_stream_on_stdout_the_stdout_log_stays(journal_socket) -> None:
    sock, path = journal_socket
    publisher = LogPublisher()
    stdout_log = textFileLogObserver(open(1, "w", closefd=False))
    publisher.addObserver(stdout_log)
    config = parse(f'[log]\njournal = true\njournal_socket = "{path}"\n')
    service = JournalService(journal_settings(config), task.Clock(), {}, publisher)
    service.privilegedStartService()
    service.startService()
    Logger(observer=publisher).info("both")
    service.stopService()
    Logger(observer=publisher).info("after")
    assert stdout_log in publisher._observers
    assert [e["MESSAGE"] for e in received(sock)] == ["both"]


class Reader(threading.Thread):
    """Reads the journal socket as journald does, while the server runs."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        sock.settimeout(0.05)
        self.sock = sock
        self.entries: list[dict[str, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.entries.append(parse_entry(self.sock.recv(1 << 20)))
            except TimeoutError:
                if self.stopping.is_set():
                    return


class SystemdServer(MailServer):
    """A server started as systemd starts it: its standard output is the journal's stream."""

    def __init__(self, base: Path, reader: Reader) -> None:
        super().__init__(base, log_to_stdout=True)
        self.reader = reader

    def _spawn(self) -> None:
        self.log_path.touch()
        st = os.stat(self.log_path)
        saved = os.environ.get("JOURNAL_STREAM")
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            super()._spawn()
        finally:
            if saved is None:
                del os.environ["JOURNAL_STREAM"]
            else:
                os.environ["JOURNAL_STREAM"] = saved

    def _wait_listening(self, offsets) -> bool:
        """The listeners' lines are in the journal now, not on standard output."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = "\n".join(e.get("MESSAGE", "") for e in list(self.reader.entries))
            if set(self.ports.values()) <= {int(p) for p in LISTENING.findall(text)}:
                return True
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("not listening")
            time.sleep(0.02)


@pytest.fixture(scope="module")
def journal_run(tmp_path_factory) -> Iterator[tuple[Path, list[dict[str, str]], str]]:
    """The journal entries of a real server while clients failed and succeeded to log in."""
    base = tmp_path_factory.mktemp("journal")
    folder = tempfile.mkdtemp(prefix="journal-", dir="/tmp")
    path = os.path.join(folder, "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    reader = Reader(sock)
    reader.start()
    server = SystemdServer(base, reader)
    with_max_failures(server, 2)
    with open(server.config_path, "a") as f:
        f.write(f'\n[log]\njournal_socket = "{path}"\n')
    server.add_user(USER)
    try:
        server.start()
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
    # As `journalctl -o short` prints them: time, host, IDENTIFIER[PID]: MESSAGE.
    log = base / "journal.txt"
    now = rfc3164_time(time.time())
    log.write_text(
        "".join(
            f"{now} mx {e['SYSLOG_IDENTIFIER']}[{e['SYSLOG_PID']}]: {line}\n"
            for e in reader.entries
            for line in e["MESSAGE"].splitlines()
        )
    )
    yield log, reader.entries, server.log_path.read_text()


def test_the_server_sends_native_entries_and_no_stdout_copy(journal_run) -> None:
    _, entries, stdout = journal_run
    assert entries
    assert {e["SYSLOG_FACILITY"] for e in entries} == {MAIL}
    assert {e["SYSLOG_IDENTIFIER"] for e in entries} == {"mailsrv"}
    failures = [e for e in entries if "authentication failed" in e["MESSAGE"]]
    assert failures and {e["PRIORITY"] for e in failures} == {"4"}
    assert {e["MAILSRV_CLIENT"] for e in failures} == {BAD}
    messages = "\n".join(e["MESSAGE"] for e in entries)
    assert "Starting factory" not in messages
    assert "SASL" in messages and "imap-login: Login" in messages
    # twistd's own lines before the journal was set up are on standard
    # output; none of what went to the journal is there as well.
    assert "authentication failed" not in stdout and "imap-login" not in stdout
    assert not LISTENING.search(stdout) and "Main loop terminated" not in stdout
    assert "Main loop terminated" in messages


@needs_fail2ban
@pytest.mark.parametrize(
    "spec",
    [
        "postfix.conf[mode=aggressive, _daemon=mailsrv]",
        "dovecot.conf[_daemon=mailsrv]",
    ],
)
def test_fail2ban_filters_find_the_failing_client_in_the_journal(journal_run, spec) -> None:
    log, _, _ = journal_run
    ips = matched_ips(log, str(FILTERS / spec))
    assert len(ips) >= 2 and set(ips) == {BAD}, log.read_text()
    assert GOOD not in ips
