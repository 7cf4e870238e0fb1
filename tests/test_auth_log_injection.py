"""
Client-supplied names cannot forge or break log lines: user names sent with
CR, LF, TAB, NUL and bytes that are not UTF-8 over SMTP AUTH (PLAIN, LOGIN),
POP3 (USER, AUTH PLAIN) and IMAP (LOGIN, AUTHENTICATE PLAIN),
and IMAP mailbox names, each log event formats to one line with
those characters escaped.
"""

from __future__ import annotations

import base64

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailsrv.logsafe import escape

from .auth_server import (
    PASSWORD,
    POP3_REPLY,
    SMTP_REPLY,
    RealServerCase,
    imap_tagged,
    plain,
)

# A forged second line for SASL PLAIN, where NUL separates the fields ...
FORGED = b"bob@example.test\n\tFORGED-1 smtp login bob@example.test from 6.6.6.6: ok\r\xff"
# The login failure lines (mailsrv.loglines), up to the user name.
FAILED = "authentication failed: authentication failure, sasl_username="
DISCONNECTED = "Disconnected (auth failed, 1 attempts in 0 secs): "
ESCAPED = "bob@example.test\\n\\tFORGED-1 smtp login bob@example.test from 6.6.6.6: ok\\r\\xff"
# ... and a NUL besides where a name is sent as it is (AUTH LOGIN, an IMAP literal).
FORGED_NUL = b"bob@example.test\r\n\tFORGED-2 \x00\xfe"
ESCAPED_NUL = "bob@example.test\\r\\n\\tFORGED-2 \\x00\\xfe"
# A POP3 USER line ends at LF; CR, TAB, NUL and a bad byte can still be in it.
FORGED_USER = b"bob\r\tFORGED-3\x00\xfe@example.test"
ESCAPED_USER = "bob\\r\\tFORGED-3\\x00\\xfe@example.test"


def _plain(user: bytes) -> bytes:
    return plain(user, b"wrong")


def test_escape():
    assert escape(b"a\nb\rc\td\x00e\xff\\f") == "a\\nb\\rc\\td\\x00e\\xff\\\\f"
    assert (
        escape("caf\u00e9 \u2028\u2029\u0085\u202e\x7f")
        == "caf\u00e9 \\u2028\\u2029\\x85\\u202e\\x7f"
    )
    assert escape(None) == "None"
    assert escape("x" * 70000) == "x" * 65536 + "...(4464 more)"
    assert escape("plain text") == "plain text"


class LogInjectionTests(RealServerCase, unittest.TestCase):
    def auth_settings(self) -> dict:
        return {"max_failures": 100}

    def setUp(self):
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> list[str]:
        """Every event logged so far, formatted as an observer writes it (tracebacks aside)."""
        out = []
        for event in self.events:
            if "log_failure" in event:
                continue
            text = formatEvent(event)
            self.assertEqual(text.splitlines(), [text] if text else [], text)
            self.assertFalse(any(ord(c) < 32 or ord(c) == 127 for c in text), repr(text))
            out.append(text)
        return out

    def assert_logged(self, escaped: str) -> None:
        lines = self.lines()
        self.assertTrue(any(escaped in line for line in lines), lines)

    @defer.inlineCallbacks
    def test_smtp_auth_plain_and_login(self):
        yield self.converse(
            "submission",
            [
                (b"EHLO client.test\r\n", SMTP_REPLY),
                (b"AUTH PLAIN " + _plain(FORGED) + b"\r\n", SMTP_REPLY),
                (b"AUTH LOGIN " + base64.b64encode(FORGED_NUL) + b"\r\n", SMTP_REPLY),
                (base64.b64encode(b"wrong") + b"\r\n", SMTP_REPLY),
                (b"QUIT\r\n", SMTP_REPLY),
            ],
        )
        self.assert_logged(f"warning: unknown[127.0.0.1]: SASL PLAIN {FAILED}{ESCAPED}")
        self.assert_logged(f"warning: unknown[127.0.0.1]: SASL LOGIN {FAILED}{ESCAPED_NUL}")

    @defer.inlineCallbacks
    def test_pop3_user_and_auth_plain(self):
        yield self.converse(
            "pop3",
            [
                (b"USER " + FORGED_USER + b"\r\n", POP3_REPLY),
                (b"PASS wrong\r\n", POP3_REPLY),
                (b"AUTH PLAIN " + _plain(FORGED) + b"\r\n", POP3_REPLY),
                (b"QUIT\r\n", POP3_REPLY),
            ],
        )
        self.assert_logged(
            f"pop3-login: {DISCONNECTED}user=<{ESCAPED_USER}>, method=PLAIN, rip=127.0.0.1"
        )
        self.assert_logged(
            f"pop3-login: {DISCONNECTED}user=<{ESCAPED}>, method=PLAIN, rip=127.0.0.1"
        )

    @defer.inlineCallbacks
    def test_imap_login_and_authenticate(self):
        yield self.converse(
            "imap",
            [
                (
                    b"a1 LOGIN {%d+}\r\n%s wrong\r\n" % (len(FORGED_NUL), FORGED_NUL),
                    imap_tagged(b"a1"),
                ),
                (b"a2 AUTHENTICATE PLAIN " + _plain(FORGED) + b"\r\n", imap_tagged(b"a2")),
                (b"a3 LOGOUT\r\n", imap_tagged(b"a3")),
            ],
        )
        self.assert_logged(
            f"imap-login: {DISCONNECTED}user=<{ESCAPED_NUL}>, method=PLAIN, rip=127.0.0.1"
        )
        self.assert_logged(
            f"imap-login: {DISCONNECTED}user=<{ESCAPED}>, method=PLAIN, rip=127.0.0.1"
        )

    @defer.inlineCallbacks
    def test_imap_mailbox_names(self):
        name = b"a&ICg-b"  # modified UTF-7 for "a\u2028b": a line separator
        message = b"Subject: x\r\n\r\nx\r\n"
        answers = yield self.converse(
            "imap",
            [
                (
                    b'a1 LOGIN alice@example.test "' + PASSWORD.encode() + b'"\r\n',
                    imap_tagged(b"a1"),
                ),
                (b"a2 CREATE " + name + b"\r\n", imap_tagged(b"a2")),
                (
                    b"a3 APPEND " + name + b" {%d+}\r\n%s\r\n" % (len(message), message),
                    imap_tagged(b"a3"),
                ),
                (b"a4 LOGOUT\r\n", imap_tagged(b"a4")),
            ],
        )
        self.assertTrue(answers[2].startswith(b"a3 OK"), answers)
        self.assert_logged("imap append alice@example.test a\\u2028b uid 1")
