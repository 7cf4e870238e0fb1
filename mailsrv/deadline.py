"""
The TLS handshake deadline every listener sets: a connection on an
implicit-TLS port, or one that asked for STARTTLS/STLS, whose handshake has
not finished in time is cut. Until the handshake is done nothing we write
can leave (a greeting, a timeout notice wait in the TLS layer), so the idle
timeout alone would never close such a connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

HANDSHAKE_TIMEOUT = 30.0  # seconds; at most the idle timeout (limits.timeout)

_log = Logger()


def handshake_timeout(idle_timeout: float) -> float:
    """The handshake deadline for a listener whose idle timeout is C{idle_timeout}."""
    return min(HANDSHAKE_TIMEOUT, idle_timeout)


@implementer(IHandshakeListener)
class HandshakeDeadlineMixin:
    """
    For a server protocol (like L{twisted.protocols.policies.TimeoutMixin},
    on the protocol's C{callLater}): L{start_handshake_deadline} when a TLS
    handshake begins (at connection on an implicit-TLS port, after the reply
    to STARTTLS/STLS); the connection is cut unless the TLS layer calls
    C{handshakeCompleted} in time. Call L{handshake_over} when it is lost.
    """

    _handshake_call: Any = None
    callLater: Any
    transport: Any

    def start_handshake_deadline(self, idle_timeout: float) -> None:
        self.handshake_over()
        self._handshake_call = self.callLater(
            handshake_timeout(idle_timeout), self._handshake_expired
        )

    def handshakeCompleted(self) -> None:
        """L{IHandshakeListener}: the TLS handshake is done."""
        self.handshake_over()

    def handshake_over(self) -> None:
        """No deadline any more: the handshake is done, or the connection gone."""
        call, self._handshake_call = self._handshake_call, None
        if call is not None and call.active():
            call.cancel()

    def _handshake_expired(self) -> None:
        self._handshake_call = None
        peer = getattr(self.transport.getPeer(), "host", "unknown")
        _log.info("no TLS handshake from {client} in time, closing", client=peer)
        self.transport.abortConnection()
