"""
Send-as on submission (RFC 6409 6.1, 8): a logged-in user may claim, as
envelope sender and in the C{From:} field, only the addresses that are its
own (L{mailsrv.routing.Router.owned_by}: the login address, and the aliases
that reach only that user). This module checks the C{From:} field of a
message being received; the envelope sender is checked at MAIL.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass

from mailsrv import replies, routing
from mailsrv.interfaces import PasswordDatabaseError
from mailsrv.replies import Reply

# How much of a From: field is kept for the check.
MAX_FROM = 16 * 1024


@dataclass(frozen=True, slots=True)
class Claim:
    """Why a C{From:} field is refused: the client's C{reply}, and for the log."""

    reply: Reply
    address: str
    cause: str


class FromField:
    """The C{From:} field(s) of a message being received, as its lines arrive."""

    def __init__(self) -> None:
        self._value: bytearray | None = None

    def add(self, data: bytes) -> None:
        """A piece of the field: the text after C{From:}, or a folded line."""
        if self._value is None:
            self._value = bytearray()
        if len(self._value) < MAX_FROM:
            self._value += data + b" "

    def check(self, router: routing.Router, user: str) -> Claim | None:
        """None when every address in the field is C{user}'s, else why not."""
        if self._value is None:
            return None  # no From: field: nothing claimed
        text = bytes(self._value).decode("utf-8", "replace")
        # A group with no address, or nothing parseable, claims nothing.
        for _, address in email.utils.getaddresses([text]):
            if not address:
                continue
            try:
                owned = router.owned_by(address, user)
            except PasswordDatabaseError as e:
                return Claim(replies.LOCAL_ERROR, address, str(e))  # "try again"
            if not owned:
                return Claim(replies.FROM_NOT_OWNED, address, f"not an address of {user}")
        return None
