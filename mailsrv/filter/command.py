"""
An external filter command: the message on its standard input, the
envelope in its environment, its exit code the verdict, as sendmail's and
procmail's exit codes are read (sysexits.h):

  0   accept           1   junk (filed into Junk)
  2   reject (550 5.7.1; the first line of standard error is the reason)
  75  defer (EX_TEMPFAIL: 451 4.7.1)
  any other code, a signal, or a timeout: the filter failed (C{on_failure}).

The header fields it prints on standard output (C{Name: value} lines) are
added to the message, after accept or junk.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.filter.verdict import (
    ACCEPT,
    DEFER,
    JUNK,
    REJECT,
    Envelope,
    FilterError,
    IFilter,
    Verdict,
    header_field,
)

EXIT_CODES = {0: ACCEPT, 1: JUNK, 2: REJECT, 75: DEFER}
_MAX_OUTPUT = 64 * 1024
# RFC 5322 2.2: a field name is printable ASCII but ':'.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):[ \t]*(.*)")


def output_fields(stdout: bytes) -> bytes:
    """The header fields among C{stdout}'s lines, each on one line."""
    fields = b""
    for line in stdout.splitlines():
        m = _FIELD.fullmatch(line.rstrip(b"\r"))
        if m:
            fields += header_field(m[1].decode("ascii"), m[2].decode("utf-8", "replace"))
    return fields


def verdict(code: int, stdout: bytes, stderr: bytes) -> Verdict:
    """The verdict for an exit code and what the command printed."""
    action = EXIT_CODES.get(code)
    if action is None:
        raise FilterError(f"filter command exited with {code}")
    reason = stderr.decode("utf-8", "replace").strip().partition("\n")[0]
    return Verdict(action, output_fields(stdout), reason=reason)


class FilterProcess(protocol.ProcessProtocol):
    """One run of the filter command: the message in, its output and exit code out."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.done: defer.Deferred = defer.Deferred(self._cancel)
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._size = 0
        self._file: Any = None

    def connectionMade(self) -> None:
        self._file = self.source.open()
        d = FileSender().beginFileTransfer(self._file, self.transport)
        d.addBoth(self._sent)

    def _sent(self, result: Any) -> None:
        self._file.close()
        transport: Any = self.transport
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._keep(self._out, data)

    def errReceived(self, data: bytes) -> None:
        self._keep(self._err, data)

    def _keep(self, into: list[bytes], data: bytes) -> None:
        if self._size < _MAX_OUTPUT:
            into.append(data)
            self._size += len(data)

    def processEnded(self, reason: Failure) -> None:
        if self.done.called:
            return
        code = reason.value.exitCode if isinstance(reason.value, error.ProcessTerminated) else 0
        if code is None:
            self.done.errback(
                FilterError(
                    f"filter command killed by signal {getattr(reason.value, 'signal', None)}"
                )
            )
            return
        try:
            self.done.callback(verdict(code, b"".join(self._out), b"".join(self._err)))
        except FilterError:
            self.done.errback()

    def _cancel(self, d: defer.Deferred) -> None:
        try:
            transport: Any = self.transport
            transport.signalProcess("KILL")
        except (error.ProcessExitedAlready, AttributeError):
            pass


@implementer(IFilter)
class CommandFilter:
    """The spam filter step as an external command (C{argv}), see the module docstring."""

    def __init__(self, reactor: Any, argv: tuple[str, ...]) -> None:
        self.reactor = reactor
        self.argv = argv

    def check(self, message_source: Any, envelope: Envelope) -> defer.Deferred:
        """Run the command on the message; cancelling kills it."""
        proc = FilterProcess(message_source)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "SENDER": envelope.sender,
            "RECIPIENTS": " ".join(envelope.recipients),
            "CLIENT_IP": envelope.client_ip,
            "QUEUE_ID": envelope.queue_id,
        }
        if envelope.user:
            env["USER_NAME"] = envelope.user
        try:
            self.reactor.spawnProcess(proc, self.argv[0], list(self.argv), env=env)
        except OSError as e:
            return defer.fail(FilterError(f"cannot run {self.argv[0]}: {e}"))
        return proc.done
