"""
What the IMAP server needs of Twisted's L{imap4.IMAP4Server} (and of its
L{basic.LineReceiver}) beyond their documented API, each named here with the
reason it is needed. The rest of C{mailsrv.imap} goes through this module,
so a Twisted release that changes one of these breaks one place, and
C{tests/test_imap_twistedcompat.py} says which.

Nothing else in C{mailsrv.imap} names a private member of Twisted's
classes; C{tests/test_imap_twistedcompat.py} checks that by reading the
source.
"""

from __future__ import annotations

from typing import Any

from twisted.mail import imap4

# Command states. IMAP4Server looks a command up as the attribute
# "<state>_<COMMAND>" of the protocol (lookupCommand), so these names are
# Twisted's, and a state change is an assignment to the protocol's `state`.
UNAUTH = "unauth"
AUTH = "auth"
SELECTED = "select"
LOGOUT = "logout"
STATES = (UNAUTH, AUTH, SELECTED, LOGOUT)

# Parse states. IMAP4Server.lineReceived hands each line to the method
# "parse_<parseState>": Twisted's parse_command reads a command line,
# Twisted's parse_pending the rest of the line after a literal.
PARSE_COMMAND = "command"
PARSE_LITERAL = "pending"

# A literal receiver for a string argument up to the string literal limit:
# write(data) returns what is past the literal, callback(line) fires the
# Deferred with (octets, rest of the line). Public in imap4, not documented.
LiteralString = imap4.LiteralString

# Twisted's argument parsers, reused as they are: each takes (protocol, line)
# and returns (argument, rest of the line); their names are the protocol's.
arg_atom = imap4.IMAP4Server.arg_atom
arg_line = imap4.IMAP4Server.arg_line
arg_plist = imap4.IMAP4Server.arg_plist
arg_flaglist = imap4.IMAP4Server.arg_flaglist
opt_plist = imap4.IMAP4Server.opt_plist
opt_datetime = imap4.IMAP4Server.opt_datetime


def command_entry(proto: Any, state: str, name: str) -> Any:
    """
    The command table entry, (handler, parser, ...), of command C{name}
    (upper case) in C{state}, or None: the "<state>_<NAME>" convention of
    IMAP4Server.lookupCommand.
    """
    return getattr(proto, f"{state}_{name}", None)


def set_pending_literal(proto: Any, receiver: Any) -> None:
    """
    Hand the octets of a literal to C{receiver} (C{write(data)} returns None
    while it wants more, else the octets past the literal; C{callback(line)}
    gets the rest of the command line). Twisted's rawDataReceived and
    parse_pending read the receiver from the private C{_pendingLiteral}; the
    caller switches to raw mode (C{setRawMode}) once the client may send.
    """
    proto.parseState = PARSE_LITERAL
    proto._pendingLiteral = receiver


class ResponseHook(imap4.IMAP4Server):
    """
    A mixin that tells the server of every status response it sends.
    Twisted's IMAP4Server writes each one (tagged, and the untagged ones it
    queued) through its private C{_respond}, and has no public hook: the
    server needs one to count BADs (the bad-command limit) and to release
    the next pipelined command once the current one is answered.
    """

    def _respond(self, state: bytes, tag: bytes | None, message: bytes | str | None) -> None:
        if isinstance(message, str):
            message = message.encode("utf-8")
        super()._respond(state, tag, message)
        self.responded(state, tag)

    def responded(self, state: bytes, tag: bytes | None) -> None:
        """A status response C{state} (OK, NO, BAD, ...) went out for C{tag} (None: untagged)."""


def set_logout(proto: Any, logout: Any) -> None:
    """
    Call C{logout} (the avatar's, from the portal) when the connection ends.
    Twisted's IMAP4Server.connectionLost calls it through the private
    C{_onLogout}, which its own LOGIN sets; our login is our own.
    """
    proto._onLogout = logout


def pending_literal(proto: Any) -> Any:
    """
    The receiver of the literal being read (see L{set_pending_literal}), or
    None: Twisted keeps it in the private C{_pendingLiteral}, which our raw
    mode reads (to count literal progress) and connectionLost reads (to
    discard a spooled literal).
    """
    return getattr(proto, "_pendingLiteral", None)


def set_unread(proto: Any, data: bytes) -> bytes:
    """
    Replace the octets LineReceiver has read but not yet split into lines
    (its private C{_buffer}) with C{data}, and return them: after an
    over-long command line, what follows its CRLF is read as usual.
    """
    proto._buffer = data
    return data
