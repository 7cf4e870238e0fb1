"""
IDLE (RFC 2177): the session waits for DONE while changes made by others
(new mail, flags, expunges) are sent to it as they happen.
"""

from __future__ import annotations

from mailsrv.imap import twistedcompat
from mailsrv.imap.commands.base import CommandBase


class IdleCommand(CommandBase):
    """IDLE, and the DONE that ends it."""

    def do_IDLE(self, tag: bytes) -> None:
        # RFC 2177
        self._idle_tag = tag
        self.parseState = "idle"
        self.sendContinuationRequest(b"idling")
        self.setTimeout(self.factory.config.imap.idle_timeout)
        if self.mbox is not None:
            self._start_sync()

    def parse_idle(self, line: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        self.parseState = twistedcompat.PARSE_COMMAND
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        if line.strip().upper() == b"DONE":
            self.sendPositiveResponse(tag, b"IDLE terminated")
        else:
            self.sendBadResponse(tag, b"Expected DONE")

    auth_IDLE = select_IDLE = (do_IDLE,)  # type: ignore[assignment]
