"""
Commands about the session rather than a mailbox: ID (RFC 2971), NOOP,
ENABLE (RFC 5161; UTF8=ACCEPT, RFC 6855; CONDSTORE and QRESYNC, RFC 7162;
IMAP4rev2, RFC 9051) and NAMESPACE (RFC 2342).
"""

from __future__ import annotations

from typing import Any

from mailsrv.imap import condstore, rev2, twistedcompat
from mailsrv.imap.commands.base import CommandBase, command

UTF8_ACCEPT = b"UTF8=ACCEPT"  # RFC 6855 3


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

    def do_ENABLE(self, tag: bytes, line: bytes | None) -> None:
        # RFC 5161 3.1: the ENABLED response names what this command enabled;
        # what is unknown (or cannot be enabled now) is left out, not refused.
        enabled = []
        highest = b""
        for name in (line or b"").upper().split():
            # RFC 6855 3: "ENABLE UTF8=ACCEPT" is only valid in the
            # authenticated state; once a mailbox is selected it is left out.
            if name == UTF8_ACCEPT and self.state == twistedcompat.AUTH:
                self.utf8_accept = self.utf8_names = True
                enabled.append(name)
            elif name == rev2.IMAP4REV2.upper() and rev2.IMAP4REV2 not in enabled:
                rev2.enable(self)  # RFC 9051 6.3.1
                enabled.append(rev2.IMAP4REV2)
            elif name in (condstore.CONDSTORE, condstore.QRESYNC) and name not in enabled:
                # RFC 7162 3.1 (an enabling command) and 3.2.3 (QRESYNC implies CONDSTORE)
                highest += condstore.enable(self)
                self.qresync = self.qresync or name == condstore.QRESYNC
                enabled.append(name)
        self.transport.write(highest)
        self.sendUntaggedResponse(b" ".join([b"ENABLED", *enabled]))
        self.sendPositiveResponse(tag, b"ENABLE completed")

    auth_ENABLE = (do_ENABLE, twistedcompat.arg_line)
    select_ENABLE = auth_ENABLE

    def do_NAMESPACE(self, tag: bytes) -> None:
        self.sendUntaggedResponse(b'NAMESPACE (("" "/")) NIL NIL')
        self.sendPositiveResponse(tag, b"NAMESPACE completed")

    auth_NAMESPACE = select_NAMESPACE = (do_NAMESPACE,)  # type: ignore[assignment]
