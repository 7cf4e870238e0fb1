"""The login throttle: attempts in flight count, and what a success forgives (task.Clock)."""

from __future__ import annotations

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from zope.interface import Interface

from mailsrv.auth.realm import MailRealm
from mailsrv.auth.throttle import LoginThrottle, LoginThrottled

H = "192.0.2.1"
OTHER = "192.0.2.2"
ALICE = "alice@example.test"
BOB = "bob@example.test"


class IThing(Interface):
    pass


def outcome(d: defer.Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


class CountingChecker(InMemoryUsernamePasswordDatabaseDontUse):
    """The in-memory checker, counting the passwords it was asked to check."""

    def __init__(self, **users: bytes) -> None:
        super().__init__(**users)
        self.checked = 0

    def requestAvatarId(self, credentials):
        self.checked += 1
        return super().requestAvatarId(credentials)


def make_portal() -> tuple[Portal, CountingChecker]:
    realm = MailRealm()
    realm.register(IThing, lambda avatar_id: object())
    checker = CountingChecker(**{ALICE: b"a-pass", BOB: b"b-pass"})
    return Portal(realm, [checker]), checker


def test_attempts_in_flight_count():
    throttle = LoginThrottle(task.Clock(), max_failures=5, window=600)
    attempts = [throttle.reserve(H, ALICE) for _ in range(5)]
    assert all(a is not None for a in attempts)
    assert throttle.reserve(H, ALICE) is None  # five are being checked
    assert throttle.reserve(H, BOB) is None  # whatever the account
    assert throttle.reserve(OTHER, ALICE) is not None  # per client address
    attempts[0].abandoned()  # a local error: counted neither way
    again = throttle.reserve(H, ALICE)
    assert again is not None
    for a in [again, *attempts[1:]]:
        a.failed()
    assert throttle.reserve(H, ALICE) is None  # five failures now
    attempts[1].succeeded()  # an attempt ends once only
    assert throttle.reserve(H, ALICE) is None


def test_failures_expire_after_the_window():
    clock = task.Clock()
    throttle = LoginThrottle(clock, max_failures=2, window=600)
    for _ in range(2):
        throttle.reserve(H, ALICE).failed()
        clock.advance(100)
    assert throttle.blocked(H)
    clock.advance(401)  # the first failure is 601 s old
    assert not throttle.blocked(H)
    throttle.reserve(H, ALICE).failed()
    assert throttle.blocked(H)


def test_a_success_forgives_that_account_only():
    throttle = LoginThrottle(task.Clock(), max_failures=5, window=600)
    for _ in range(3):
        throttle.reserve(H, ALICE).failed()
    throttle.reserve(H, "carol@example.test").failed()
    throttle.reserve(H, BOB).succeeded()  # another account: forgives nothing
    throttle.reserve(H, BOB).failed()
    assert throttle.reserve(H, ALICE) is None  # 3 + 1 + 1 failures
    throttle.reserve(OTHER, "CAROL@example.test").succeeded()  # another address: nothing
    assert throttle.blocked(H)


def test_a_success_forgives_the_owners_own_mistakes():
    throttle = LoginThrottle(task.Clock(), max_failures=5, window=600)
    for _ in range(3):
        throttle.reserve(H, BOB).failed()
    throttle.reserve(H, ALICE).failed()
    throttle.reserve(H, "ALICE@example.test").succeeded()  # the same account, any case
    for _ in range(2):
        throttle.reserve(H, ALICE).failed()
    assert throttle.reserve(H, ALICE) is None  # 3 against bob, 2 new against alice


def test_login_is_the_one_entry_point():
    portal, checker = make_portal()
    throttle = LoginThrottle(task.Clock(), max_failures=2, window=600)

    def login(user: bytes, password: bytes, host: str = H) -> list:
        return outcome(throttle.login(portal, host, UsernamePassword(user, password), None, IThing))

    ok = login(b"bob@example.test", b"b-pass")
    assert ok[0][0] is IThing
    for _ in range(2):
        assert login(b"alice@example.test", b"wrong")[0].check(UnauthorizedLogin)
    assert checker.checked == 3
    refused = login(b"alice@example.test", b"a-pass")
    assert refused[0].check(LoginThrottled)
    assert checker.checked == 3  # refused without a check
    assert login(b"alice@example.test", b"a-pass", host=OTHER)[0][0] is IThing
