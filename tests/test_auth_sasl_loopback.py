"""
One SASL and login path for SMTP AUTH, POP3 and IMAP, on a real server over
loopback: the same table of cases gets the same outcome in each protocol
(PLAIN with every kind of authorization identity, LOGIN, bad base64, the
client's cancel), and a refused authorization identity counts against the
one throttle whichever protocol carried it.
"""

from __future__ import annotations

import base64

from twisted.internet import defer
from twisted.trial import unittest

from .auth_server import (
    ALICE,
    BOB,
    PASSWORD,
    POP3_REPLY,
    SMTP_REPLY,
    RealServerCase,
    imap_continued,
    imap_tagged,
    plain,
)

FAILURE_DELAY = 0.2

# protocol -> {outcome: how the answer to the last step starts}
OUTCOMES = {
    "smtp": {
        "ok": b"235 2.7.0",
        "failed": b"535 5.7.8",
        "throttled": b"454 4.7.0 Too many",
        "cancelled": b"501 5.7.0",
        "malformed": b"501 5.5.2",
        "challenge": b"334 ",
    },
    "pop3": {
        "ok": b"+OK Logged in",
        "failed": b"-ERR [AUTH] Authentication failed",
        "throttled": b"-ERR [AUTH] Too many failed logins",
        "cancelled": b"-ERR Authentication aborted",
        "malformed": b"-ERR Invalid ",
        "challenge": b"+ ",
    },
    "imap": {
        "ok": b"a1 OK",
        "failed": b"a1 NO [AUTHENTICATIONFAILED]",
        "throttled": b"a1 NO [UNAVAILABLE] Too many failed logins",
        "cancelled": b"a1 BAD Authentication cancelled",
        "malformed": b"a1 BAD Malformed",
        "challenge": b"+ ",
    },
}


def _script(protocol: str, command: bytes, responses: list[bytes]) -> tuple[str, list, int]:
    """(listener, steps, index of the first AUTH answer) for one SASL exchange."""
    if protocol == "smtp":
        steps = [(b"EHLO client.test\r\n", SMTP_REPLY), (b"AUTH " + command + b"\r\n", SMTP_REPLY)]
        steps += [(r + b"\r\n", SMTP_REPLY) for r in responses]
        return "submission", steps + [(b"QUIT\r\n", SMTP_REPLY)], 1
    if protocol == "pop3":
        steps = [(b"AUTH " + command + b"\r\n", POP3_REPLY)]
        steps += [(r + b"\r\n", POP3_REPLY) for r in responses]
        return "pop3", steps + [(b"QUIT\r\n", POP3_REPLY)], 0
    steps = [(b"a1 AUTHENTICATE " + command + b"\r\n", imap_continued(b"a1"))]
    steps += [(r + b"\r\n", imap_continued(b"a1")) for r in responses]
    return "imap", steps + [(b"a2 LOGOUT\r\n", imap_tagged(b"a2"))], 0


class _SASLClient(RealServerCase):
    """A real server whose password checks are counted, and a client for one AUTH exchange."""

    protocol = ""
    users = (ALICE, BOB)
    max_failures = 100

    def auth_settings(self) -> dict:
        return {"max_failures": self.max_failures, "failure_delay": FAILURE_DELAY}

    def setUp(self):
        super().setUp()
        self.checked = self.count_checks()

    @defer.inlineCallbacks
    def exchange(self, command: bytes, *responses: bytes, protocol: str | None = None):
        """Run one AUTH exchange; fire with the outcome of each of its steps."""
        protocol = protocol or self.protocol
        listener, steps, first = _script(protocol, command, list(responses))
        answers = yield self.converse(listener, steps)
        outcomes = []
        for answer in answers[first : first + 1 + len(responses)]:
            names = [n for n, p in OUTCOMES[protocol].items() if answer.startswith(p)]
            if not names:
                raise AssertionError(f"unexpected answer {answer!r} in {answers!r}")
            outcomes.append(names[0])
        return outcomes


class _SASLOverLoopback(_SASLClient):
    """The cases, for the protocol a subclass names."""

    @defer.inlineCallbacks
    def test_authzid_empty_same_or_same_in_another_case_is_accepted(self):
        for authzid in ("", ALICE, "Alice@Example.TEST", "ALICE@example.test"):
            outcome = yield self.exchange(b"PLAIN " + plain(ALICE, authzid=authzid))
            self.assertEqual(outcome, ["ok"], authzid)
        # The authcid in another case is the same user too.
        outcome = yield self.exchange(b"PLAIN " + plain("aLiCe@example.test", authzid=ALICE))
        self.assertEqual(outcome, ["ok"])

    @defer.inlineCallbacks
    def test_authzid_of_another_user_is_refused_like_a_wrong_password(self):
        start = self.reactor.seconds()
        outcome = yield self.exchange(b"PLAIN " + plain(ALICE, authzid=BOB))
        self.assertEqual(outcome, ["failed"])
        self.assertGreaterEqual(self.reactor.seconds() - start, FAILURE_DELAY)
        self.assertEqual(self.checked, [])  # no password was checked: the answer says nothing

    @defer.inlineCallbacks
    def test_plain_without_initial_response(self):
        outcome = yield self.exchange(b"PLAIN", plain(ALICE))
        self.assertEqual(outcome, ["challenge", "ok"])

    @defer.inlineCallbacks
    def test_plain_with_bad_base64(self):
        self.assertEqual((yield self.exchange(b"PLAIN !!notbase64")), ["malformed"])
        self.assertEqual(
            (yield self.exchange(b"PLAIN", b"!!notbase64")), ["challenge", "malformed"]
        )
        no_authcid = base64.b64encode(b"\0\0" + PASSWORD.encode())
        self.assertEqual((yield self.exchange(b"PLAIN " + no_authcid)), ["malformed"])
        self.assertEqual(self.checked, [])

    @defer.inlineCallbacks
    def test_login_mechanism(self):
        user, password = base64.b64encode(ALICE.encode()), base64.b64encode(PASSWORD.encode())
        outcome = yield self.exchange(b"LOGIN", user, password)
        self.assertEqual(outcome, ["challenge", "challenge", "ok"])
        outcome = yield self.exchange(b"LOGIN " + user, base64.b64encode(b"wrong"))
        self.assertEqual(outcome, ["challenge", "failed"])
        self.assertEqual(self.checked, [ALICE, ALICE])

    @defer.inlineCallbacks
    def test_login_prompts(self):
        listener, steps, first = _script(self.protocol, b"LOGIN", [b"YWxpY2U=", b"*"])
        answers = yield self.converse(listener, steps)
        self.assertIn(base64.b64encode(b"Username:"), answers[first])
        self.assertIn(base64.b64encode(b"Password:"), answers[first + 1])

    @defer.inlineCallbacks
    def test_cancel(self):
        self.assertEqual((yield self.exchange(b"PLAIN", b"*")), ["challenge", "cancelled"])
        outcome = yield self.exchange(b"LOGIN", base64.b64encode(ALICE.encode()), b"*")
        self.assertEqual(outcome, ["challenge", "challenge", "cancelled"])
        self.assertEqual(self.checked, [])


class SMTPSASLTests(_SASLOverLoopback, unittest.TestCase):
    protocol = "smtp"


class POP3SASLTests(_SASLOverLoopback, unittest.TestCase):
    protocol = "pop3"


class IMAPSASLTests(_SASLOverLoopback, unittest.TestCase):
    protocol = "imap"


class OneThrottleForAllTests(_SASLClient, unittest.TestCase):
    """Refused authorization identities count once, whichever protocol carried them."""

    max_failures = 3

    @defer.inlineCallbacks
    def test_refused_authzids_in_each_protocol_count_against_one_limit(self):
        for protocol in ("smtp", "pop3", "imap"):
            outcome = yield self.exchange(b"PLAIN " + plain(ALICE, authzid=BOB), protocol=protocol)
            self.assertEqual(outcome, ["failed"], protocol)
        for protocol in ("smtp", "pop3", "imap"):
            outcome = yield self.exchange(b"PLAIN " + plain(ALICE), protocol=protocol)
            self.assertEqual(outcome, ["throttled"], protocol)
        self.assertEqual(self.checked, [])
