"""
APPEND's message argument with RFC 6855 4's UTF8 data extension,
``UTF8 (~{n}CRLF octets)`` (a literal8, RFC 4466), beside the ordinary
literal: the argument parser of APPEND's command table entry.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4

from mailsrv.imap.parsing import CommandParser

_UTF8_DATA = re.compile(rb"UTF8 \(~\{(\d{1,18})(\+?)\}$", re.IGNORECASE)
_NOT_ENABLED = b"UTF8 APPEND data needs ENABLE UTF8=ACCEPT"


def arg_append_data(proto: Any, line: bytes | None) -> Any:
    """
    The message of an APPEND: an ordinary literal, or a UTF8 data item,
    taken only from a session that enabled UTF8=ACCEPT (RFC 6855 4: else a
    NO). Either way a Deferred of (spooled source, rest of the line).
    """
    m = _UTF8_DATA.match((line or b"").strip())
    if m is None:
        return CommandParser.arg_literal(proto, line)
    size, plus = m.group(1), m.group(2)
    if not proto.utf8_accept and not plus:
        # Refused before the client is asked for the octets (RFC 3501 7.5).
        proto.sendNegativeResponse(proto._current_tag, _NOT_ENABLED)
        return defer.Deferred()  # never fires: the command is over
    d = CommandParser.arg_literal(proto, b"{" + size + plus + b"}")

    def closed(result: tuple[Any, bytes]) -> Any:
        source, rest = result
        if rest[:1] != b")":
            source.discard()
            raise imap4.IllegalClientResponse("Missing ) after UTF8 data")
        if not proto.utf8_accept:
            # A LITERAL+ sender had sent the octets already: read, then refused.
            source.discard()
            proto.sendNegativeResponse(proto._current_tag, _NOT_ENABLED)
            return defer.Deferred()
        return source, rest[1:]

    return d.addCallback(closed)
