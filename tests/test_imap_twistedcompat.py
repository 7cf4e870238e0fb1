"""
The members of Twisted's IMAP4Server the IMAP server relies on beyond its
documented API (mailsrv/imap/twistedcompat.py), checked on Twisted's own
server so that a Twisted release that changes one fails here first.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.mail import imap4

from mailsrv.imap import twistedcompat
from mailsrv.imap.server import IMAPServer


def connected() -> imap4.IMAP4Server:
    proto = imap4.IMAP4Server()
    proto.makeConnection(StringTransport())
    proto.setTimeout(None)
    return proto


def test_command_states_are_twisteds():
    proto = connected()
    assert proto.state == twistedcompat.UNAUTH
    assert twistedcompat.command_entry(proto, twistedcompat.UNAUTH, "LOGIN")[0] == (
        imap4.IMAP4Server.do_LOGIN
    )
    assert twistedcompat.command_entry(proto, twistedcompat.AUTH, "SELECT") is not None
    assert twistedcompat.command_entry(proto, twistedcompat.SELECTED, "FETCH") is not None
    assert twistedcompat.command_entry(proto, twistedcompat.LOGOUT, "LOGOUT") is not None
    assert twistedcompat.command_entry(proto, twistedcompat.AUTH, "FETCH") is None
    assert twistedcompat.STATES == ("unauth", "auth", "select", "logout")


def test_state_names_reach_twisteds_lookup():
    proto = connected()
    proto.state = twistedcompat.SELECTED
    assert proto.lookupCommand(b"fetch") == proto.select_FETCH


def test_parse_states_are_twisteds():
    proto = connected()
    assert proto.parseState == twistedcompat.PARSE_COMMAND
    assert callable(getattr(proto, "parse_" + twistedcompat.PARSE_COMMAND))
    assert callable(getattr(proto, "parse_" + twistedcompat.PARSE_LITERAL))


def test_pending_literal_receives_the_octets_then_the_rest_of_the_line():
    proto = connected()
    d: defer.Deferred = defer.Deferred()
    got = []
    d.addCallback(got.append)
    twistedcompat.set_pending_literal(proto, twistedcompat.LiteralString(5, d))
    proto.setRawMode()
    proto.dataReceived(b"hel")
    assert got == []
    proto.dataReceived(b"lo rest of line\r\n")
    assert got == [(b"hello", b" rest of line")]
    assert proto.parseState == twistedcompat.PARSE_COMMAND


def test_twisteds_argument_parsers():
    proto = connected()
    assert twistedcompat.arg_atom(proto, b"+FLAGS (x)") == (b"+FLAGS", b"(x)")
    assert twistedcompat.arg_line(proto, b"all of it") == (b"all of it", b"")
    assert twistedcompat.arg_plist(proto, b"(MESSAGES UNSEEN)") == (
        [b"MESSAGES", b"UNSEEN"],
        b"",
    )
    assert twistedcompat.opt_plist(proto, b"{3}") == (None, b"{3}")
    date, rest = twistedcompat.opt_datetime(proto, b'"17-Jul-1996 02:44:25 -0700" {3}')
    assert (date, rest) == (b"17-Jul-1996 02:44:25 -0700", b"{3}")
    assert twistedcompat.arg_flaglist(proto, b"(\\Seen $Label)") == (
        [b"\\Seen", b"$Label"],
        b"",
    )


def test_the_server_keeps_only_capability_and_logout_of_twisteds_commands():
    """Every other command of Twisted's is replaced (the logout state's NOOP is never reached)."""
    names = {
        n
        for n in dir(imap4.IMAP4Server)
        if n.split("_", 1)[0] in twistedcompat.STATES and n.split("_", 1)[-1].isupper()
    }
    kept = {n for n in names if getattr(IMAPServer, n) is getattr(imap4.IMAP4Server, n)}
    assert kept == {
        *(f"{state}_{name}" for state in twistedcompat.STATES for name in ("CAPABILITY", "LOGOUT")),
        "logout_NOOP",
    }
