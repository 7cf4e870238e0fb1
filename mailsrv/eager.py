"""
Sending a reply at once.

Twisted's TCP transport queues every write and sends it on the reactor's
next turn: it registers the socket for writability, is woken, sends, and
unregisters (two epoll_ctl calls and a dispatch per reply). For a server
that answers one command at a time that is a tenth of its CPU. When the
transport holds nothing unsent, sending straight away keeps the order of the
bytes and everything else the transport does; what the socket does not take
at once goes through C{transport.write} as usual.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def send_now(transport: Any, data: bytes) -> None:
    """Write C{data} to C{transport}, sending it at once when that is safe."""
    if (
        type(transport) is tcp.Server  # plain TCP: not TLS, not a test's transport
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not getattr(transport, "_tempDataBuffer", True)  # unknown: be safe
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or an error transport.write reports its way
            sent = 0
        data = data[sent:]
        if not data:
            return
    transport.write(data)
