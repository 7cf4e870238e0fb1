"""
Local parts are matched case-insensitively, as Postfix and Dovecot match
them: RCPT, SMTP AUTH, POP3 and IMAP logins in any case reach the user as
the password file spells it, and that spelling names the one mailbox.
"""

from __future__ import annotations

import io

from twisted.internet import defer
from twisted.trial import unittest

from mailsrv.cli import main

from .auth_server import (
    PASSWORD,
    POP3_REPLY,
    SMTP_REPLY,
    RealServerCase,
    imap_tagged,
    plain,
)

MESSAGE = b"Subject: case\r\n\r\nhello\r\n.\r\n"


class CaseInsensitiveLookupTests(RealServerCase, unittest.TestCase):
    """Over SMTP, submission, POP3 and IMAP on loopback, mbox store on disk."""

    @defer.inlineCallbacks
    def test_rcpt_in_another_case_reaches_the_stored_users_mbox(self):
        answers = yield self.converse(
            "smtp",
            [
                (b"EHLO client.test\r\n", SMTP_REPLY),
                (b"MAIL FROM:<bob@remote.test>\r\n", SMTP_REPLY),
                (b"RCPT TO:<Alice@example.test>\r\n", SMTP_REPLY),
                (b"RCPT TO:<ALICE@EXAMPLE.TEST>\r\n", SMTP_REPLY),
                (b"DATA\r\n", SMTP_REPLY),
                (MESSAGE, SMTP_REPLY),
                (b"QUIT\r\n", SMTP_REPLY),
            ],
        )
        self.assertTrue(answers[2].startswith(b"250 2.1.5"), answers)
        self.assertTrue(answers[3].startswith(b"250 2.1.5"), answers)
        self.assertTrue(answers[5].startswith(b"250 2.0.0"), answers)
        inbox = self.server.inbox("alice@example.test")
        self.assertEqual(inbox.read_bytes().count(b"\nSubject: case\n"), 1)  # one copy
        domain = self.server.config.mail_dir / "example.test"
        self.assertEqual(sorted(p.name for p in domain.iterdir()), ["alice"])

    @defer.inlineCallbacks
    def test_smtp_auth_in_another_case(self):
        answers = yield self.converse(
            "submission",
            [
                (b"EHLO client.test\r\n", SMTP_REPLY),
                (b"AUTH PLAIN " + plain("ALICE@EXAMPLE.TEST") + b"\r\n", SMTP_REPLY),
                (b"MAIL FROM:<Alice@Example.Test>\r\n", SMTP_REPLY),
                (b"RCPT TO:<alice@example.test>\r\n", SMTP_REPLY),
                (b"DATA\r\n", SMTP_REPLY),
                (MESSAGE, SMTP_REPLY),
                (b"QUIT\r\n", SMTP_REPLY),
            ],
        )
        self.assertTrue(answers[1].startswith(b"235 2.7.0"), answers)
        self.assertTrue(answers[2].startswith(b"250 2.1.0"), answers)
        self.assertTrue(answers[5].startswith(b"250 2.0.0"), answers)
        # The envelope sender is the user's stored spelling: bounces reach the same mbox.
        mbox = self.server.inbox("alice@example.test").read_bytes()
        self.assertIn(b"\nReturn-Path: <alice@example.test>\n", b"\n" + mbox)

    @defer.inlineCallbacks
    def test_pop3_and_imap_logins_in_another_case_see_the_same_mbox(self):
        yield self.converse(
            "smtp",
            [
                (b"EHLO client.test\r\n", SMTP_REPLY),
                (b"MAIL FROM:<bob@remote.test>\r\n", SMTP_REPLY),
                (b"RCPT TO:<alice@example.test>\r\n", SMTP_REPLY),
                (b"DATA\r\n", SMTP_REPLY),
                (MESSAGE, SMTP_REPLY),
                (b"QUIT\r\n", SMTP_REPLY),
            ],
        )
        pop = yield self.converse(
            "pop3",
            [
                (b"USER ALICE@EXAMPLE.TEST\r\n", POP3_REPLY),
                (b"PASS " + PASSWORD.encode() + b"\r\n", POP3_REPLY),
                (b"STAT\r\n", POP3_REPLY),
                (b"QUIT\r\n", POP3_REPLY),
            ],
        )
        self.assertTrue(pop[1].startswith(b"+OK Logged in."), pop)
        self.assertTrue(pop[2].startswith(b"+OK 1 "), pop)
        imap = yield self.converse(
            "imap",
            [
                (
                    b'a1 LOGIN Alice@Example.Test "' + PASSWORD.encode() + b'"\r\n',
                    imap_tagged(b"a1"),
                ),
                (b"a2 SELECT INBOX\r\n", imap_tagged(b"a2")),
                (b"a3 LOGOUT\r\n", imap_tagged(b"a3")),
            ],
        )
        self.assertIn(b"a1 OK", imap[0])
        self.assertIn(b"* 1 EXISTS", imap[1])
        domain = self.server.config.mail_dir / "example.test"
        self.assertEqual(sorted(p.name for p in domain.iterdir()), ["alice"])


def test_user_add_refuses_a_second_spelling(tmp_path):
    cfg = tmp_path / "mailsrv.toml"
    cfg.write_text('[server]\ndomains = ["x.test"]\ndata_dir = "data"\n')

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["--config", str(cfg), *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    assert run("user", "add", "Bob@x.test", stdin="pw\n")[0] == 0
    code, _, err = run("user", "add", "bob@x.test", stdin="pw\n")
    assert code != 0 and "already exists" in err
    assert run("user", "list") == (0, "Bob@x.test\n", "")
    code, out, _ = run("user", "del", "BOB@x.test")
    assert code == 0 and out.startswith("deleted Bob@x.test;")
    assert run("user", "list") == (0, "", "")
