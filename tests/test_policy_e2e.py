"""
The connection gate on a real ``twistd -n mailsrv`` over loopback: what a
refused client of each protocol reads (plain and implicit TLS), denied
networks, the pregreet test, and a flood of connections from one address
that leaves the server serving everyone else.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import resource
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.e2e import MailServer

TIMEOUT = 15


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    return s


def first_line(s: socket.socket) -> bytes:
    """The first line the server sends (b"" if it closes without one)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def closed_after(s: socket.socket) -> bool:
    """Whether the server closes the connection after what it sent."""
    return s.recv(1024) == b""


def tls_first_line(port: int, source: str = "127.0.0.1") -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(connect(port, source)) as s:
        return first_line(s)


@contextlib.contextmanager
def server_with(tmp_path, policy: str, nofile: int | None = None) -> Iterator[MailServer]:
    """A server with the given [policy] lines (and, if given, that many file descriptors)."""
    srv = MailServer(tmp_path, extra="[policy]\n" + policy)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if nofile is not None:  # the server inherits the limit it starts with
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
        try:
            srv.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        yield srv
    finally:
        srv.close()


def test_the_excess_of_each_protocol_is_told_and_disconnected(tmp_path):
    with server_with(tmp_path, "max_connections_per_ip = 1\n") as srv:
        # One connection from 127.0.0.1 to each listener: the most it may have.
        held = {name: connect(port) for name, port in srv.ports.items()}
        assert first_line(held["smtp"]).startswith(b"220 ")
        assert first_line(held["imap"]).startswith(b"* OK")
        # RFC 5321 3.8: 421 and the channel closes; RFC 3206: -ERR [SYS/TEMP]; RFC 3501: BYE.
        for name, expected in [
            ("smtp", b"421 4.7.0 mx.example.test Too many connections from your address"),
            ("submission", b"421 4.7.0 "),
            ("pop3", b"-ERR [SYS/TEMP] Too many connections from your address"),
            ("imap", b"* BYE [UNAVAILABLE] Too many connections from your address"),
        ]:
            with connect(srv.ports[name]) as s:
                assert first_line(s).startswith(expected), name
                assert closed_after(s), name
        # Implicit TLS: the refusal comes over TLS.
        assert tls_first_line(srv.ports["pop3s"]).startswith(b"-ERR [SYS/TEMP]")
        assert tls_first_line(srv.ports["imaps"]).startswith(b"* BYE [UNAVAILABLE]")
        assert tls_first_line(srv.ports["submissions"]).startswith(b"421 4.7.0 ")
        # Another address is served; one connection closed makes room again.
        with smtplib.SMTP(timeout=TIMEOUT, source_address=("127.0.0.2", 0)) as other:
            assert other.connect("127.0.0.1", srv.ports["smtp"])[0] == 220
            assert other.ehlo("client.test")[0] == 250
        held.pop("pop3").close()
        deadline = time.monotonic() + TIMEOUT
        while True:
            with connect(srv.ports["pop3"]) as s:
                line = first_line(s)
            if line.startswith(b"+OK") or time.monotonic() > deadline:
                break
        assert line.startswith(b"+OK")
        for s in held.values():
            s.close()
        log = (srv.base / "server.log").read_text()
        # One line a minute per address, however many were refused.
        assert log.count("refused a connection from 127.0.0.1") == 1
        assert "too many connections from the address" in log


def test_denied_and_allowed_networks(tmp_path):
    denied = tmp_path / "deny.cidr"
    denied.write_text("# bad neighbours\n127.0.0.3/32\n::ffff:127.0.0.4/128  # mapped\n")
    policy = (
        'deny = ["127.0.0.5"]\n'
        'deny_file = "deny.cidr"\n'
        'allow = ["127.0.0.6/32"]\n'
        "max_connections_per_ip = 1\n"
    )
    with server_with(tmp_path, policy) as srv:
        for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
            with connect(srv.ports["smtp"], source) as s:
                # RFC 5321 3.1: 554 as the greeting refuses the session.
                assert first_line(s) == b"554 5.7.1 mx.example.test Access denied\r\n"
                assert closed_after(s)
            with connect(srv.ports["pop3"], source) as s:
                assert first_line(s) == b"-ERR [SYS/PERM] Access denied\r\n"
            with connect(srv.ports["imap"], source) as s:
                assert first_line(s) == b"* BYE Access denied\r\n"
        # An allowed network skips the limits: three at once where one is the limit.
        allowed = [connect(srv.ports["pop3"], "127.0.0.6") for _ in range(3)]
        assert all(first_line(s).startswith(b"+OK") for s in allowed)
        for s in allowed:
            s.close()
        # The file is read again when it changes.
        denied.write_text("127.0.0.7/32\n")
        then = time.time() - 10  # whole: written a while ago
        os.utime(denied, (then, then))
        deadline = time.monotonic() + TIMEOUT
        while True:
            with connect(srv.ports["pop3"], "127.0.0.3") as s:
                line = first_line(s)
            if line.startswith(b"+OK") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert line.startswith(b"+OK")
        with connect(srv.ports["pop3"], "127.0.0.7") as s:
            assert first_line(s).startswith(b"-ERR [SYS/PERM]")


def test_a_client_that_talks_before_the_greeting_is_refused(tmp_path):
    with server_with(tmp_path, 'pregreet_wait = "500ms"\n') as srv:
        with connect(srv.ports["smtp"]) as s:
            s.sendall(b"EHLO early.test\r\n")  # RFC 5321 4.3.1: the greeting comes first
            assert first_line(s) == (
                b"554 5.5.1 mx.example.test Protocol error: talked before the greeting\r\n"
            )
            assert closed_after(s)
        # A client that waits is greeted after the wait and served.
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=TIMEOUT) as ok:
            assert time.monotonic() - started >= 0.45
            assert ok.ehlo("client.test")[0] == 250
        # Submission never waits: its clients are not tested.
        with connect(srv.ports["submission"]) as s:
            s.sendall(b"EHLO early.test\r\n")
            assert first_line(s).startswith(b"220 ")
        assert "pregreet" in (srv.base / "server.log").read_text()


FLOOD = 5000
SERVER_FILES = 1024  # the server's RLIMIT_NOFILE: far fewer than the flood
TLS_FLOOD = 2000
FLOOD_BUDGET = 60.0  # seconds: without the gate, attempts past the server's files hang


def flood_of(port: int, attempts: int, budget: float) -> tuple[int, list[socket.socket]]:
    """Connect from 127.0.0.2 C{attempts} times, keeping every connection made open."""
    held: list[socket.socket] = []
    made = 0
    deadline = time.monotonic() + budget
    while made < attempts and time.monotonic() < deadline:
        made += 1
        s = socket.socket()
        s.settimeout(0.02)  # a SYN the full accept queue drops: one attempt, not a wait
        try:
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        held.append(s)
    return made, held


def test_a_flood_from_one_address_leaves_the_server_serving_others(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FLOOD + TLS_FLOOD + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {need}")
    flood: list[socket.socket] = []
    with server_with(tmp_path, "", nofile=SERVER_FILES) as srv:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
        try:
            attempts, flood = flood_of(srv.ports["smtp"], FLOOD, FLOOD_BUDGET)
            assert attempts == FLOOD
            assert len(flood) > SERVER_FILES, len(flood)
            # Clients that never start the TLS their refusal is sent over.
            tls_attempts, tls_flood = flood_of(srv.ports["pop3s"], TLS_FLOOD, FLOOD_BUDGET)
            flood += tls_flood
            assert tls_attempts == TLS_FLOOD and len(tls_flood) > SERVER_FILES
            # The server still greets and serves another address.
            with smtplib.SMTP(timeout=TIMEOUT) as other:
                assert other.connect("127.0.0.1", srv.ports["smtp"])[0] == 220
                assert other.ehlo("client.test")[0] == 250
                assert other.noop()[0] == 250
            p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=TIMEOUT)
            assert p.getwelcome().startswith(b"+OK")
            p.quit()
            assert tls_first_line(srv.ports["pop3s"]).startswith(b"+OK")
            with imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=TIMEOUT) as m:
                assert m.noop()[0] == "OK"
        finally:
            for s in flood:
                s.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
