"""
What the SMTP server logs when it refuses a sender or a recipient: the
reply the client got and, kept apart from it, the cause (escaped onto one
line), which never reaches the client.
"""

from __future__ import annotations

import dataclasses
import os

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailsrv.auth.passwd import PasswordFile
from mailsrv.interfaces import PasswordDatabaseError

from .test_smtp_helpers import Session, make_context


class _UnreadableUsers:
    """A user database that cannot be read, with a cause that tries to forge a log line."""

    def lookup(self, address):
        raise PasswordDatabaseError("cannot read users\nreject recipient <forged@x>")

    def has_user(self, address):
        return self.lookup(address)

    def verify(self, address, password):
        raise AssertionError("not used")


class RefusalCauseTests(unittest.TestCase):
    def setUp(self):
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def session(self, passwords):
        ctx = dataclasses.replace(make_context(), passwords=passwords)
        s = Session(ctx)
        s.cmd("EHLO client.example")
        s.cmd("MAIL FROM:<a@remote.test>")
        return s

    def rejects(self) -> list[str]:
        return [formatEvent(e) for e in self.events if "reject" in (e.get("log_format") or "")]

    def test_the_cause_is_logged_and_not_sent(self):
        passwd = self.mktemp()

        os.makedirs(passwd)  # a folder where the file should be: it cannot be read
        s = self.session(PasswordFile(passwd))
        wire = s.cmd("RCPT TO:<alice@example.test>")
        self.assertEqual(wire, ["451 4.3.0 Local error in processing, try again later"])
        (line,) = self.rejects()
        self.assertTrue(
            line.startswith(
                "reject recipient <alice@example.test> from 192.0.2.7: 451 4.3.0 Local error "
                "in processing, try again later; sender=<a@remote.test> ("
            ),
            line,
        )
        self.assertIn(passwd, line)  # the administrator learns which file
        self.assertNotIn(passwd, " ".join(wire))

    def test_the_cause_is_escaped_onto_one_line(self):
        s = self.session(_UnreadableUsers())
        wire = s.cmd("RCPT TO:<alice@example.test>")
        self.assertEqual(wire, ["451 4.3.0 Local error in processing, try again later"])
        (line,) = self.rejects()
        self.assertNotIn("\n", line)
        self.assertTrue(
            line.endswith(
                "; sender=<a@remote.test> (cannot read users\\nreject recipient <forged@x>)"
            ),
            line,
        )

    def test_a_refusal_without_a_cause_logs_the_line_as_before(self):
        s = self.session(_UnreadableUsers())
        self.assertEqual(s.cmd("RCPT TO:<x@remote.test>"), ["554 5.7.1 Relay access denied"])
        self.assertEqual(
            self.rejects(),
            [
                "reject recipient <x@remote.test> from 192.0.2.7: 554 5.7.1 Relay access "
                "denied; sender=<a@remote.test>"
            ],
        )
