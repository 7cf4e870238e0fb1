"""
What SMTPUTF8 (RFC 6531) asks of the relay client: whether a message needs
it, which recipients cannot go to a next hop without it, and the envelope
paths as sent. Pure functions, apart from L{header_has_utf8}, which reads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.mail import smtp

from mailsrv.addresses.domains import DomainError, ascii_address, needs_smtputf8

HEADER_SCAN_MAX = 1024 * 1024  # a header longer than this is taken to hold UTF-8


@dataclass(frozen=True)
class Plan:
    """One transaction's use of SMTPUTF8."""

    utf8: bool  # send MAIL FROM:<...> SMTPUTF8 and UTF-8 paths
    refused: dict[str, str] = field(default_factory=dict)  # recipient -> why (status first)


def plan(
    sender: str, recipients: Sequence[str], utf8_header: bool, offered: bool, host: str
) -> Plan:
    """
    Whether to use SMTPUTF8 with a next hop C{host} that C{offered} it or
    not, and the recipients that cannot go there (RFC 6531 3.4: a message
    that needs it is never sent to a server without it; no downgrade here).
    A message needs it for a UTF-8 local part (its sender's, or a
    recipient's: that recipient alone) or for a C{utf8_header} received
    with SMTPUTF8; a U-label domain goes as A-labels (RFC 6531 3.2).
    """
    whole = needs_smtputf8(sender) or utf8_header
    needing = list(recipients) if whole else [a for a in recipients if needs_smtputf8(a)]
    if not needing:
        return Plan(False)
    if offered:
        return Plan(True)
    if needs_smtputf8(sender) or any(needs_smtputf8(a) for a in needing):
        # RFC 6531 3.7.4.1, X.6.7: non-ASCII addresses not permitted.
        status, what = "5.6.7", "a UTF-8 address"
    else:
        # X.6.9 (registered by RFC 6531): a UTF-8 header message cannot be transferred.
        status, what = "5.6.9", "a UTF-8 header"
    why = (
        f"{status} the next hop {host} does not support SMTPUTF8 (RFC 6531), "
        f"which this message needs for {what}"
    )
    return Plan(False, {a: why for a in needing})


@functools.lru_cache(maxsize=4096)
def _quoted(address: str) -> bytes:
    """C{smtp.quoteaddr}, memoised: its email.utils parse cost ~10 us per address per message."""
    return smtp.quoteaddr(address)


def path(address: str, utf8: bool) -> bytes:
    """
    C{<address>} as sent: UTF-8 in an SMTPUTF8 transaction, else with the
    domain as A-labels (RFC 6531 3.2).
    """
    if utf8:
        return b"<" + address.encode("utf-8") + b">"
    if not address.isascii():
        try:
            address = ascii_address(address)
        except DomainError:
            pass  # not IDNA2008: sent as it is, the server decides
        if not address.isascii():
            return b"<" + address.encode("utf-8") + b">"
    return _quoted(address)


def header_has_utf8(f: Any, start: int) -> bool:
    """
    Whether the header of the message in C{f} (from C{start}) holds
    non-ASCII bytes (RFC 6532); C{f} is left at C{start}. Blocking: read for
    a message received with SMTPUTF8 only.
    """
    f.seek(start)
    seen = b""
    try:
        while len(seen) < HEADER_SCAN_MAX:
            chunk = f.read(64 * 1024)
            if not chunk:
                return not seen.isascii()
            scan = seen[-3:] + chunk
            seen += chunk
            ends = [i for i in (scan.find(b"\n\n"), scan.find(b"\r\n\r\n")) if i >= 0]
            if ends:
                return not seen[: len(seen) - len(scan) + min(ends)].isascii()
        return True
    finally:
        f.seek(start)
