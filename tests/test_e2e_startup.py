"""
The end-to-end helper's start-up: it returns once every listener of the
real daemon listens, even when a port chosen free was taken meanwhile.
"""

from __future__ import annotations

import smtplib
import socket
import ssl

from tests.e2e import SERVICES, MailServer

GREETINGS = {
    "smtp": b"220 ",
    "submission": b"220 ",
    "submissions": b"220 ",
    "pop3": b"+OK",
    "pop3s": b"+OK",
    "imap": b"* OK",
    "imaps": b"* OK",
}


def greeting(name: str, port: int) -> bytes:
    """The first bytes the server sends on C{name}'s port (over TLS for the implicit-TLS ones)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if name in ("submissions", "pop3s", "imaps"):
        raw = ssl._create_unverified_context().wrap_socket(raw)
    with raw:
        return raw.recv(100)


def time_wait(port: int) -> None:
    """Leave C{port} in TIME_WAIT, as a connection to a port nobody listens on may (to itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.connect(("127.0.0.1", port))


def check_all_listeners(srv: MailServer, taken: int) -> None:
    for name in SERVICES:
        assert srv.ports[name] != taken
        assert greeting(name, srv.ports[name]).startswith(GREETINGS[name]), name
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        assert s.ehlo("client.test")[0] == 250


def test_a_port_taken_by_a_listener_meanwhile(tmp_path):
    """
    The last port the server binds is taken: it exits after binding the
    others, so a client that connected to those saw it go away.
    """
    srv = MailServer(tmp_path)
    taken = srv.ports["imaps"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        srv.start()
        try:
            check_all_listeners(srv, taken)
        finally:
            srv.stop()


def test_a_port_left_in_time_wait(tmp_path):
    srv = MailServer(tmp_path)
    taken = srv.ports["smtp"]
    time_wait(taken)
    srv.start()
    try:
        check_all_listeners(srv, taken)
    finally:
        srv.stop()
