"""At shutdown, open SMTP sessions hear 421 (RFC 5321 3.8), after the command under way."""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
from pathlib import Path

from twisted.internet import defer

from mailsrv.smtp.shutdown import DATA_GRACE
from mailsrv.store.memory import MemoryMailStore
from tests.e2e import MailServer

from .test_smtp_helpers import Session, make_context, read_inbox

GOODBYE = "421 4.3.2 Service shutting down, try again later"

BOB = "bob@example.test"


class HeldStore(MemoryMailStore):
    """Deliveries wait until the test lets them through."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.held: list[tuple[tuple, defer.Deferred]] = []

    def deliver(self, user, source, sender, folder="INBOX"):
        d: defer.Deferred = defer.Deferred()
        self.held.append(((user, source, sender), d))
        return d

    def release(self) -> None:
        for args, d in self.held:
            super().deliver(*args).chainDeferred(d)
        self.held = []


def test_an_idle_session_hears_421_and_is_closed():
    s = Session(make_context())
    s.cmd("EHLO client.test")
    done = s.factory.shut_down()
    assert s.take() == ["421 4.3.2 Service shutting down, try again later"]
    assert s.transport.disconnecting
    assert not done.called  # until the connection has closed
    s.close()
    assert done.called
    assert s.factory.open_sessions == set()


def _in_data(ctx):
    s = Session(ctx)
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<x@remote.test>")
    s.cmd(f"RCPT TO:<{BOB}>")
    s.cmd("DATA")
    s.send("Subject: half\r\n\r\nthe first line\r\n")
    return s


def test_a_message_being_sent_is_received_to_its_end_and_answered_250_then_421():
    ctx = make_context()
    s = _in_data(ctx)
    done = s.factory.shut_down()
    assert s.take() == []  # the client goes on sending
    assert not s.transport.disconnecting
    replies = s.send("the second line\r\n.\r\n")
    assert replies[0].startswith("250 2.0.0")
    assert replies[1:] == [GOODBYE]
    assert s.transport.disconnecting
    s.close()
    assert done.called
    [message] = read_inbox(ctx, BOB)
    assert b"the first line\nthe second line\n" in message


def test_a_message_not_ended_within_the_data_grace_is_cut_and_not_stored():
    ctx = make_context()
    s = _in_data(ctx)
    aborted = []
    s.transport.abortConnection = lambda: aborted.append(True)
    done = s.factory.shut_down(grace=5)
    ctx.reactor.advance(5)
    assert aborted == []  # the short grace is for sessions between commands
    ctx.reactor.advance(DATA_GRACE - 5)
    assert aborted == [True]
    assert s.take() == []  # no 250: the client keeps the message
    s.close()
    assert done.called
    assert read_inbox(ctx, BOB) == []


def test_a_message_being_stored_gets_its_250_first():
    store = HeldStore()
    ctx = make_context(store=store)
    s = Session(ctx)
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<x@remote.test>")
    s.cmd(f"RCPT TO:<{BOB}>")
    s.cmd("DATA")
    assert s.send("Subject: kept\r\n\r\nbody\r\n.\r\n") == []  # waiting for the store
    done = s.factory.shut_down()
    assert s.take() == []  # not while the message is being stored
    store.release()
    replies = s.take()
    assert replies[0].startswith("250 2.0.0")
    assert replies[1:] == ["421 4.3.2 Service shutting down, try again later"]
    assert s.transport.disconnecting
    s.close()
    assert done.called
    assert len(read_inbox(ctx, BOB)) == 1


def test_a_message_ended_just_before_the_data_grace_is_not_cut_while_stored():
    # Cut while its store runs, the message would be stored without the
    # client hearing 250: the client would send it again.
    store = HeldStore()
    ctx = make_context(store=store)
    s = _in_data(ctx)
    aborted = []
    s.transport.abortConnection = lambda: aborted.append(True)
    done = s.factory.shut_down(grace=5)
    ctx.reactor.advance(DATA_GRACE - 1)
    assert s.send("the end\r\n.\r\n") == []  # being stored
    ctx.reactor.advance(2)
    assert aborted == []
    store.release()
    replies = s.take()
    assert replies[0].startswith("250 2.0.0")
    assert replies[1:] == [GOODBYE]
    assert len(read_inbox(ctx, BOB)) == 1
    ctx.reactor.advance(5)  # a client that does not close on its 421 is cut then
    assert aborted == [True]
    s.close()
    assert done.called


def test_a_message_stored_beyond_the_grace_gets_its_250_before_the_cut():
    store = HeldStore()
    ctx = make_context(store=store)
    s = Session(ctx)
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<x@remote.test>")
    s.cmd(f"RCPT TO:<{BOB}>")
    s.cmd("DATA")
    assert s.send("Subject: slow disk\r\n\r\nbody\r\n.\r\n") == []
    aborted = []
    s.transport.abortConnection = lambda: aborted.append(True)
    s.factory.shut_down(grace=5)
    ctx.reactor.advance(DATA_GRACE + 5)
    assert aborted == []
    store.release()
    assert s.take()[0].startswith("250 2.0.0")
    assert len(read_inbox(ctx, BOB)) == 1


def test_sessions_still_open_after_the_grace_are_cut():
    ctx = make_context()
    s = Session(ctx)
    aborted = []
    s.transport.abortConnection = lambda: aborted.append(True)
    s.factory.shut_down(grace=5)
    ctx.reactor.advance(5)
    assert aborted == [True]


def test_the_daemon_says_421_to_an_open_session_when_it_stops():
    base = Path(tempfile.mkdtemp(prefix="mailsrv-shutdown-"))
    server = MailServer(base)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as c:
            f = c.makefile("rb")
            assert f.readline().startswith(b"220 ")
            c.sendall(b"EHLO client.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            server.proc.send_signal(signal.SIGTERM)
            assert f.readline() == b"421 4.3.2 Service shutting down, try again later\r\n"
            assert f.readline() == b""  # then closed
        assert server.proc.wait(20) in (0, -signal.SIGTERM)
    finally:
        server.kill()
        shutil.rmtree(base, ignore_errors=True)
