"""
Reload end to end, the relay process: a SIGHUP that restarts it (the
config file changed) while it is delivering lets the SMTP transaction under
way finish, so that a message the remote server has taken (the final dot
sent, its reply not yet read) is not sent a second time (RFC 5321 6.1:
a message accepted must not be delivered again on a retry).
"""

from __future__ import annotations

import re
import smtplib
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e import PASSWORD
from tests.test_hangup import wait_for_log
from tests.test_reload_e2e import ALICE, Sink, edit, hup, message, server


class SlowSink(Sink):
    """A sink that takes C{delay} seconds to answer the final dot, as a filtering MTA does."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.dot = threading.Event()  # a message's final dot received, not yet answered
        super().__init__()

    def _session(self, rfile, conn) -> None:
        conn.sendall(b"220 sink.test ESMTP\r\n")
        while True:
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"DATA":
                conn.sendall(b"354 go on\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = rfile.readline()
                    if not chunk:
                        return
                    data += chunk
                self.messages.append(data)  # taken: it is delivered from here on
                self.dot.set()
                time.sleep(self.delay)
                conn.sendall(b"250 2.0.0 kept\r\n")
                self.got.set()
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")


@pytest.fixture
def slow_sink() -> Iterator[SlowSink]:
    s = SlowSink(2.0)
    yield s
    s.close()


def test_a_reload_during_a_delivery_sends_the_message_once(tmp_path, slow_sink):
    relay = f'[relay]\nsmarthost = "127.0.0.1:{slow_sink.port}"\nretry_min = 1\n'
    with server(tmp_path, relay) as srv:
        wait_for_log(srv, r"relay process started \(pid \d+\)")
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
            s.ehlo("client.test")
            s.login(ALICE, PASSWORD)
            s.sendmail(ALICE, ["carol@remote.test"], message(500, ALICE.encode()))
        assert slow_sink.dot.wait(30), srv.output()
        edit(srv, 'hostname = "mx.example.test"', 'hostname = "mx2.example.test"')
        text = hup(srv, r"relay process started \(pid \d+\)")
        assert len(set(re.findall(r"relay process started \(pid (\d+)\)", text))) == 2
        text = wait_for_log(srv, r"to=<carol@remote.test>.*status=(sent|deferred)")
        time.sleep(3)  # a retry, if any, comes after retry_min
        assert "status=sent" in text, text
        assert len(slow_sink.messages) == 1, srv.output()
