"""
The login throttle per account: a guess spread over many addresses is
delayed, then refused, while the owner keeps logging in from the addresses
the account was used from (task.Clock).
"""

from __future__ import annotations

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.logger import capturedLogs, formatEvent

from mailsrv import config as configmod
from mailsrv.auth import accounts
from mailsrv.auth.accounts import AccountLimits, account_limits
from mailsrv.auth.throttle import LoginThrottle, LoginThrottled

from .test_auth_throttle import ALICE, BOB, IThing, make_portal, outcome

OWNER = "198.51.100.7"
LIMITS = AccountLimits(slow_after=5, max_failures=20, max_delay=8.0, known_clients=3)
GUESSERS = [f"203.0.{i // 250}.{i % 250 + 1}" for i in range(100)]


def make_throttle(clock: task.Clock, limits: AccountLimits = LIMITS) -> LoginThrottle:
    # Per address: 10 failures; per account: wait after 5, refused after 20.
    return LoginThrottle(clock, max_failures=10, window=600, accounts=limits, failure_delay=1.0)


def guess(throttle: LoginThrottle, hosts: list[str], account: str = ALICE) -> list[float | None]:
    """One wrong password from each host: the wait each was given, None if refused."""
    waits: list[float | None] = []
    for host in hosts:
        attempt = throttle.reserve(host, account)
        waits.append(None if attempt is None else attempt.delay)
        if attempt is not None:
            attempt.failed()
    return waits


def test_a_guess_from_100_addresses_is_delayed_then_refused():
    throttle = make_throttle(task.Clock())
    waits = guess(throttle, GUESSERS)
    # 5 at once, then failure_delay doubling up to max_delay, then refused.
    assert waits[:5] == [0.0] * 5
    assert waits[5:10] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert waits[10:20] == [8.0] * 10
    assert waits[20:] == [None] * 80
    # No address came near its own limit: the count is the account's.
    assert all(not throttle.blocked(h) for h in GUESSERS)
    # Another account is untouched, even from the guessers.
    assert throttle.reserve(GUESSERS[0], BOB).delay == 0.0
    # The right password from a new address is refused without a check too.
    portal, checker = make_portal()
    creds = UsernamePassword(b"Alice@Example.Test", b"a-pass")
    assert outcome(throttle.login(portal, "192.0.2.99", creds, None, IThing))[0].check(
        LoginThrottled
    )
    assert checker.checked == 0


def test_a_delayed_attempt_is_checked_after_its_wait():
    clock = task.Clock()
    throttle = make_throttle(clock)
    guess(throttle, GUESSERS[:7])  # the next attempt waits 4 s
    portal, checker = make_portal()
    creds = UsernamePassword(ALICE.encode(), b"wrong")
    result = outcome(throttle.login(portal, GUESSERS[50], creds, None, IThing))
    assert result == [] and checker.checked == 0
    clock.advance(3.9)
    assert result == [] and checker.checked == 0
    clock.advance(0.1)
    assert checker.checked == 1
    assert result[0].check(UnauthorizedLogin)


def test_attempts_on_the_account_in_flight_count():
    throttle = make_throttle(task.Clock())
    held = [throttle.reserve(h, ALICE) for h in GUESSERS[:20]]
    assert all(a is not None for a in held)
    assert throttle.reserve(GUESSERS[20], ALICE) is None
    held[0].abandoned()  # counted neither way: one more may try
    assert throttle.reserve(GUESSERS[20], ALICE) is not None


def test_the_owner_from_a_known_address_still_logs_in():
    clock = task.Clock()
    throttle = make_throttle(clock)
    portal, checker = make_portal()
    creds = UsernamePassword(ALICE.encode(), b"a-pass")
    assert outcome(throttle.login(portal, OWNER, creds, None, IThing))[0][0] is IThing
    clock.advance(60)
    assert guess(throttle, GUESSERS)[-1] is None  # the account is refused to strangers
    attempt = throttle.reserve(OWNER, "ALICE@example.test")
    assert attempt is not None and attempt.delay == 0.0  # neither refused nor delayed
    attempt.abandoned()
    result = outcome(throttle.login(portal, OWNER, creds, None, IThing))
    assert result[0][0] is IThing  # answered at once: no wait on the clock
    # the owner's IPv6 /64 is known as one client, as the per-address count has it
    v6 = "2001:db8:7:8::1"
    throttle2 = make_throttle(clock)
    throttle2.reserve(v6, ALICE).succeeded()
    guess(throttle2, GUESSERS)
    assert throttle2.reserve("2001:db8:7:8:aaaa::5", ALICE) is not None
    assert throttle2.reserve("2001:db8:7:9::1", ALICE) is None


def test_known_addresses_are_few_and_expire():
    clock = task.Clock()
    limits = AccountLimits(
        slow_after=5, max_failures=20, max_delay=8.0, known_clients=3, known_time=86400
    )
    throttle = make_throttle(clock, limits)
    places = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]
    for place in places:
        throttle.reserve(place, ALICE).succeeded()
        clock.advance(10)
    assert throttle.tracked_accounts()[2] == 1
    clock.advance(86400 - 35)  # the first two are 86405 s and 86395 s old
    guess(throttle, GUESSERS)
    assert throttle.reserve(places[0], ALICE) is None  # pushed out by the fourth
    assert throttle.reserve(places[1], ALICE) is not None
    clock.advance(10)  # now places[1] is older than known_time
    assert throttle.reserve(places[1], ALICE) is None
    assert throttle.reserve(places[3], ALICE) is not None


def test_failures_on_the_account_expire_after_the_window():
    clock = task.Clock()
    throttle = make_throttle(clock)
    guess(throttle, GUESSERS[:20])
    assert throttle.reserve(OWNER, ALICE) is None
    clock.advance(601)
    attempt = throttle.reserve(OWNER, ALICE)
    assert attempt is not None and attempt.delay == 0.0
    attempt.failed()
    assert throttle.tracked_accounts()[:2] == (1, 1)


def test_a_success_forgives_that_addresss_own_failures_on_the_account():
    throttle = make_throttle(task.Clock())
    for _ in range(4):
        throttle.reserve(OWNER, ALICE).failed()  # the owner mistypes
    guess(throttle, GUESSERS[:10])
    assert throttle.tracked_accounts()[1] == 14
    throttle.reserve(OWNER, ALICE).succeeded()
    assert throttle.tracked_accounts()[1] == 10  # the guessers' stay


def test_a_refusal_is_logged_once_per_window_naming_the_account_safely():
    clock = task.Clock()
    throttle = make_throttle(clock)
    evil = "alice@example.test\r\nforged line"
    with capturedLogs() as events:
        guess(throttle, GUESSERS, evil)
        clock.advance(100)
        guess(throttle, GUESSERS, evil)
    lines = [formatEvent(e) for e in events if "refused" in formatEvent(e)]
    assert len(lines) == 1, lines
    assert "alice@example.test\\r\\nforged line" in lines[0]
    assert "\n" not in lines[0]
    clock.advance(601)
    with capturedLogs() as events:
        guess(throttle, GUESSERS, evil)
    assert sum("refused" in formatEvent(e) for e in events) == 1


def test_memory_is_bounded_and_an_account_under_attack_is_kept(monkeypatch):
    monkeypatch.setattr(accounts, "MAX_ACCOUNTS", 1000)
    clock = task.Clock()
    throttle = LoginThrottle(
        clock, max_failures=10_000, window=600, accounts=LIMITS, failure_delay=1.0
    )
    for round_ in range(5):
        # A spray of names from the guessers, while the guess at alice goes on.
        for i, host in enumerate(GUESSERS):
            guess(throttle, [host])
            guess(throttle, [host] * 10, f"u{round_}-{i}@example.test")
            for n in range(10):
                guess(throttle, [host], f"u{round_}-{i}-{n}@example.test")
        clock.advance(1)
    kept, failures, _ = throttle.tracked_accounts()
    assert kept <= 1000
    assert failures <= 1000 * LIMITS.max_failures
    assert throttle.reserve(OWNER, ALICE) is None  # alice's count survived the spray
    # and each account keeps at most max_failures failures
    guess(throttle, GUESSERS * 3, BOB)
    assert throttle.tracked_accounts()[1] <= failures + LIMITS.max_failures


def test_off_when_both_counts_are_zero():
    auth = configmod.parse("[auth]\naccount_slow_after = 0\naccount_max_failures = 0\n", "<t>").auth
    assert account_limits(auth) is None
    throttle = LoginThrottle(task.Clock(), max_failures=10, window=600, accounts=None)
    assert all(w == 0.0 for w in guess(throttle, GUESSERS))


def test_config_keys():
    auth = configmod.parse(
        "[auth]\naccount_slow_after = 3\naccount_max_delay = 4.5\naccount_max_failures = 9\n"
        'account_known_clients = 2\naccount_known_time = "2d"\n',
        "<t>",
    ).auth
    assert account_limits(auth) == AccountLimits(3, 9, 4.5, 2, 172800.0)
    default = account_limits(configmod.parse("", "<t>").auth)
    assert default == AccountLimits()
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse('[auth]\naccount_max_failures = -1\naccount_max_delay = "x"\n', "<t>")
    assert "auth.account_max_failures" in str(e.value)
    assert "auth.account_max_delay" in str(e.value)
