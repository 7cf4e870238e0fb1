"""
Commands about the session rather than a mailbox: ID (RFC 2971), NOOP,
ENABLE (RFC 5161) and NAMESPACE (RFC 2342).
"""

from __future__ import annotations

from typing import Any

from mailsrv.imap import twistedcompat
from mailsrv.imap.commands.base import CommandBase, command


class GeneralCommands(CommandBase):
    """ID, NOOP, ENABLE, NAMESPACE."""

    # --- any state ------------------------------------------------------------

    def do_ID(self, tag: bytes, line: bytes) -> None:
        self.sendUntaggedResponse(b'ID ("name" "mailsrv" "vendor" "mailsrv")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = (do_ID, twistedcompat.arg_line)
    auth_ID = select_ID = unauth_ID

    def do_NOOP(self, tag: bytes) -> None:
        self._noop(tag)

    @command
    def _noop(self, tag: bytes) -> Any:
        if self.mbox is not None:
            yield self._sync()
        self.sendPositiveResponse(tag, b"NOOP completed")

    unauth_NOOP = auth_NOOP = select_NOOP = (do_NOOP,)  # type: ignore[assignment]

    # --- authenticated --------------------------------------------------------

    def do_ENABLE(self, tag: bytes, line: bytes) -> None:
        # RFC 5161: nothing we offer needs enabling; say so.
        self.sendUntaggedResponse(b"ENABLED")
        self.sendPositiveResponse(tag, b"ENABLE completed")

    auth_ENABLE = (do_ENABLE, twistedcompat.arg_line)
    select_ENABLE = auth_ENABLE

    def do_NAMESPACE(self, tag: bytes) -> None:
        self.sendUntaggedResponse(b'NAMESPACE (("" "/")) NIL NIL')
        self.sendPositiveResponse(tag, b"NAMESPACE completed")

    auth_NAMESPACE = select_NAMESPACE = (do_NAMESPACE,)  # type: ignore[assignment]
