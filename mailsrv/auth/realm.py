"""
The realm: turns an authenticated address into the avatar a protocol asked for.

Each protocol registers a factory for its avatar interface; the realm stays
ignorant of SMTP, POP3 and IMAP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import implementer

AvatarFactory = Callable[[str], Any]


def _noop() -> None:
    return None


@implementer(IRealm)
class MailRealm:
    """
    A realm with one avatar factory per interface.

    C{factory(avatar_id)} returns the avatar or a Deferred firing with it; if
    the avatar has a C{logout()} method, that is what the portal hands back as
    the logout callable.
    """

    def __init__(self) -> None:
        self._factories: dict[Any, AvatarFactory] = {}

    def register(self, interface: Any, factory: AvatarFactory) -> None:
        """Serve avatars for C{interface} with C{factory(avatar_id)}."""
        self._factories[interface] = factory

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> defer.Deferred:
        """Build the avatar for the first interface we have a factory for."""
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        for iface in interfaces:
            factory = self._factories.get(iface)
            if factory is not None:
                d = defer.maybeDeferred(factory, avatarId)
                d.addCallback(_wrap, iface)
                return d
        return defer.fail(NotImplementedError(f"no avatar for {interfaces!r}"))


def _wrap(avatar: Any, iface: Any) -> tuple[Any, Any, Callable[[], Any]]:
    logout = getattr(avatar, "logout", None)
    return iface, avatar, logout if callable(logout) else _noop
