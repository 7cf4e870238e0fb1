"""
At shutdown, open IMAP sessions hear C{* BYE} (RFC 3501 7.1.5) and are
closed: at once between commands and in IDLE, after the command under way
otherwise, on a real loopback connection; and from the daemon on SIGTERM.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
from pathlib import Path

from twisted.internet import defer

from tests.e2e import MailServer

from .imap_loopback_support import LoopbackIMAPCase, RawClient

BYE = b"* BYE Server shutting down.\r\n"


class Shutdown(LoopbackIMAPCase):
    @defer.inlineCallbacks
    def test_an_idle_session_hears_bye_and_is_closed(self):
        c = yield self.in_thread(RawClient, self.port_number)
        self.addCleanup(c.close)
        yield self.in_thread(c.login)
        yield self.factory.shut_down()
        rest = yield self.in_thread(c.file.read)
        self.assertEqual(rest, BYE)
        self.assertEqual(len(self.factory.open_sessions), 0)

    @defer.inlineCallbacks
    def test_a_session_in_idle_hears_bye_at_once(self):
        c = yield self.in_thread(RawClient, self.port_number)
        self.addCleanup(c.close)
        yield self.in_thread(c.login)
        yield self.in_thread(c.cmd, b"S", b"SELECT INBOX")
        c.send(b"I IDLE\r\n")
        line = yield self.in_thread(c.file.readline)
        self.assertTrue(line.startswith(b"+ "), line)
        yield self.factory.shut_down()
        rest = yield self.in_thread(c.file.read)
        self.assertEqual(rest, BYE)

    @defer.inlineCallbacks
    def test_an_append_under_way_gets_its_ok_before_bye(self):
        c = yield self.in_thread(RawClient, self.port_number)
        self.addCleanup(c.close)
        yield self.in_thread(c.login)
        message = b"Subject: kept\r\n\r\nbody\r\n"
        c.send(b"A APPEND INBOX {%d}\r\n" % len(message))
        line = yield self.in_thread(c.file.readline)
        self.assertTrue(line.startswith(b"+ "), line)
        done = self.factory.shut_down()  # the literal is still to come
        c.send(message + b"\r\n")
        yield done
        rest = yield self.in_thread(c.file.read)
        self.assertTrue(rest.startswith(b"A OK "), rest)
        self.assertTrue(rest.endswith(BYE), rest)
        c2 = yield self.in_thread(RawClient, self.port_number)  # still listening here
        self.addCleanup(c2.close)
        yield self.in_thread(c2.login)
        out = yield self.in_thread(c2.cmd, b"S", b"SELECT INBOX")
        self.assertIn(b"* 1 EXISTS\r\n", out)


def test_the_daemon_says_bye_to_an_open_imap_session_when_it_stops():
    base = Path(tempfile.mkdtemp(prefix="mailsrv-imap-shutdown-"))
    server = MailServer(base)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=10) as c:
            f = c.makefile("rb")
            assert f.readline().startswith(b"* OK")
            server.proc.send_signal(signal.SIGTERM)
            assert f.readline() == BYE
            assert f.readline() == b""  # then closed
        assert server.proc.wait(20) in (0, -signal.SIGTERM)
    finally:
        server.kill()
        shutil.rmtree(base, ignore_errors=True)
