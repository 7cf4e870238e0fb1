"""
What the IMAP server needs of Twisted's L{imap4.IMAP4Server} (and of its
L{basic.LineReceiver}) beyond their documented API, each named here with the
reason it is needed. The rest of C{mailsrv.imap} goes through this module,
so a Twisted release that changes one of these breaks one place, and
C{tests/test_imap_twistedcompat.py} says which.

The connection code that stays in C{server.py} (the command loop, login,
STARTTLS, the idle timeout and the bad-command counter, about to become
helpers shared with SMTP and POP3) still uses a few directly: it overrides
C{_respond} (every response passes through it: it counts BADs and releases
the next pipelined command), sets C{_onLogout} (Twisted's C{connectionLost}
calls the avatar's logout through it), reads C{_pendingLiteral} (the literal
receiver, in C{rawDataReceived} and C{connectionLost}) and C{_buffer}
(LineReceiver's unread octets, in C{lineLengthExceeded}).
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
