"""The cred checker and the realm."""

from __future__ import annotations

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from zope.interface import Interface
from zope.interface.verify import verifyObject

from mailsrv.auth.checkers import PasswordChecker
from mailsrv.auth.realm import MailRealm


class FakePasswords:
    def __init__(self, users):
        self.users = users
        self.asked = []

    def lookup(self, address):
        return address if address in self.users else None

    def has_user(self, address):
        return address in self.users

    def verify(self, address, password):
        self.asked.append(address)
        if isinstance(password, bytes):
            password = password.decode()
        return defer.succeed(self.users.get(address) == password)


def outcome(d):
    out = []
    d.addBoth(out.append)
    return out


@pytest.fixture
def setup():
    clock = task.Clock()
    pw = FakePasswords({"alice@example.test": "s3cret"})
    return clock, pw, PasswordChecker(pw, clock, 2.0)


def test_interface(setup):
    verifyObject(ICredentialsChecker, setup[2])
    verifyObject(IRealm, MailRealm())


def test_success_is_immediate_and_normalized(setup):
    clock, pw, checker = setup
    out = outcome(checker.requestAvatarId(UsernamePassword(b"alice@EXAMPLE.test", b"s3cret")))
    assert out == ["alice@example.test"]


@pytest.mark.parametrize(
    "user,password",
    [
        (b"alice@example.test", b"wrong"),
        (b"bob@example.test", b"s3cret"),
        (b"garbage", b"x"),
        (b"\xff@example.test", b"x"),
    ],
)
def test_failures_delayed_and_identical(setup, user, password):
    clock, pw, checker = setup
    out = outcome(checker.requestAvatarId(UsernamePassword(user, password)))
    assert out == []
    assert len(pw.asked) == 1  # a hash is checked even for unusable names
    clock.advance(1.9)
    assert out == []
    clock.advance(0.1)
    assert len(out) == 1
    out[0].trap(UnauthorizedLogin)
    assert str(out[0].value) == "Authentication failed"


class IThing(Interface):
    pass


class IOther(Interface):
    pass


class Avatar:
    def __init__(self, who):
        self.who = who
        self.out = False

    def logout(self):
        self.out = True


def test_realm_register_and_logout():
    realm = MailRealm()
    realm.register(IThing, Avatar)
    realm.register(IOther, lambda who: defer.succeed(object()))
    ((iface, avatar, logout),) = outcome(realm.requestAvatar("a@b.c", None, IThing))
    assert iface is IThing and avatar.who == "a@b.c"
    logout()
    assert avatar.out
    ((iface, avatar, logout),) = outcome(realm.requestAvatar(b"a@b.c", None, IOther))
    assert iface is IOther
    assert logout() is None
    (f,) = outcome(realm.requestAvatar("a@b.c", None, Interface))
    f.trap(NotImplementedError)


def test_portal_login_end_to_end(setup):
    clock, pw, checker = setup
    realm = MailRealm()
    realm.register(IThing, Avatar)
    portal = Portal(realm, [checker])
    ((iface, avatar, logout),) = outcome(
        portal.login(UsernamePassword(b"alice@example.test", b"s3cret"), None, IThing)
    )
    assert avatar.who == "alice@example.test"
