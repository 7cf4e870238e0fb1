"""
The login throttle on a real server over loopback: SMTP AUTH, POP3 and IMAP
share one rule. Thirty wrong passwords sent at once from one address get at
most max_failures checks; a success on another account forgives nothing.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from .auth_server import (
    ALICE,
    BOB,
    PASSWORD,
    POP3_REPLY,
    SMTP_REPLY,
    RealServerCase,
    imap_tagged,
    plain,
)

MAX_FAILURES = 5
PARALLEL = 30


# protocol -> (listener, steps for one login, index of the login's answer),
#             {outcome: prefix of the answer}
def _smtp(user, password):
    steps = [
        (b"EHLO client.test\r\n", SMTP_REPLY),
        (b"AUTH PLAIN " + plain(user, password) + b"\r\n", SMTP_REPLY),
        (b"QUIT\r\n", SMTP_REPLY),
    ]
    return "submission", steps, 1


def _pop3(user, password):
    steps = [
        (b"USER " + user.encode() + b"\r\n", POP3_REPLY),
        (b"PASS " + password.encode() + b"\r\n", POP3_REPLY),
        (b"QUIT\r\n", POP3_REPLY),
    ]
    return "pop3", steps, 1


def _imap(user, password):
    steps = [
        (b'a1 LOGIN "' + user.encode() + b'" "' + password.encode() + b'"\r\n', imap_tagged(b"a1")),
        (b"a2 LOGOUT\r\n", imap_tagged(b"a2")),
    ]
    return "imap", steps, 0


ANSWERS = {
    "smtp": (_smtp, {"ok": b"235 ", "failed": b"535 ", "throttled": b"454 4.7.0 Too many"}),
    "pop3": (
        _pop3,
        {
            "ok": b"+OK Logged in",
            "failed": b"-ERR [AUTH] Authentication failed",
            "throttled": b"-ERR [AUTH] Too many failed logins",
        },
    ),
    "imap": (
        _imap,
        {
            "ok": b"a1 OK",
            "failed": b"a1 NO [AUTHENTICATIONFAILED]",
            "throttled": b"a1 NO [UNAVAILABLE] Too many failed logins",
        },
    ),
}


class _LoginsOverLoopback(RealServerCase):
    """One protocol's logins against the server's real throttle and password file."""

    protocol = ""
    timeout = 60
    users = (ALICE, BOB)
    max_failures = MAX_FAILURES
    failure_delay = 0.05

    def auth_settings(self) -> dict:
        return {"max_failures": self.max_failures, "failure_delay": self.failure_delay}

    def setUp(self):
        super().setUp()
        self.checked = self.count_checks()

    @defer.inlineCallbacks
    def login(self, user: str, password: str):
        """Log in once; fire with "ok", "failed" or "throttled"."""
        script, outcomes = ANSWERS[self.protocol]
        listener, steps, index = script(user, password)
        answers = yield self.converse(listener, steps)
        for name, prefix in outcomes.items():
            if answers[index].startswith(prefix):
                return name
        raise AssertionError(f"unexpected answer {answers[index]!r} in {answers!r}")


class _ThrottleOverLoopback(_LoginsOverLoopback):
    @defer.inlineCallbacks
    def test_parallel_wrong_passwords_reach_the_check_max_failures_times(self):
        results = yield defer.gatherResults(
            [self.login(ALICE, f"wrong {i}") for i in range(PARALLEL)]
        )
        self.assertEqual(len(self.checked), MAX_FAILURES)
        self.assertEqual(results.count("failed"), MAX_FAILURES)
        self.assertEqual(results.count("throttled"), PARALLEL - MAX_FAILURES)
        # and now even the right password is refused from this address
        self.assertEqual((yield self.login(ALICE, PASSWORD)), "throttled")

    @defer.inlineCallbacks
    def test_a_success_on_another_account_forgives_nothing(self):
        for _ in range(MAX_FAILURES - 1):
            self.assertEqual((yield self.login(ALICE, "wrong")), "failed")
        self.assertEqual((yield self.login(BOB, PASSWORD)), "ok")
        self.assertEqual((yield self.login(ALICE, "wrong")), "failed")
        self.assertEqual((yield self.login(ALICE, PASSWORD)), "throttled")
        self.assertEqual((yield self.login(BOB, PASSWORD)), "throttled")

    @defer.inlineCallbacks
    def test_a_success_forgives_the_accounts_own_failures(self):
        for _ in range(MAX_FAILURES - 1):
            self.assertEqual((yield self.login(ALICE, "wrong")), "failed")
        self.assertEqual((yield self.login("Alice@example.test", PASSWORD)), "ok")
        for _ in range(MAX_FAILURES - 1):
            self.assertEqual((yield self.login(ALICE, "wrong")), "failed")


class _RefusedAtOnceOverLoopback(_LoginsOverLoopback):
    """
    The one rule for when a login is answered: a checked wrong password after
    the failure delay, a login the throttle refuses (no check) at once.
    """

    max_failures = 1
    failure_delay = 6.0

    def setUp(self):
        super().setUp()
        # Checks finish only when the test lets them: an attempt stays unfinished.
        self.held: list[defer.Deferred] = []
        passwords = self.server.ctx.passwords
        verify = passwords.verify

        def held_verify(address, password):
            gate: defer.Deferred = defer.Deferred()
            self.held.append(gate)
            return verify(address, password).addCallback(lambda ok: gate.addCallback(lambda _: ok))

        passwords.verify = held_verify

    @defer.inlineCallbacks
    def test_a_refused_login_is_answered_at_once(self):
        owner = self.login(ALICE, PASSWORD)
        while not self.held:  # its attempt is reserved, its check under way
            yield task.deferLater(self.reactor, 0.01, lambda: None)
        # Unfinished, it counts as a failure: the next login is refused
        # without a check, and answered at once, not after the failure delay.
        start = self.reactor.seconds()
        self.assertEqual((yield self.login(ALICE, PASSWORD)), "throttled")
        self.assertLess(self.reactor.seconds() - start, self.failure_delay / 3)
        self.assertEqual(self.checked, [ALICE])
        self.held[0].callback(None)
        self.assertEqual((yield owner), "ok")


class SMTPThrottleTests(_ThrottleOverLoopback, unittest.TestCase):
    protocol = "smtp"


class POP3ThrottleTests(_ThrottleOverLoopback, unittest.TestCase):
    protocol = "pop3"


class IMAPThrottleTests(_ThrottleOverLoopback, unittest.TestCase):
    protocol = "imap"


class SMTPRefusedAtOnceTests(_RefusedAtOnceOverLoopback, unittest.TestCase):
    protocol = "smtp"


class POP3RefusedAtOnceTests(_RefusedAtOnceOverLoopback, unittest.TestCase):
    protocol = "pop3"


class IMAPRefusedAtOnceTests(_RefusedAtOnceOverLoopback, unittest.TestCase):
    protocol = "imap"
