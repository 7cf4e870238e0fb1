"""
Stopping the SMTP sessions of one listener when the server stops (SIGTERM).

RFC 5321 3.8: a server that has to stop answers 421 and closes. A session
that is idle or between commands hears it at once. A command under way is
answered first (a message being stored gets its 250). A message being sent
(the client is in DATA) is received to its final dot, stored and answered
250, then 421: the client is not made to send it again, provided it ends
within L{DATA_GRACE} seconds. A session still open after that is cut; its
client got no 250 and keeps the message (RFC 5321 4.1.1.4, 6.1), so nothing
is lost, at worst sent twice. A session whose message is being stored when
its time is up is not cut then: the store would go on without the client
hearing its 250, and the client would send the message again. It is cut a
grace after that, if its client has not closed on its 250 and 421 by then.

Why 30 s: a message at the default size limit (50 MiB) on a link of a few
MB/s, or any ordinary message on a slow one, ends well within it, and it
leaves half of the systemd unit's TimeoutStopSec (60 s) to the relay process
and the store's last writes. Postfix's smtpd does not wait at all on
C{postfix stop} (its client sends the whole message again).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from twisted.internet import defer

from mailsrv.session import SHUTDOWN_GRACE

# Seconds a message being received at shutdown has to reach its final dot.
DATA_GRACE = 30.0


class StoppingSession(Protocol):
    """What L{stop_sessions} needs of an SMTP session."""

    transport: Any
    ended: defer.Deferred  # fires as the connection closes

    @property
    def receiving_message(self) -> bool:
        """Whether the client is sending a message (after 354, before the final dot)."""

    @property
    def storing(self) -> bool:
        """Whether a message the client ended is being stored (its 250 not sent yet)."""

    def shut_down(self) -> None:
        """421 and close now, or after the command under way or the message being sent."""


def stop_sessions(
    sessions: Collection[StoppingSession],
    clock: Any,
    grace: float = SHUTDOWN_GRACE,
    data_grace: float = DATA_GRACE,
) -> defer.Deferred:
    """
    Stop every session in C{sessions} (a live set: sessions leave it as they
    close); fire once all have closed. Those still open are cut after
    C{grace} seconds (a client that does not read its 421), or after
    C{data_grace} for a session whose client was sending a message.
    """
    stopping = list(sessions)
    if not stopping:
        return defer.succeed(None)
    sending = {s for s in stopping if s.receiving_message}
    for s in stopping:
        s.shut_down()

    def cut(which: Any) -> None:
        spared = set()
        for s in list(sessions):
            if not which(s):
                continue
            if s.storing:
                spared.add(s)  # its 250 first
                continue
            abort = getattr(s.transport, "abortConnection", None)
            if abort is not None:
                abort()
        if spared:
            timers.append(clock.callLater(grace, cut, lambda s: s in spared))

    timers: list[Any] = []
    timers += [
        clock.callLater(grace, cut, lambda s: s not in sending),
        clock.callLater(max(grace, data_grace), cut, lambda s: True),
    ]

    def cancel(result: Any) -> Any:
        for t in timers:
            if t.active():
                t.cancel()
        return result

    return defer.DeferredList([s.ended for s in stopping]).addBoth(cancel)
