"""
How the SMTP server reads its client: lines split by the server itself, one
command at a time (RFC 2920 3.1: replies in order), reading paused while the
client does not read the replies, the DATA fast path, and the bounds on a
line. A mixin of L{mailsrv.smtp.server.SMTPServer}, which it serves as the
transport's producer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailsrv import replies

COMMAND, DATA, AUTH = smtp.COMMAND, smtp.DATA, smtp.AUTH

# RFC 4954 4: AUTH lines may be up to 12288 octets.
MAX_AUTH_LINE = 12288
# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF. Real
# senders exceed it (long HTML lines); like Postfix, such mail is taken, but
# stored unchanged rather than split. Only a line past this bound, which no
# mail program writes, refuses the message: it keeps a session's buffer bounded.
MAX_TEXT_LINE = 998
MAX_DATA_LINE = 1024 * 1024
# Input held while a command's reply is pending, before reading pauses.
MAX_PENDING = 64 * 1024


class LineReader:
    """
    The input side of an SMTP session: the session supplies the replies,
    the command dispatch (C{_command}), the end of DATA and the AUTH steps.
    """

    log: Any
    transport: Any
    mode: Any
    timeout: Any
    _buffer: bytes
    _pos: int
    _discarding: bool
    _draining: bool
    _waiting: bool
    _paused_transport: bool
    _write_blocked: bool
    _lost: bool
    _shutting_down: bool
    _message: Any
    _auth_step: Any
    resetTimeout: Callable[[], None]
    setTimeout: Callable[[Any], Any]
    _reply: Callable[..., None]
    _command: Callable[[bytes], None]
    _auth_line: Callable[[bytes], None]
    _end_data: Callable[[], None]
    _goodbye: Callable[[], None]

    def dataReceived(self, data: bytes) -> None:
        # No resetTimeout here: a line that trickles in a byte at a time must
        # not keep the session alive. The timer restarts at each whole line.
        if self._pos:
            self._buffer = self._buffer[self._pos :]
            self._pos = 0
        self._buffer += data
        if not self._draining:
            self._drain()

    def _line_limit(self) -> int:
        return MAX_DATA_LINE if self.mode == DATA else MAX_AUTH_LINE

    def _drain(self) -> None:
        self._draining = True
        try:
            while not (self._waiting or self._write_blocked or self.transport.disconnecting):
                if self.mode == DATA and self._data_block():
                    continue
                end = self._buffer.find(b"\r\n", self._pos)
                limit = self._line_limit()
                if end < 0:
                    if len(self._buffer) - self._pos > limit:
                        # An over-long line: drop it as it comes; keep a CR
                        # that may start the CRLF.
                        self._discarding = True
                        tail = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
                        self._buffer, self._pos = tail, 0
                    break
                line = self._buffer[self._pos : end]
                self._pos = end + 2
                self.resetTimeout()
                if self._discarding or len(line) > limit:
                    self._discarding = False
                    self._line_too_long()
                else:
                    self._line(line)
        finally:
            self._draining = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Read from the socket only while there is room for what it brings."""
        pending = len(self._buffer) - self._pos
        # Not at once when writes block: a TLS layer still has to read its
        # handshake before it sends what it holds.
        pause = pending > MAX_PENDING and (self._waiting or self._write_blocked)
        if pause != self._paused_transport and not self._lost:
            self._paused_transport = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # IPushProducer, for the transport: our replies fill / leave its buffer

    def pauseProducing(self) -> None:
        self._write_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._update_reading()
        if not self._draining and not self._lost:
            self._drain()

    def stopProducing(self) -> None:
        pass

    def _data_block(self) -> bool:
        """
        Take the complete body lines in the buffer at once (the fast path
        for DATA); False when the line-by-line path must handle what is
        there: headers, the final dot, an over-long line, a partial line.
        """
        message = self._message
        if message is None or message.in_headers or self._discarding:
            return False
        buf, pos = self._buffer, self._pos
        if buf.startswith(b".\r\n", pos):
            return False
        end = buf.find(b"\r\n.\r\n", pos)
        end = buf.rfind(b"\r\n", pos) if end < 0 else end
        if end <= pos:
            return False
        block = buf[pos : end + 2]
        if len(block) > MAX_DATA_LINE and max(map(len, block.split(b"\r\n"))) > MAX_DATA_LINE:
            return False
        self.resetTimeout()
        self._pos = end + 2
        octets = len(block)
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
            message.fail(replies.BARE_NEWLINE)
        if block[:1] == b".":
            block = block[1:]
        block = block.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n")  # RFC 5321 4.5.2
        message.body_received(block, octets)
        return True

    def _line(self, line: bytes) -> None:
        if self.mode == DATA:
            if line[:1] == b".":
                if line == b".":
                    self._end_data()
                    return
                line = line[1:]  # RFC 5321 4.5.2
            message = self._message
            assert message is not None
            if b"\r" in line or b"\n" in line:
                message.fail(replies.BARE_NEWLINE)
            message.lineReceived(line)
        elif self.mode == AUTH:
            self._auth_line(line)
        else:
            self._command(line)

    def _line_too_long(self) -> None:
        if self.mode == DATA:
            if self._message is not None:
                self._message.fail(replies.LINE_TOO_LONG)  # answered after the dot
            return
        self.mode = COMMAND
        self._auth_step = None
        self._reply(replies.LINE_TOO_LONG)

    def _wait(self, d: defer.Deferred) -> None:
        """Read no further command until C{d} has fired (RFC 2920 3.1: in order)."""
        self._waiting = True
        self.setTimeout(None)

        def done(result: Any) -> None:
            self._waiting = False
            if isinstance(result, Failure):
                self.log.failure("unexpected error in SMTP session", failure=result)
            if self._lost:
                return
            if self._shutting_down:
                self._goodbye()
                return
            if not self.transport.disconnecting:
                self.setTimeout(self.timeout)
            if not self._draining:
                self._drain()

        d.addBoth(done)
