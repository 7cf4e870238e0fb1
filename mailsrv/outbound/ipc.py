"""
What the server and its relay process say to each other: AMP commands over a
pair of pipes (the child's descriptors 3 and 4), and the adapter that lets
an AMP protocol speak through a L{ProcessProtocol}'s pipes.

    server -> relay   Start    the settings (TOML text), once
                      Queued   messages were queued: for each its id and,
                               when they fit, its envelope and bytes (no answer)
                      Stop     finish the attempts under way, then exit
    relay -> server   DeliverLocal  store a queued message (or a DSN) in a
                               local mailbox; only the server writes mailboxes
                      Log      log events, already formatted (no answer),
                               unless it writes them itself (Start's log_direct)
                      Counted  the results of delivery attempts, for the
                               server's metrics (no answer)

Queued and Log carry many items each: a L{Batcher} gathers the items of one
reactor turn and sends them as a JSON list in as few commands as fit (an AMP
value holds at most 64 KiB), so a busy server pays one command per turn, not
one per message or log line.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import _ProcessAddress
from twisted.protocols import amp

from mailsrv.replies import LOCAL_ERROR, ReplyError

CHILD_IN = 3  # the relay process reads commands here
CHILD_OUT = 4  # and writes its own here
MAX_VALUE = 65_000  # an AMP value holds at most 65,535 bytes


def fits(value: bytes | str | None) -> bool:
    return value is not None and len(value) <= MAX_VALUE


class Start(amp.Command):
    arguments = [
        (b"config", amp.Unicode()),
        (b"path", amp.Unicode()),
        (b"base", amp.Unicode()),
        # True: the server's log is twistd's text log on standard output, which
        # the relay process shares: it writes its own lines there (the server
        # need not format them). False: it sends them in Log commands.
        (b"log_direct", amp.Boolean(optional=True)),
    ]
    response = []  # type: ignore[var-annotated]


class Queued(amp.Command):
    # A JSON list of [queue id, envelope (object) or null, offset, message or
    # null] (the message's bytes as Latin-1 text).
    arguments = [(b"items", amp.String())]
    requiresAnswer = False


DRAIN_GRACE = 30.0  # seconds a drain (a reload) lets the SMTP transactions under way finish


class Stop(amp.Command):
    """
    Stop relaying, the attempts under way recording their results. With
    C{drain} (a reload), the SMTP transactions under way may finish first,
    within L{DRAIN_GRACE}: one aborted after its final dot could
    reach the remote server twice.
    """

    arguments = [(b"drain", amp.Boolean(optional=True))]
    response = []  # type: ignore[var-annotated]


class LocalDeliveryFailed(ReplyError):
    """
    The server could not store the message: a local error (451 4.3.0), its
    cause the text that crosses the pipe (AMP sends C{str()} of the error and
    builds it again from that text on the other side) for the relay
    process's log and its record of the attempt.
    """

    def __init__(self, cause: str) -> None:
        super().__init__(LOCAL_ERROR, cause=cause)

    def __str__(self) -> str:
        return str(self.cause)


class DeliverLocal(amp.Command):
    arguments = [
        (b"recipient", amp.Unicode()),
        (b"sender", amp.Unicode()),
        (b"size", amp.Integer()),
        (b"path", amp.Unicode(optional=True)),  # a file under the queue folder
        (b"offset", amp.Integer(optional=True)),  # where the message starts in it
        (b"data", amp.String(optional=True)),  # or the message itself
    ]
    response = []  # type: ignore[var-annotated]
    errors = {LocalDeliveryFailed: b"LOCAL_DELIVERY_FAILED"}


class Log(amp.Command):
    arguments = [(b"items", amp.String())]  # a JSON list of [namespace, level, text]
    requiresAnswer = False


class Counted(amp.Command):
    # A JSON list of [relay, result]: relay "local" or the next hop, result
    # "sent", "deferred" or "bounced" (mailsrv.metrics.relaycounts).
    arguments = [(b"items", amp.String())]
    requiresAnswer = False


class Batcher:
    """
    Gathers the items (JSON-able lists) of one reactor turn and hands them to
    C{send} as few JSON lists of at most L{MAX_VALUE} bytes. C{shrink(item)}
    gives a smaller form of an item too big to go alone, or None to drop it.
    """

    def __init__(self, reactor: Any, send: Any, shrink: Any) -> None:
        self.reactor = reactor
        self.send = send
        self.shrink = shrink
        self.items: list[bytes] = []
        self.size = 0
        self._call: Any = None

    def add(self, item: list[Any]) -> None:
        encoded = _encode(item)
        while len(encoded) + 2 > MAX_VALUE:
            smaller = self.shrink(item)
            if smaller is None:
                return
            item, encoded = smaller, _encode(smaller)
        if self.size + len(encoded) + 2 > MAX_VALUE:
            self.flush()
        self.items.append(encoded)
        self.size += len(encoded) + 1
        if self._call is None:
            self._call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self.items:
            payload = b"[" + b",".join(self.items) + b"]"
            self.items, self.size = [], 0
            self.send(payload)


def _encode(item: list[Any]) -> bytes:
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode(payload: bytes) -> list[Any]:
    items = json.loads(payload)
    if not isinstance(items, list):
        raise ValueError("a batch is a JSON list")
    return items


class QuietAMP(amp.AMP):
    """
    AMP without its own "connection established/lost" log lines, which name
    pipe objects: the server logs the relay process's start and end itself.
    """

    def makeConnection(self, transport: Any) -> None:
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Any = None) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class PipeTransport:
    """A child process's pipes as the transport of the server's AMP protocol."""

    disconnecting = False

    def __init__(self, process: Any) -> None:
        self.process = process

    def write(self, data: bytes) -> None:
        # Once the child's end is closed (it died, or we closed it) there is
        # no one to write to: what would go is dropped, as on a lost connection.
        if not self.disconnecting and CHILD_IN in getattr(self.process, "pipes", {CHILD_IN: 1}):
            self.process.writeToChild(CHILD_IN, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.process.closeChildFD(CHILD_IN)

    def getPeer(self) -> _ProcessAddress:
        return _ProcessAddress()

    def getHost(self) -> _ProcessAddress:
        return _ProcessAddress()
