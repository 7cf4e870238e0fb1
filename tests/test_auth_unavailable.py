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
    ALICE,
    PASSWORD,
    POP3_REPLY,
    SMTP_REPLY,
    RealServerCase,
    imap_tagged,
    plain,
)

PLAIN = plain(ALICE)


class _Unreadable(RealServerCase):
    """A real user exists, but the server cannot read the password file."""

    def setUp(self):
        super().setUp()
        self.break_passwd(self.server.config.auth.passwd_file)

    def break_passwd(self, path) -> None:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_rcpt_is_451(self):
        answers = yield self.converse(
            "smtp",
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
        answers = yield self.converse(
            "submission",
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
        answers = yield self.converse(
            "pop3",
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
        answers = yield self.converse(
            "imap",
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
