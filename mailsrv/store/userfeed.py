"""
The per-user change feed both stores keep (L{IMailStore.add_user_listener}):
the callbacks of each user, told of L{FolderEvent}s on the reactor thread.
In memory, no disk, no polling: a store tells it what it does itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from mailsrv.store.names import normalize_user


class UserFeed:
    """Callbacks per user; L{tell} calls those of one user with an event."""

    log = Logger()

    def __init__(self) -> None:
        self._listeners: dict[str, list[Callable[[Any], None]]] = {}

    def add(self, user: str, callback: Callable[[Any], None]) -> None:
        """Call C{callback(event)} for each event of C{user} from now on."""
        self._listeners.setdefault(normalize_user(user), []).append(callback)

    def remove(self, user: str, callback: Callable[[Any], None]) -> None:
        """Stop calling C{callback} (nothing if it was not added)."""
        key = normalize_user(user)
        callbacks = self._listeners.get(key)
        if callbacks and callback in callbacks:
            callbacks.remove(callback)
            if not callbacks:
                del self._listeners[key]

    def listening(self, user: str) -> bool:
        """Whether anyone listens to C{user}'s events (a store can skip building them)."""
        return normalize_user(user) in self._listeners

    def tell(self, user: str, event: Any) -> None:
        """Call every callback of C{user} with C{event}; one that fails is logged."""
        for cb in list(self._listeners.get(normalize_user(user), ())):
            try:
                cb(event)
            except Exception:
                self.log.failure("user feed listener failed")

    def __len__(self) -> int:
        return sum(len(v) for v in self._listeners.values())
