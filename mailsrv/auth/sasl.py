"""
The one login path for SMTP AUTH, POP3 and IMAP: the SASL mechanisms'
exchanges, the authorization identity rule, the throttle and the delay.

Every protocol carries the same two mechanisms, PLAIN (RFC 4616) and LOGIN
(draft-murchison-sasl-login-00), through the same L{Exchange}: the protocol
only frames the challenges (SMTP C{334 }, POP3 and IMAP C{+ }) and maps the
outcome to its replies. Plain-text logins (POP3 USER/PASS, IMAP LOGIN) are
L{Credentials} without an authorization identity. Every login, whichever
command carried it, goes through L{Authenticator.login}.

The authorization identity (authzid, RFC 4422 3.4.1), one rule for all
three protocols, as Dovecot's: an empty authzid, or one that names the same
user as the authentication identity (the local part in any case, the
domain in any case: the user as the password file stores it) is accepted,
and the login is the authcid's. Any other authzid asks to act as another
user, which nobody may: the login is refused as a failed one, without a
password check (so the answer tells nothing about the password), counted by
the throttle and answered after the failure delay, like a wrong password.
Before this rule, SMTP refused such a login at once (535), IMAP at once with
C{NO [AUTHORIZATIONFAILED]}, POP3 as a wrong password; an authzid in
another case than the authcid was refused by all three.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailsrv.auth.passwd import lookup_key
from mailsrv.auth.throttle import LoginThrottled
from mailsrv.interfaces import PasswordDatabaseError

PLAIN = b"PLAIN"
LOGIN = b"LOGIN"
MECHANISMS = (PLAIN, LOGIN)  # in the order the protocols advertise them

# draft-murchison-sasl-login-00 2: the server's prompts.
_USERNAME = base64.b64encode(b"Username:")
_PASSWORD = base64.b64encode(b"Password:")

# What a login came to, as the protocols answer it.
OK, FAILED, THROTTLED, UNAVAILABLE, ERROR = "ok", "failed", "throttled", "unavailable", "error"


class SASLError(Exception):
    """A SASL exchange ended without credentials."""


class Cancelled(SASLError):
    """The client sent C{*} (RFC 4422 3.5: the client aborts the exchange)."""


class BadBase64(SASLError):
    """A response was not base64 (RFC 4648 4)."""


class Malformed(SASLError):
    """A PLAIN message that is not C{[authzid] NUL authcid NUL passwd} (RFC 4616 2)."""


class UnknownMechanism(SASLError):
    """A mechanism we do not offer."""


class AuthorizationRefused(UnauthorizedLogin):
    """The authzid names another user than the authcid: a failed login."""


@dataclass(frozen=True)
class Credentials:
    """What a client offered: authorization identity (may be empty), user and password."""

    authzid: bytes
    authcid: bytes
    password: bytes


def decode_response(line: bytes, initial: bool = False) -> bytes:
    """
    A client's base64 response, decoded. C{*} cancels (RFC 4422 3.5); an
    initial response of C{=} is an empty one (RFC 4954 4, RFC 5034 4, RFC 4959 3).
    """
    line = line.strip()
    if line == b"*":
        raise Cancelled()
    if initial and line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise BadBase64() from None


def parse_plain(message: bytes) -> Credentials:
    """RFC 4616 2: C{[authzid] NUL authcid NUL passwd}, the authcid not empty."""
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise Malformed()
    return Credentials(*parts)


class Exchange:
    """
    One SASL exchange for PLAIN or LOGIN, the same whichever protocol
    carries it. L{start} and L{respond} answer either the next challenge,
    base64-encoded for the wire, or the L{Credentials} the exchange ended
    with; they raise a L{SASLError} when it ends without them.
    """

    def __init__(self, mechanism: bytes) -> None:
        name = mechanism.upper()
        if name not in MECHANISMS:
            raise UnknownMechanism(mechanism)
        self.mechanism = name
        self._username: bytes | None = None

    def start(self, initial: bytes | None) -> bytes | Credentials:
        """The first step, with the client's initial response if it sent one."""
        if initial is None:
            return b"" if self.mechanism == PLAIN else _USERNAME  # RFC 4422 5: empty challenge
        return self._step(decode_response(initial, initial=True))

    def respond(self, line: bytes) -> bytes | Credentials:
        """The client's answer to the last challenge."""
        return self._step(decode_response(line))

    def _step(self, response: bytes) -> bytes | Credentials:
        if self.mechanism == PLAIN:
            return parse_plain(response)
        if self._username is None:
            self._username = response
            return _PASSWORD
        return Credentials(b"", self._username, response)


def authzid_accepted(authzid: bytes, authcid: bytes) -> bool:
    """
    Whether a login as C{authcid} may act as C{authzid}: only as itself
    (empty, or the same user in any case). See the module docstring.
    """
    if not authzid or authzid == authcid:
        return True
    try:
        return lookup_key(authzid.decode("utf-8")) == lookup_key(authcid.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False


class Authenticator:
    """
    The one place a login is decided, for every protocol: the authzid rule,
    then the throttle (L{mailsrv.auth.throttle.LoginThrottle.login}) around
    the portal, whose checker delays a wrong password.
    """

    def __init__(self, portal: Any, throttle: Any, clock: Any, failure_delay: float) -> None:
        """C{throttle} may be None (no limit); C{clock} delays a refused authzid."""
        self._portal = portal
        self._throttle = throttle
        self._clock = clock
        self._delay = failure_delay

    def login(self, host: str, credentials: Credentials, interface: Any) -> defer.Deferred:
        """
        Log the client at C{host} in: fire with the portal's C{(interface,
        avatar, logout)}, or fail with L{LoginThrottled} (at once),
        L{UnauthorizedLogin} (after the failure delay), or the portal's error.
        """
        if not authzid_accepted(credentials.authzid, credentials.authcid):
            return self._refuse(host, credentials.authcid)
        up = UsernamePassword(credentials.authcid, credentials.password)
        if self._throttle is None:
            return defer.maybeDeferred(self._portal.login, up, None, interface)
        return self._throttle.login(self._portal, host, up, None, interface)

    def _refuse(self, host: str, authcid: bytes) -> defer.Deferred:
        """A refused authzid: a failure the throttle counts, answered after the delay."""
        if self._throttle is not None:
            attempt = self._throttle.reserve(host, authcid)
            if attempt is None:
                return defer.fail(LoginThrottled(host))
            attempt.failed()
        return task.deferLater(self._clock, self._delay, _authorization_refused)


def _authorization_refused() -> None:
    raise AuthorizationRefused("authorization identity refused")


def outcome(failure: Failure) -> str:
    """
    What a failed L{Authenticator.login} came to: L{FAILED} (wrong user or
    password, refused authzid), L{THROTTLED}, L{UNAVAILABLE} (the password
    database cannot be read) or L{ERROR} (anything else, a bug to log).
    """
    if failure.check(LoginThrottled):
        return THROTTLED
    if failure.check(LoginFailed):
        return FAILED
    if failure.check(PasswordDatabaseError):
        return UNAVAILABLE
    return ERROR


def authenticator(context: Any) -> Authenticator:
    """The L{Authenticator} for a server context (portal, throttle, reactor, config)."""
    return Authenticator(
        context.portal, context.throttle, context.reactor, context.config.auth.failure_delay
    )
