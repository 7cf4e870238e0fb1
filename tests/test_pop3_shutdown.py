"""
At shutdown, open POP3 sessions hear C{-ERR [SYS/TEMP]} (RFC 3206 4) and
are closed, after the command under way; messages marked with DELE stay
(only QUIT removes them, RFC 1939 6).
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest

from tests.e2e import MailServer

from .test_pop3_support import ALICE, Session, deliver, make_ctx

GOODBYE = b"-ERR [SYS/TEMP] Server shutting down.\r\n"


@pytest.fixture
def ctx(tmp_path):
    return make_ctx(tmp_path)


def test_an_idle_session_hears_goodbye_and_is_closed(ctx):
    s = Session(ctx)
    s.take()
    done = s.factory.shut_down()
    assert s.take() == GOODBYE
    assert s.transport.disconnecting
    assert not done.called  # until the connection has closed
    s.close()
    assert done.called
    assert len(s.factory.open_sessions) == 0


def test_deleted_messages_stay_when_the_server_stops(ctx):
    deliver(ctx, b"Subject: one\n\nbody\n")
    s = Session(ctx)
    s.take()
    s.login()
    assert s.cmd("DELE 1").startswith(b"+OK")
    s.factory.shut_down()
    assert s.take() == GOODBYE
    s.close()
    s2 = Session(ctx)
    s2.take()
    s2.login()
    assert s2.cmd("STAT").startswith(b"+OK 1 ")


def test_a_command_under_way_is_answered_first_and_pipelined_ones_dropped(ctx):
    deliver(ctx, b"Subject: one\n\nbody\n")
    s = Session(ctx)
    s.take()
    s.login()
    pool = ctx.threadpool
    pool.hold = []
    s.proto.dataReceived(b"RETR 1\r\nSTAT\r\n")
    assert s.take() == b""  # RETR is reading; STAT waits its turn
    s.factory.shut_down()
    assert s.take() == b""  # not in the middle of RETR's answer
    pool.run_held()
    out = s.take()
    assert out.startswith(b"+OK ")
    assert out.endswith(b".\r\n" + GOODBYE)  # RETR whole, then goodbye; no STAT
    assert s.transport.disconnecting


def test_sessions_still_open_after_the_grace_are_cut(ctx):
    s = Session(ctx)
    aborted = []
    s.transport.abortConnection = lambda: aborted.append(True)
    s.transport.loseConnection = lambda: None  # a client that never reads its goodbye
    done = s.factory.shut_down()
    ctx.reactor.advance(s.factory.open_sessions.grace)
    assert aborted == [True]
    assert done.called


def test_the_daemon_says_goodbye_to_an_open_pop3_session_when_it_stops():
    base = Path(tempfile.mkdtemp(prefix="mailsrv-pop3-shutdown-"))
    server = MailServer(base)
    server.add_user(ALICE)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10) as c:
            f = c.makefile("rb")
            assert f.readline().startswith(b"+OK")
            server.proc.send_signal(signal.SIGTERM)
            assert f.readline() == GOODBYE
            assert f.readline() == b""  # then closed
        assert server.proc.wait(20) in (0, -signal.SIGTERM)
    finally:
        server.kill()
        shutil.rmtree(base, ignore_errors=True)
