"""
The protocol servers in parts, each module with one job and under about 600
lines, the old import paths still giving the same objects.
"""

from __future__ import annotations

import pathlib

import mailsrv
import mailsrv.pop3
from mailsrv.pop3 import factory, maildrop, server, transaction
from mailsrv.smtp import auth, lines
from mailsrv.smtp import server as smtp_server

ROOT = pathlib.Path(mailsrv.__file__).parent
PARTS = [
    "pop3/__init__.py",
    "pop3/factory.py",
    "pop3/maildrop.py",
    "pop3/replies.py",
    "pop3/server.py",
    "pop3/transaction.py",
    "smtp/server.py",
    "smtp/lines.py",
    "smtp/auth.py",
    "smtp/delivery.py",
    "smtp/message.py",
    "session.py",
    "imap/server.py",
    "imap/twistedcompat.py",
]


def test_each_part_is_under_600_lines():
    sizes = {p: len((ROOT / p).read_text().splitlines()) for p in PARTS}
    assert {p: n for p, n in sizes.items() if n > 600} == {}


def test_pop3_names_in_use_still_come_from_mailsrv_pop3():
    assert mailsrv.pop3.pop3_factory is factory.pop3_factory
    assert mailsrv.pop3.POP3Factory is factory.POP3Factory
    assert mailsrv.pop3.POP3Server is server.POP3Server
    assert mailsrv.pop3.Maildrop is maildrop.Maildrop
    assert mailsrv.pop3.open_maildrop is maildrop.open_maildrop
    assert mailsrv.pop3.WHOLE_MESSAGE == transaction.WHOLE_MESSAGE


def test_the_sessions_are_made_of_their_parts():
    assert issubclass(server.POP3Server, transaction.TransactionCommands)
    assert server.POP3Server.pop3_RETR is transaction.TransactionCommands.pop3_RETR
    assert issubclass(smtp_server.SMTPServer, lines.LineReader)
    assert issubclass(smtp_server.SMTPServer, auth.AuthCommand)
    assert smtp_server.SMTPServer.ext_AUTH is auth.AuthCommand.ext_AUTH
    assert smtp_server.SMTPServer.dataReceived is lines.LineReader.dataReceived
