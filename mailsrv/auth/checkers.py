"""The cred checker: full address and password against the password database."""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from zope.interface import implementer

from mailsrv.interfaces import PasswordDatabaseError
from mailsrv.logsafe import SafeLogger
from mailsrv.store.names import normalize_user

FAILED = "Authentication failed"


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Check L{IUsernamePassword} credentials; the avatar id is the user's
    address as the password database stores it (str), whatever the case of
    the local part the client typed. Every failure waits C{failure_delay} seconds on C{clock}
    and fails with the same L{UnauthorizedLogin}, whether the user is unknown
    or the password wrong. If the password database cannot be read, the
    login fails at once with its L{PasswordDatabaseError}, which the
    protocols answer as a temporary failure.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = SafeLogger()

    def __init__(self, passwords: Any, clock: Any, failure_delay: float) -> None:
        """C{passwords} provides L{IPasswordDatabase}; C{clock} delays the failures."""
        self._passwords = passwords
        self._clock = clock
        self._delay = failure_delay

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        username = credentials.username
        password = credentials.password
        try:
            if isinstance(username, bytes):
                username = username.decode("utf-8")
            address = normalize_user(username)
        except (UnicodeDecodeError, ValueError):
            # Same cost as a real check, so the answer's timing tells nothing.
            d = self._passwords.verify("nobody@invalid", password)
            d.addCallback(lambda _: False)
            stored = None
        else:
            try:
                stored = self._passwords.lookup(address)
            except PasswordDatabaseError:
                return defer.fail()  # a temporary failure, not a wrong password
            d = self._passwords.verify(address if stored is None else stored, password)
        d.addCallback(self._decide, stored)
        return d

    def _decide(self, ok: bool, stored: str | None) -> Any:
        if ok and stored is not None:
            return stored
        return task.deferLater(self._clock, self._delay, _fail)


def _fail() -> None:
    raise UnauthorizedLogin(FAILED)
