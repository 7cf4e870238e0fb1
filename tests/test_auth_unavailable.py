"""
A password file the server cannot read is a local problem: RCPT is answered
451 4.3.0 and logins as temporary failures (SMTP 454 4.7.0, IMAP NO
[UNAVAILABLE], POP3 -ERR [SYS/TEMP]), never "no such user" or "wrong password".
"""

from __future__ import annotations

import base64
import os

from twisted.internet import defer
from twisted.trial import unittest

from .auth_server import (
    IMAP_GREETING,
    PASSWORD,
    POP3_REPLY,
    SMTP_REPLY,
    RealServer,
    converse,
    imap_tagged,
)

ALICE = "alice@example.test"
PLAIN = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())


class _Unreadable:
    """A real user exists, but the server cannot read the password file."""

    timeout = 30

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.server = RealServer(reactor, **self.auth_settings())
        self.addCleanup(self.server.stop)
        self.server.add_user(ALICE)
        self.break_passwd(self.server.config.auth.passwd_file)

    def auth_settings(self) -> dict:
        return {}

    def break_passwd(self, path) -> None:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_rcpt_is_451(self):
        answers = yield converse(
            self.reactor,
            self.server.ports["smtp"],
            SMTP_REPLY,
            [
                (b"EHLO client.test\r\n", SMTP_REPLY),
                (b"MAIL FROM:<bob@remote.test>\r\n", SMTP_REPLY),
                (b"RCPT TO:<alice@example.test>\r\n", SMTP_REPLY),
                (b"QUIT\r\n", SMTP_REPLY),
            ],
        )
        self.assertTrue(answers[2].startswith(b"451 4.3.0 "), answers)

    @defer.inlineCallbacks
    def test_smtp_auth_is_454(self):
        answers = yield converse(
            self.reactor,
            self.server.ports["submission"],
            SMTP_REPLY,
            [
                (b"EHLO client.test\r\n", SMTP_REPLY),
                (b"AUTH PLAIN " + PLAIN + b"\r\n", SMTP_REPLY),
                (b"AUTH LOGIN\r\n", SMTP_REPLY),
                (base64.b64encode(ALICE.encode()) + b"\r\n", SMTP_REPLY),
                (base64.b64encode(PASSWORD.encode()) + b"\r\n", SMTP_REPLY),
                (b"QUIT\r\n", SMTP_REPLY),
            ],
        )
        self.assertTrue(answers[1].startswith(b"454 4.7.0 "), answers)
        self.assertTrue(answers[4].startswith(b"454 4.7.0 "), answers)

    @defer.inlineCallbacks
    def test_pop3_login_is_sys_temp(self):
        answers = yield converse(
            self.reactor,
            self.server.ports["pop3"],
            POP3_REPLY,
            [
                (b"USER alice@example.test\r\n", POP3_REPLY),
                (b"PASS " + PASSWORD.encode() + b"\r\n", POP3_REPLY),
                (b"AUTH PLAIN " + PLAIN + b"\r\n", POP3_REPLY),
                (b"QUIT\r\n", POP3_REPLY),
            ],
        )
        self.assertTrue(answers[1].startswith(b"-ERR [SYS/TEMP] "), answers)
        self.assertTrue(answers[2].startswith(b"-ERR [SYS/TEMP] "), answers)

    @defer.inlineCallbacks
    def test_imap_login_is_unavailable(self):
        answers = yield converse(
            self.reactor,
            self.server.ports["imap"],
            IMAP_GREETING,
            [
                (
                    b'a1 LOGIN alice@example.test "' + PASSWORD.encode() + b'"\r\n',
                    imap_tagged(b"a1"),
                ),
                (b"a2 AUTHENTICATE PLAIN " + PLAIN + b"\r\n", imap_tagged(b"a2")),
                (b"a3 LOGOUT\r\n", imap_tagged(b"a3")),
            ],
        )
        self.assertTrue(answers[0].startswith(b"a1 NO [UNAVAILABLE] "), answers)
        self.assertTrue(answers[1].startswith(b"a2 NO [UNAVAILABLE] "), answers)


class PasswdIsADirectoryTests(_Unreadable, unittest.TestCase):
    """What the server meets when it cannot read the file (as root, chmod 000 would not stop it)."""

    def break_passwd(self, path) -> None:
        os.rename(path, path.with_name("passwd.moved"))
        path.mkdir()


class PasswdUnderAFileTests(_Unreadable, unittest.TestCase):
    """The folder the configuration names for the file is not a folder."""

    def auth_settings(self) -> dict:
        return {"passwd_file": "conf/passwd"}

    def break_passwd(self, path) -> None:
        os.rename(path.parent, path.parent.with_name("conf.moved"))
        path.parent.write_text("not a folder\n")
