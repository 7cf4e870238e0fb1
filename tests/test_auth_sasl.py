"""The SASL exchanges, the authorization identity rule and the one login path, on a task.Clock."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet import task
from twisted.mail import smtp

from mailsrv.auth import sasl
from mailsrv.auth.checkers import PasswordChecker
from mailsrv.auth.realm import MailRealm
from mailsrv.auth.throttle import LoginThrottle, LoginThrottled

from .test_smtp_helpers import Passwords

ALICE = "alice@example.test"
PASSWORD = "pw"
DELAY = 2.0


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- decoding -------------------------------------------------------------------


def test_plain_with_initial_response():
    got = sasl.Exchange(b"plain").start(b64(b"authz\0user\0pass"))
    assert got == sasl.Credentials(b"authz", b"user", b"pass")


def test_plain_without_initial_response_has_an_empty_challenge():
    exchange = sasl.Exchange(b"PLAIN")
    assert exchange.start(None) == b""
    assert exchange.respond(b64(b"\0user\0pass") + b" \r") == sasl.Credentials(
        b"", b"user", b"pass"
    )


@pytest.mark.parametrize(
    "message", [b"", b"user\0pass", b"\0\0pass", b"a\0b\0c\0d", b"no nul at all"]
)
def test_plain_malformed(message):
    with pytest.raises(sasl.Malformed):
        sasl.Exchange(b"PLAIN").start(b64(message))


def test_equals_is_an_empty_initial_response_only():
    with pytest.raises(sasl.Malformed):
        sasl.Exchange(b"PLAIN").start(b"=")
    with pytest.raises(sasl.BadBase64):
        sasl.Exchange(b"PLAIN").respond(b"=")


def test_bad_base64_and_cancel():
    for line in (b"!!notbase64", b"YWxpY2U", b"YW xp"):
        with pytest.raises(sasl.BadBase64):
            sasl.Exchange(b"PLAIN").respond(line)
    with pytest.raises(sasl.Cancelled):
        sasl.Exchange(b"PLAIN").respond(b"*")
    with pytest.raises(sasl.Cancelled):
        sasl.Exchange(b"LOGIN").start(b"*")


def test_login_mechanism_prompts_for_user_then_password():
    exchange = sasl.Exchange(b"login")
    assert exchange.start(None) == b64(b"Username:")
    assert exchange.respond(b64(b"alice")) == b64(b"Password:")
    assert exchange.respond(b64(b"secret")) == sasl.Credentials(b"", b"alice", b"secret")


def test_login_mechanism_with_the_user_as_initial_response():
    exchange = sasl.Exchange(b"LOGIN")
    assert exchange.start(b64(b"alice")) == b64(b"Password:")
    assert exchange.respond(b"") == sasl.Credentials(b"", b"alice", b"")


@pytest.mark.parametrize("name", [b"", b"CRAM-MD5", b"PLAINX", b"XOAUTH2"])
def test_unknown_mechanism(name):
    with pytest.raises(sasl.UnknownMechanism):
        sasl.Exchange(name)


@given(st.binary(max_size=200))
def test_any_response_is_credentials_or_a_sasl_error(line):
    for mechanism in sasl.MECHANISMS:
        exchange = sasl.Exchange(mechanism)
        try:
            exchange.start(line)
            exchange.respond(line)
        except sasl.SASLError:
            pass


# --- the authorization identity ------------------------------------------------------


@pytest.mark.parametrize(
    ("authzid", "authcid", "accepted"),
    [
        (b"", b"alice@example.test", True),
        (b"alice@example.test", b"alice@example.test", True),
        (b"Alice@Example.TEST", b"alice@example.test", True),
        (b"alice@example.test.", b"ALICE@example.test", True),
        (b"bob@example.test", b"alice@example.test", False),
        (b"alice@other.test", b"alice@example.test", False),
        (b"alice", b"ALICE", False),  # not addresses: only the very same bytes
        (b"alice", b"alice", True),
        (b"\xff@example.test", b"\xfe@example.test", False),
    ],
)
def test_authzid_rule(authzid, authcid, accepted):
    assert sasl.authzid_accepted(authzid, authcid) is accepted


# --- the one login path ------------------------------------------------------------------


class Avatar:
    def __init__(self, user: str) -> None:
        self.user = user


def authenticator(throttle: bool = True):
    clock = task.Clock()
    passwords = Passwords({ALICE: PASSWORD})
    realm = MailRealm()
    realm.register(smtp.IMessageDelivery, Avatar)
    portal = Portal(realm, [PasswordChecker(passwords, clock, DELAY)])
    limit = LoginThrottle(clock, 2, 600) if throttle else None
    return sasl.Authenticator(portal, limit, clock, DELAY), clock, limit


def results(d):
    out: list = []
    d.addBoth(out.append)
    return out


def test_login_as_oneself_in_another_case():
    auth, clock, _ = authenticator()
    creds = sasl.Credentials(b"ALICE@example.test", b"alice@EXAMPLE.test", PASSWORD.encode())
    (got,) = results(auth.login("192.0.2.1", creds, smtp.IMessageDelivery))
    assert got[1].user == ALICE  # the stored spelling


@pytest.mark.parametrize("throttle", [True, False])
def test_another_authzid_fails_after_the_delay(throttle):
    auth, clock, limit = authenticator(throttle)
    creds = sasl.Credentials(b"bob@example.test", ALICE.encode(), PASSWORD.encode())
    got = results(auth.login("192.0.2.1", creds, smtp.IMessageDelivery))
    assert got == []
    clock.advance(DELAY)
    assert got[0].check(sasl.AuthorizationRefused)
    assert sasl.outcome(got[0]) == sasl.FAILED


def test_another_authzid_counts_against_the_throttle():
    auth, clock, limit = authenticator()
    refused = sasl.Credentials(b"bob@example.test", ALICE.encode(), PASSWORD.encode())
    first = [results(auth.login("192.0.2.1", refused, smtp.IMessageDelivery)) for _ in range(2)]
    clock.advance(DELAY)
    assert [sasl.outcome(f) for (f,) in first] == [sasl.FAILED, sasl.FAILED]
    right = sasl.Credentials(b"", ALICE.encode(), PASSWORD.encode())
    (got,) = results(auth.login("192.0.2.1", right, smtp.IMessageDelivery))
    assert got.check(LoginThrottled) and sasl.outcome(got) == sasl.THROTTLED
    (got,) = results(auth.login("192.0.2.1", refused, smtp.IMessageDelivery))
    assert sasl.outcome(got) == sasl.THROTTLED  # at once: no delay, no timer held
    assert not clock.getDelayedCalls()
    (got,) = results(auth.login("192.0.2.2", right, smtp.IMessageDelivery))
    assert got[1].user == ALICE


def test_wrong_password_goes_through_the_checker_delay():
    auth, clock, _ = authenticator()
    creds = sasl.Credentials(b"", ALICE.encode(), b"wrong")
    got = results(auth.login("192.0.2.1", creds, smtp.IMessageDelivery))
    assert got == []
    clock.advance(DELAY)
    assert sasl.outcome(got[0]) == sasl.FAILED
