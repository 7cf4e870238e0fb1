"""
In the relay process: the results of its delivery attempts, sent to the
server for its metrics (the server's registry is the only one). A log
observer reads the relayer's per-recipient events (their C{relay} and
C{result} fields, and the expiry line) and sends a turn's results in one
L{mailsrv.outbound.ipc.Counted} command; the relay process keeps no count.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver
from zope.interface import implementer

from mailsrv.outbound import ipc

_RESULTS = frozenset({"sent", "deferred", "bounced"})
_EXPIRED = "status=expired"


@implementer(ILogObserver)
class ResultCounter:
    """Sends C{[relay, result]} of each recorded delivery attempt to the server."""

    counts_only = True

    def __init__(self, proto: Any, reactor: Any) -> None:
        self.proto = proto
        self.batch = ipc.Batcher(reactor, self._send, lambda item: None)

    def __call__(self, event: dict[str, Any]) -> None:
        result = event.get("result")
        relay = event.get("relay")
        if isinstance(relay, str) and result in _RESULTS:
            self.batch.add([relay, result])
        elif _EXPIRED in str(event.get("log_format", "")) and "rcpt" in event:
            self.batch.add(["none", "bounced"])  # never delivered within the queue lifetime

    def _send(self, items: bytes) -> None:
        if self.proto.transport is None:
            return  # the server is gone: nobody to count for
        try:
            self.proto.callRemote(ipc.Counted, items=items)
        except Exception:
            pass
