"""
The SMTP AUTH command (RFC 4954) on the submission listeners: the SASL
exchange (L{mailsrv.auth.sasl}, the one login path of every protocol) and
its replies. A mixin of L{mailsrv.smtp.server.SMTPServer}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.mail import smtp
from twisted.python.failure import Failure

from mailsrv import loglines, replies
from mailsrv.auth import sasl
from mailsrv.replies import (
    AUTH_ABORTED,
    AUTH_BAD_MECHANISM,
    AUTH_BAD_RESPONSE,
    AUTH_NOT_ENABLED,
    AUTH_OK,
    AUTH_THROTTLED,
)
from mailsrv.smtp.delivery import SubmissionDelivery

COMMAND, AUTH = smtp.COMMAND, smtp.AUTH


class AuthCommand:
    """
    AUTH and the steps of its SASL exchange: the session supplies its
    state (EHLO seen, user, transaction), the replies and the waiting for
    the login's answer before the next command is read.
    """

    log: Any
    mode: Any
    submission: bool
    _authenticator: Any
    _client_ip: str
    _helo_name: str | None
    _user: str | None
    _sender: str | None
    _auth_step: Any
    _delivery: Any
    _logout: Any
    _lost: bool
    _auth_allowed: Callable[[], bool]
    _reply: Callable[..., None]
    sendCode: Callable[..., None]
    _wait: Callable[[Any], None]

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.submission:
            self._reply(AUTH_NOT_ENABLED)  # the MX takes no logins, like Postfix's default
            return
        if self._helo_name is None:
            self._reply(replies.BAD_SEQUENCE, "Send EHLO first")
            return
        if self._user is not None:
            self._reply(replies.BAD_SEQUENCE, "Already authenticated")
            return
        if self._sender is not None:
            self._reply(replies.BAD_SEQUENCE, "AUTH not permitted during a mail transaction")
            return
        if not self._auth_allowed():
            self._reply(replies.ENCRYPTION_REQUIRED)
            return
        parts = rest.split(None, 1)
        try:
            exchange = sasl.Exchange(parts[0] if parts else b"")
        except sasl.UnknownMechanism:
            self._reply(AUTH_BAD_MECHANISM)
            return
        self._auth_step = exchange
        self._auth_mechanism = exchange.mechanism.decode("ascii", "replace")
        self.mode = AUTH
        self._auth_answer(lambda: exchange.start(parts[1] if len(parts) > 1 else None))

    def _auth_line(self, line: bytes) -> None:
        exchange = self._auth_step
        assert exchange is not None
        self._auth_answer(lambda: exchange.respond(line))

    def _auth_answer(self, step: Any) -> None:
        """Run one step of the SASL exchange: a 334 challenge, an error, or the login."""
        try:
            answer = step()
        except sasl.Cancelled:
            self._auth_done()
            self._reply(AUTH_ABORTED)
            return
        except sasl.SASLError:
            self._auth_done()
            self._reply(AUTH_BAD_RESPONSE)
            return
        if isinstance(answer, sasl.Credentials):
            self._auth_done()
            self._login(answer)
        else:
            self.sendCode(334, answer)

    def _auth_done(self) -> None:
        self.mode = COMMAND
        self._auth_step = None

    def _login(self, credentials: sasl.Credentials) -> None:
        d = self._authenticator.login(self._client_ip, credentials, smtp.IMessageDelivery)
        d.addCallbacks(self._logged_in, self._login_failed, errbackArgs=(credentials.authcid,))
        self._wait(d)

    def _logged_in(self, result: tuple[Any, Any, Any]) -> None:
        _, avatar, logout = result
        if self._lost:
            logout()
            return
        user = getattr(avatar, "user", None)
        self._delivery = avatar
        self._user = user
        self._logout = logout
        self.log.info(
            loglines.SMTP_AUTH_OK,
            client_name="unknown",
            client=self._client_ip,
            mechanism=getattr(self, "_auth_mechanism", ""),
            user=user,
        )
        self._reply(AUTH_OK)

    def _login_failed(self, failure: Failure, username: bytes) -> None:
        result = sasl.outcome(failure)
        if result == sasl.FAILED:
            self._auth_failed_for(username)
        elif result == sasl.THROTTLED:
            self.log.warn(
                loglines.SMTP_AUTH_THROTTLED,
                client_name="unknown",
                client=self._client_ip,
                mechanism=getattr(self, "_auth_mechanism", ""),
                user=username,
            )
            self._reply(AUTH_THROTTLED)
        elif result == sasl.UNAVAILABLE:
            self.log.error(
                "smtp login from {client}: {error}", client=self._client_ip, error=failure.value
            )
            self._reply(replies.AUTH_TEMP_FAIL)
        else:
            self.log.failure("login failed", failure=failure)
            self._reply(replies.AUTH_TEMP_FAIL)

    def _auth_failed_for(self, username: bytes) -> None:
        self.log.warn(
            loglines.SMTP_AUTH_FAILED,
            client_name="unknown",
            client=self._client_ip,
            mechanism=getattr(self, "_auth_mechanism", ""),
            user=username,
        )
        self._reply(replies.AUTH_FAILED)


def register_avatars(context: Any) -> None:
    """Serve L{SubmissionDelivery} avatars for logins on the submission listeners."""
    realm = getattr(context.portal, "realm", None)
    if realm is not None and hasattr(realm, "register"):
        realm.register(smtp.IMessageDelivery, lambda user: SubmissionDelivery(context, user))
