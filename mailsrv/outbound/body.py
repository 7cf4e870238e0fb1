"""
The message body of a relay session, streamed from the queue file to the
transport: chunks read in the thread pool, CRLF line ends and dot-stuffing
(RFC 5321 2.3.8, 4.5.2), back-pressure honoured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

BODY_CHUNK = 64 * 1024

__all__ = ["BODY_CHUNK", "_BodySender"]


@implementer(IPushProducer)
class _BodySender:
    """
    Streams the queued message to the transport: reads chunks in the thread
    pool (never the whole message), converts LF to CRLF and dot-stuffs
    (RFC 5321 4.5.2) across chunk boundaries, and honours back-pressure.
    """

    def __init__(
        self, f: Any, transport: Any, reactor: Any, pool: Any, on_chunk: Callable[[], None]
    ) -> None:
        self._f = f
        self._transport = transport
        self._reactor = reactor
        self._pool = pool
        self._on_chunk = on_chunk
        self._paused = False
        self._reading = False
        self._stopped = False
        self._line_start = True
        self._held_cr = False
        self.last = b"\n"
        self.done: defer.Deferred = defer.Deferred()

    def start(self) -> defer.Deferred:
        self._transport.registerProducer(self, True)
        self._read()
        return self.done

    def _read(self) -> None:
        if self._stopped or self._paused or self._reading:
            return
        self._reading = True
        if self._pool is None:
            d = defer.maybeDeferred(self._f.read, BODY_CHUNK)
        else:
            d = deferToThreadPool(self._reactor, self._pool, self._f.read, BODY_CHUNK)
        d.addCallbacks(self._got, self._failed)

    def transform(self, chunk: bytes) -> bytes:
        """
        The next piece of the message as sent: only CRLF line ends (RFC 5321
        2.3.8), whatever the queue file holds (a CR, an LF or a CRLF each end
        a line), dot-stuffed (RFC 5321 4.5.2). A CR at the end of C{chunk}
        waits for the next one (it may start a CRLF); L{flush} sends it.
        """
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        if self._held_cr:
            chunk = chunk[:-1]
        if not chunk:
            return b""
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        self._line_start = chunk.endswith(b"\n")
        return chunk

    def flush(self) -> bytes:
        """What L{transform} still holds, at the end of the message."""
        if not self._held_cr:
            return b""
        self._held_cr = False
        self._line_start = True
        return b"\r\n"

    def _got(self, chunk: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if not chunk:
            tail = self.flush()
            if tail:
                self._transport.write(tail)
                self.last = tail[-1:]
            self._transport.unregisterProducer()
            self._stopped = True
            self.done.callback(self.last)
            return
        data = self.transform(chunk)
        if data:
            self.last = data[-1:]
            self._transport.write(data)
        self._on_chunk()
        if len(chunk) < BODY_CHUNK:
            # A buffered read of a regular file is short only at its end.
            self._got(b"")
            return
        self._read()

    def _failed(self, f: Failure) -> None:
        self._reading = False
        if not self._stopped:
            self._stopped = True
            self._transport.unregisterProducer()
            self.done.errback(f)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._read()

    def stopProducing(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.done.errback(
                Failure(ConnectionError("connection closed while sending the message"))
            )
