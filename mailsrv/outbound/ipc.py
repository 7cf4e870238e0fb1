"""
What the server and its relay process say to each other: AMP commands over a
pair of pipes (the child's descriptors 3 and 4), and the adapter that lets
an AMP protocol speak through a L{ProcessProtocol}'s pipes.

    server -> relay   Start    the settings (TOML text), once
                      Queued   a message was queued: its envelope and, when
                               small, its bytes (no answer)
                      Stop     finish the attempts under way, then exit
    relay -> server   DeliverLocal  store a queued message (or a DSN) in a
                               local mailbox; only the server writes mailboxes
                      Log      one log event, already formatted (no answer)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import _ProcessAddress
from twisted.protocols import amp

CHILD_IN = 3  # the relay process reads commands here
CHILD_OUT = 4  # and writes its own here
MAX_VALUE = 65_000  # an AMP value holds at most 65,535 bytes


def fits(value: bytes | str | None) -> bool:
    return value is not None and len(value) <= MAX_VALUE


def clip(text: str) -> str:
    """Text cut to fit in one AMP value once encoded."""
    if len(text.encode("utf-8", "replace")) <= MAX_VALUE:
        return text
    return text.encode("utf-8", "replace")[: MAX_VALUE - 20].decode("utf-8", "ignore") + " [cut]"


class Start(amp.Command):
    arguments = [
        (b"config", amp.Unicode()),
        (b"path", amp.Unicode()),
        (b"base", amp.Unicode()),
    ]
    response = []  # type: ignore[var-annotated]


class Queued(amp.Command):
    arguments = [
        (b"queue_id", amp.Unicode()),
        (b"envelope", amp.String(optional=True)),  # JSON, when it fits
        (b"offset", amp.Integer(optional=True)),  # where the message starts in its file
        (b"data", amp.String(optional=True)),  # the message, when it fits
    ]
    requiresAnswer = False


class Stop(amp.Command):
    arguments = []  # type: ignore[var-annotated]
    response = []  # type: ignore[var-annotated]


class LocalDeliveryFailed(Exception):
    """The server could not store the message; the text says why."""


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
    arguments = [
        (b"namespace", amp.Unicode()),
        (b"level", amp.Unicode()),
        (b"text", amp.Unicode()),
    ]
    requiresAnswer = False


class PipeTransport:
    """A child process's pipes as the transport of the server's AMP protocol."""

    disconnecting = False

    def __init__(self, process: Any) -> None:
        self.process = process

    def write(self, data: bytes) -> None:
        if not self.disconnecting:
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
