"""
The real daemon on SIGTERM: it stops accepting, a client sending a message
(in DATA) finishes it and gets 250 before the 421, and the message is in the
mailbox; a client between commands hears 421 at once.
"""

from __future__ import annotations

import signal
import socket

import pytest

from tests.e2e import MailServer

BOB = "bob@example.test"
GOODBYE = b"421 4.3.2 Service shutting down, try again later\r\n"


def _ehlo(port: int) -> tuple[socket.socket, object]:
    c = socket.create_connection(("127.0.0.1", port), timeout=20)
    f = c.makefile("rb")
    assert f.readline().startswith(b"220 ")
    c.sendall(b"EHLO client.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    return c, f


def _greeted(port: int) -> bool:
    """
    Whether a new connection is greeted. The listening socket closes one
    turn of the reactor after it stops accepting: a connection made in
    between is reset, never greeted.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            return c.recv(100).startswith(b"220")
    except OSError:
        return False


@pytest.fixture
def server(tmp_path):
    with MailServer(tmp_path) as s:
        s.add_user(BOB)
        yield s


def test_a_message_in_flight_at_sigterm_is_received_and_answered_250(server):
    port = server.ports["smtp"]
    sending, out = _ehlo(port)
    idle, idle_out = _ehlo(port)
    with sending, idle:
        sending.sendall(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<%s>\r\nDATA\r\n" % BOB.encode())
        assert out.readline().startswith(b"250 ")
        assert out.readline().startswith(b"250 ")
        assert out.readline().startswith(b"354 ")
        sending.sendall(b"Subject: in flight\r\n\r\nthe first half\r\n")
        server.proc.send_signal(signal.SIGTERM)
        assert idle_out.readline() == GOODBYE  # between commands: at once
        assert idle_out.readline() == b""
        assert not _greeted(port)  # no longer accepting
        sending.sendall(b"the second half\r\n.\r\n")
        assert out.readline().startswith(b"250 2.0.0 Ok: queued as ")
        assert out.readline() == GOODBYE
        assert out.readline() == b""
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    mbox = server.inbox(BOB).read_bytes()
    assert b"Subject: in flight" in mbox
    assert b"the first half\nthe second half\n" in mbox.replace(b"\r\n", b"\n")
