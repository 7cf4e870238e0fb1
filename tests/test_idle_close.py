"""
A session idle too long says goodbye and closes, and is cut when the client
does not read that goodbye (mailsrv.session.IdleClose), the same in SMTP,
POP3 and IMAP. On a task.Clock and a StringTransport, whose clean close
never completes: just what a client that has stopped reading looks like.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.testing import StringTransport

from mailsrv.session import GOODBYE_GRACE, IdleClose

from .test_deadlines import _imap, _pop3, _smtp

GOODBYES = {
    _smtp: b"421 4.4.2 ",
    _pop3: b"-ERR Disconnected for inactivity.\r\n",
    _imap: b"* BYE Autologout; connection idle too long\r\n",
}


class _Transport(StringTransport):
    """Records abortConnection; a clean close never completes."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def _idle_timeout(proto) -> float:
    return getattr(proto, "timeOut", None) or proto.timeout


# --- the helper alone ------------------------------------------------------------------


def test_goodbye_then_clean_close_then_cut_after_the_grace():
    clock = task.Clock()
    t = _Transport()
    idle = IdleClose(clock, grace=5)
    assert idle.expire(t, lambda: t.write(b"bye\r\n")) is True
    assert t.value() == b"bye\r\n"
    assert t.disconnecting and not t.aborted
    clock.advance(4.9)
    assert not t.aborted
    clock.advance(0.1)
    assert t.aborted


def test_no_cut_once_the_connection_is_gone():
    clock = task.Clock()
    t = _Transport()
    idle = IdleClose(clock, grace=5)
    idle.expire(t, lambda: t.write(b"bye\r\n"))
    idle.connection_lost()
    clock.advance(10)
    assert not t.aborted
    assert clock.getDelayedCalls() == []


def test_backed_up_output_is_cut_at_once_without_a_goodbye():
    clock = task.Clock()
    t = _Transport()
    said = []
    assert IdleClose(clock).expire(t, lambda: said.append(1), backed_up=True) is False
    assert t.aborted and said == [] and t.value() == b""
    assert clock.getDelayedCalls() == []


def test_a_close_already_under_way_is_cut_at_once():
    clock = task.Clock()
    t = _Transport()
    t.loseConnection()
    said = []
    assert IdleClose(clock).expire(t, lambda: said.append(1)) is False
    assert t.aborted and said == []


# --- the three protocols ---------------------------------------------------------------


def test_every_protocol_cuts_a_client_that_does_not_read_its_goodbye():
    for make, goodbye in GOODBYES.items():
        proto, clock = make(False)
        t = _Transport()
        proto.makeConnection(t)
        t.clear()
        clock.advance(_idle_timeout(proto))
        assert t.value().startswith(goodbye), (make, t.value())
        assert t.disconnecting and not t.aborted, make
        clock.advance(GOODBYE_GRACE)
        assert t.aborted, make


def test_every_protocol_closes_a_reading_client_cleanly():
    for make in GOODBYES:
        proto, clock = make(False)
        t = _Transport()
        proto.makeConnection(t)
        clock.advance(_idle_timeout(proto))
        assert t.disconnecting, make
        proto.connectionLost(None)  # the client read the goodbye and closed
        clock.advance(GOODBYE_GRACE)
        assert not t.aborted, make


def test_every_protocol_cuts_at_once_when_already_closing():
    """A QUIT/LOGOUT answered but never read: the idle timer cuts it without another goodbye."""
    for make in GOODBYES:
        proto, clock = make(False)
        t = _Transport()
        proto.makeConnection(t)
        t.loseConnection()
        t.clear()
        clock.advance(_idle_timeout(proto))
        assert t.aborted, make
        assert t.value() == b"", make
