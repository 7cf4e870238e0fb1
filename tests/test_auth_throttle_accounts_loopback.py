"""
The per-account login count on a real server over loopback: failures on one
account over SMTP AUTH, POP3 and IMAP add up to one count, which delays the
next attempts on that account, then refuses them in all three protocols,
except from an address that logged in to it before. The address's own limit
is set high here, so what the client sees comes from the account's count.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from .auth_server import ALICE, BOB, PASSWORD, RealServerCase
from .test_auth_throttle_loopback import ANSWERS

FAILURE_DELAY = 0.2
SLOW_AFTER = 2
MAX_FAILURES = 4


class AccountCountOverLoopback(RealServerCase, unittest.TestCase):
    timeout = 60
    users = (ALICE, BOB)

    def auth_settings(self) -> dict:
        return {
            "max_failures": 50,  # per address: far away
            "failure_delay": FAILURE_DELAY,
            "account_slow_after": SLOW_AFTER,
            "account_max_failures": MAX_FAILURES,
            "account_max_delay": 10.0,
        }

    def setUp(self):
        super().setUp()
        self.checked = self.count_checks()

    @defer.inlineCallbacks
    def login(self, protocol: str, user: str, password: str):
        """Log in once over C{protocol}; fire with ("ok" | "failed" | "throttled", seconds)."""
        script, outcomes = ANSWERS[protocol]
        listener, steps, index = script(user, password)
        start = self.reactor.seconds()
        answers = yield self.converse(listener, steps)
        elapsed = self.reactor.seconds() - start
        for name, prefix in outcomes.items():
            if answers[index].startswith(prefix):
                return name, elapsed
        raise AssertionError(f"unexpected answer {answers[index]!r} in {answers!r}")

    @defer.inlineCallbacks
    def test_the_three_protocols_share_the_accounts_count(self):
        # Two failures, one over SMTP, one over POP3: answered after the failure delay.
        for protocol in ("smtp", "pop3"):
            result, _ = yield self.login(protocol, ALICE, "wrong")
            self.assertEqual(result, "failed")
        # The account has 2 failures: an IMAP attempt waits failure_delay before
        # its check, then the failure delay; the next (SMTP) waits twice that.
        result, elapsed = yield self.login("imap", ALICE, "wrong")
        self.assertEqual(result, "failed")
        self.assertGreaterEqual(elapsed, 2 * FAILURE_DELAY)
        result, elapsed = yield self.login("smtp", ALICE, "wrong")
        self.assertEqual(result, "failed")
        self.assertGreaterEqual(elapsed, 3 * FAILURE_DELAY)
        self.assertEqual(self.checked, [ALICE] * MAX_FAILURES)
        # Four failures: the account is refused in all three protocols, even
        # with the right password, without a check; other accounts are not.
        for protocol in ("smtp", "pop3", "imap"):
            result, _ = yield self.login(protocol, ALICE, PASSWORD)
            self.assertEqual(result, "throttled", protocol)
        self.assertEqual(self.checked, [ALICE] * MAX_FAILURES)
        for protocol in ("smtp", "pop3", "imap"):
            result, _ = yield self.login(protocol, BOB, PASSWORD)
            self.assertEqual(result, "ok", protocol)

    @defer.inlineCallbacks
    def test_the_owner_from_a_known_address_is_neither_delayed_nor_refused(self):
        result, _ = yield self.login("imap", ALICE, PASSWORD)
        self.assertEqual(result, "ok")
        total = 0.0
        for protocol in ("smtp", "pop3", "imap", "smtp", "pop3"):
            result, elapsed = yield self.login(protocol, ALICE, "wrong")
            self.assertEqual(result, "failed")
            total += elapsed
        # 5 failure delays (1.0 s); had the last three waited too: 1.4 s more.
        self.assertLess(total, 5 * FAILURE_DELAY + 1.4 - 0.3)
        for protocol in ("smtp", "pop3", "imap"):
            result, _ = yield self.login(protocol, ALICE, PASSWORD)
            self.assertEqual(result, "ok", protocol)
