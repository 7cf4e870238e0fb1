"""
The parts of the server context built from settings alone: by the start
(L{mailsrv.service.build_context}) and again by a reload
(L{mailsrv.reload.next_context}), so both build them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer

from mailsrv.auth.accounts import account_limits
from mailsrv.auth.checkers import PasswordChecker
from mailsrv.auth.realm import MailRealm
from mailsrv.auth.throttle import LoginThrottle
from mailsrv.config import Config
from mailsrv.interfaces import IPasswordDatabase
from mailsrv.policy.rates import RateLimits
from mailsrv.store.quota import Quotas


def portal(config: Config, passwords: IPasswordDatabase, reactor: Any) -> Portal:
    """The login portal over C{passwords} (hashed passwords, [auth] failure_delay)."""
    return Portal(MailRealm(), [PasswordChecker(passwords, reactor, config.auth.failure_delay)])


def login_throttle(config: Config, reactor: Any) -> LoginThrottle:
    """The failed-login limits of [auth], per client address and per account."""
    auth = config.auth
    return LoginThrottle(
        reactor,
        auth.max_failures,
        auth.failure_window,
        account_limits(auth),
        auth.failure_delay,
    )


def rate_limits(config: Config, reactor: Any) -> RateLimits:
    """The message and recipient rate limits of [policy]."""
    return RateLimits(reactor, config.policy.messages_per_hour, config.policy.recipients_per_hour)


def quotas(config: Config, in_pool: Callable[..., defer.Deferred]) -> Quotas:
    """The users' storage limits ([quota]) and their usage, read in C{in_pool}."""
    return Quotas(config.quota, config.mail_dir, in_pool)
