"""
Send-as on submission (RFC 6409 6.1, 8): a logged-in user may claim, as
envelope sender and in the C{From:} field, only the addresses that are its
own (L{mailsrv.routing.Router.owned_by}: the login address, and the aliases
that reach only that user). This module checks the C{From:} field of a
message being received; the envelope sender is checked at MAIL.
"""

from __future__ import annotations

import email.header
import email.utils
import re
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
        self._too_long = False

    def add(self, data: bytes) -> None:
        """A piece of the field: the text after C{From:}, or a folded line."""
        if self._value is None:
            self._value = bytearray()
        if len(self._value) + len(data) > MAX_FROM:
            self._too_long = True  # refused whole: a cut field could hide an address
            return
        self._value += data + b" "

    def check(self, router: routing.Router, user: str) -> Claim | None:
        """
        None when every address in the field is C{user}'s, else why not.
        Every address the field names counts: those it parses to, and any
        other address-like text in it, in comments, display names or
        encoded words (RFC 2047), where a reader's mail program would show
        it; a field longer than L{MAX_FROM} is refused.
        """
        if self._value is None:
            return None  # no From: field: nothing claimed
        if self._too_long:
            return Claim(replies.FROM_NOT_OWNED, "", f"From: field longer than {MAX_FROM} bytes")
        text = bytes(self._value).decode("utf-8", "replace")
        claimed = [a for _, a in email.utils.getaddresses([text]) if a]
        claimed += _address_like(text)
        for address in dict.fromkeys(claimed):
            try:
                owned = router.owned_by(address, user)
            except PasswordDatabaseError as e:
                return Claim(replies.LOCAL_ERROR, address, str(e))  # "try again"
            if not owned:
                return Claim(replies.FROM_NOT_OWNED, address, f"not an address of {user}")
        # What is left names no address at all (an empty group, RFC 6854).
        return None


# Text that a reader would take for an address: local@domain without the
# characters that delimit one in a header field.
_ADDRESS_LIKE = re.compile(r"[^\s<>()\[\],;:\"@\\]+@[^\s<>()\[\],;:\"@\\]+")


def _address_like(text: str) -> list[str]:
    """The address-like words of C{text}, raw and with its encoded words decoded."""
    texts = [text]
    try:
        texts.append(str(email.header.make_header(email.header.decode_header(text))))
    except Exception:  # an encoded word that does not decode: the raw text only
        pass
    return [m.rstrip(".") for t in texts for m in _ADDRESS_LIKE.findall(t)]
