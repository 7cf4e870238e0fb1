"""
A client of SpamAssassin's spamd, over the spamc protocol (SPAMC/1.5; see
spamd's C{PROTOCOL} file): one C{SYMBOLS} request per message, the message
streamed after its C{Content-length}; the answer's C{Spam:} field gives
the verdict (C{True ; score / required}) and its body the rules that hit.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.filter.verdict import (
    ACCEPT,
    JUNK,
    Envelope,
    FilterError,
    IFilter,
    Thresholds,
    Verdict,
    status_fields,
)


def request_head(size: int, user: str | None) -> bytes:
    """The request line and fields of a SYMBOLS request for a message of C{size} octets."""
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {size}\r\n"
    if user:
        head += f"User: {user}\r\n"
    return head.encode("ascii", "replace") + b"\r\n"


def parse_response(data: bytes) -> tuple[bool, float, float, list[str]]:
    """
    (spam, score, required, rules) from a whole spamd answer; L{FilterError}
    when it is not one (a protocol error, or spamd's own error code).
    """
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith(b"SPAMD/"):
        raise FilterError(f"not a spamd answer: {lines[0][:80]!r}")
    if status[1] != b"0":  # EX_OK; else a sysexits code (spamd PROTOCOL)
        raise FilterError(f"spamd error: {b' '.join(status[1:])[:80]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"spam":
            # Spam: True ; 15.0 / 5.0
            flag, _, scores = value.partition(b";")
            score, _, required = scores.partition(b"/")
            try:
                rules = [r for r in body.decode("ascii", "replace").strip().split(",") if r]
                return (
                    flag.strip().lower() in (b"true", b"yes"),
                    float(score),
                    float(required),
                    rules,
                )
            except ValueError:
                raise FilterError(f"bad Spam field: {value[:80]!r}")
    raise FilterError("spamd answer without a Spam field")


class SpamcProtocol(protocol.Protocol):
    """One spamc request: sends the message, collects the answer until spamd closes."""

    def __init__(self, source: Any, user: str | None) -> None:
        self.source = source
        self.user = user
        self.done: defer.Deferred = defer.Deferred()
        self._data: list[bytes] = []
        self._file: Any = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(request_head(self.source.size, self.user))
        self._file = self.source.open()
        FileSender().beginFileTransfer(self._file, transport).addErrback(lambda f: None)

    def dataReceived(self, data: bytes) -> None:
        self._data.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._file is not None:
            self._file.close()
        if self.done.called:
            return
        data = b"".join(self._data)
        try:
            self.done.callback(parse_response(data))
        except FilterError:
            self.done.errback()


@implementer(IFilter)
class SpamdFilter:
    """The spam filter step with SpamAssassin's spamd at C{host}:C{port}."""

    def __init__(self, reactor: Any, host: str, port: int, thresholds: Thresholds) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.thresholds = thresholds

    def check(self, message_source: Any, envelope: Envelope) -> defer.Deferred:
        """Scan the message; fires with a L{Verdict}; cancelling drops the connection."""
        proto = SpamcProtocol(message_source, envelope.user)
        connecting: Any = TCP4ClientEndpoint(self.reactor, self.host, self.port).connect(
            _Once(proto)
        )
        state: dict[str, Any] = {}

        def connected(p: SpamcProtocol) -> defer.Deferred:
            state["proto"] = p
            return p.done

        def cancel(d: defer.Deferred) -> None:
            connecting.cancel()
            p = state.get("proto")
            if p is not None and p.transport is not None:
                p.transport.abortConnection()

        result: defer.Deferred = defer.Deferred(cancel)
        connecting.addCallback(connected)
        connecting.addCallbacks(self._verdict, _unreachable)
        connecting.chainDeferred(result)
        return result

    def _verdict(self, answer: tuple[bool, float, float, list[str]]) -> Verdict:
        spam, score, required, rules = answer
        action = self.thresholds.action(score, JUNK if spam else ACCEPT)
        return Verdict(
            action,
            status_fields(action != ACCEPT, score, required, rules),
            reason="Message rejected as spam",
            score=score,
        )


class _Once(protocol.Factory):
    """A factory that builds the one protocol it was given."""

    def __init__(self, proto: protocol.Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.proto


def _unreachable(failure: Failure) -> Failure:
    if failure.check(FilterError, defer.CancelledError):
        return failure
    raise FilterError(f"spamd: {failure.getErrorMessage()}")
