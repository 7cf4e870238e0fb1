"""
The relayer's idle connections (L{mailsrv.outbound.connections}) with real
SMTP clients on StringTransports: kept per key up to a bound, handed out
only while connected, forgotten, and all closed at shutdown.
"""

from __future__ import annotations

import io

from twisted.internet.testing import MemoryReactorClock, StringTransport

from mailsrv.outbound.client import RelayClient, Session
from mailsrv.outbound.connections import ConnectionCache
from mailsrv.outbound.mx import Hop


def _idle_client(
    cache: ConnectionCache[RelayClient], key: str
) -> tuple[RelayClient, StringTransport]:
    """A client whose transaction is done, parked in C{cache} under C{key}."""
    session = Session(
        reactor=MemoryReactorClock(),
        pool=None,
        hop=Hop("mx.remote.test", "192.0.2.1", 25),
        helo="mail.example.test",
        sender="alice@example.test",
        recipients=["a@r.test"],
        message=io.BytesIO(b"\n"),
        cache=cache,
        cache_key=key,
    )
    p = session.buildProtocol(None)
    t = StringTransport()
    t.connected = True
    p.makeConnection(t)
    for line in (b"220 hi", b"250 hi", b"250 ok", b"250 ok", b"354 go"):
        p.dataReceived(line + b"\r\n")
    t.clear()
    p.dataReceived(b"250 ok\r\n")  # the transaction is done: parked, or closed
    return p, t


def test_kept_per_key_up_to_the_bound_the_rest_closed():
    cache: ConnectionCache[RelayClient] = ConnectionCache(idle_time=2.0, per_key=1)
    first, t1 = _idle_client(cache, "k")
    second, t2 = _idle_client(cache, "k")
    assert t1.value() == b""  # kept
    assert t2.value() == b"QUIT\r\n"  # one per key already
    assert cache.take("other") is None
    assert cache.take("k") is first
    assert cache.take("k") is None


def test_a_connection_closed_meanwhile_is_not_handed_out():
    cache: ConnectionCache[RelayClient] = ConnectionCache(idle_time=2.0)
    p, t = _idle_client(cache, "k")
    t.connected = False
    assert cache.take("k") is None


def test_forget_and_close_all():
    cache: ConnectionCache[RelayClient] = ConnectionCache(idle_time=2.0)
    gone, _ = _idle_client(cache, "a")
    cache.forget(gone)
    assert cache.take("a") is None
    kept, t = _idle_client(cache, "b")
    cache.close_all()
    assert t.value() == b"QUIT\r\n"
    assert cache.take("b") is None
