"""
The relayer's idle SMTP connections: after a transaction a session's
connection waits a short while for the next message to the same
destination (L{mailsrv.outbound.client} parks its clients here).
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar


class IdleClient(Protocol):
    """What the cache needs of a connected client (L{mailsrv.outbound.client.RelayClient})."""

    transport: Any

    def quit_idle(self) -> None:
        """Say QUIT and close the connection."""


C = TypeVar("C", bound=IdleClient)


class ConnectionCache(Generic[C]):
    """
    Idle connections kept for a short while after a transaction, so that the
    next message to the same destination skips connect, EHLO and STARTTLS
    (like Postfix's connection cache, 2 s by default). Keyed by whatever the
    caller says makes two sessions interchangeable (destination, address,
    TLS policy, credentials).
    """

    def __init__(self, idle_time: float = 2.0, per_key: int = 5) -> None:
        self.idle_time = idle_time
        self.per_key = per_key
        self._idle: dict[Any, list[C]] = {}
        self._keys: dict[C, Any] = {}
        self._closed = False  # stopping: a transaction that ends now closes its connection

    def key_for(self, client: C, key: Any) -> None:
        self._keys[client] = key

    def park(self, client: C) -> None:
        key = self._keys.get(client)
        idle = self._idle.setdefault(key, [])
        if key is None or self._closed or len(idle) >= self.per_key:
            client.quit_idle()
            return
        idle.append(client)

    def take(self, key: Any) -> C | None:
        """An idle connected client for C{key}, or None."""
        idle = self._idle.get(key)
        while idle:
            client = idle.pop()
            if client.transport is not None and getattr(client.transport, "connected", False):
                return client
        return None

    def forget(self, client: C) -> None:
        key = self._keys.pop(client, None)
        idle = self._idle.get(key)
        if idle and client in idle:
            idle.remove(client)

    def close_all(self) -> None:
        """Close the idle connections, and every one that becomes idle from now on."""
        self._closed = True
        for idle in list(self._idle.values()):
            for client in list(idle):
                client.quit_idle()
        self._idle.clear()
