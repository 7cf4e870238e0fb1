"""
The POP3 server: Twisted's L{pop3.POP3} over our store.

RFC 1939 (POP3), RFC 2449 (CAPA, response codes), RFC 2595 (STLS),
RFC 3206 (SYS and AUTH response codes), RFC 5034 (SASL AUTH), RFC 4616 (PLAIN).

Twisted's server lacks STLS, names PIPELINING wrongly, advertises joke
capabilities, does not hold pipelined commands during a login, byte-stuffs
only inside each chunk and sends a message in pieces over several reactor
turns. This subclass keeps its timeouts, its logout-on-disconnect and the
IMailboxPOP3 avatar contract, and replaces the command handling: each reply
is one write, handed to the socket at once, and a sequential download finds
its next messages already read (off the reactor thread).
"""

from mailsrv.pop3.factory import POP3Factory, pop3_factory
from mailsrv.pop3.maildrop import (
    Maildrop,
    MaildropInUse,
    MaildropLocks,
    open_maildrop,
    uidl,
)
from mailsrv.pop3.server import POP3Server
from mailsrv.pop3.transaction import WHOLE_MESSAGE, dot_stuff, terminator, top_of

__all__ = [
    "WHOLE_MESSAGE",
    "Maildrop",
    "MaildropInUse",
    "MaildropLocks",
    "POP3Factory",
    "POP3Server",
    "dot_stuff",
    "open_maildrop",
    "pop3_factory",
    "terminator",
    "top_of",
    "uidl",
]
