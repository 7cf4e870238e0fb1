"""
Trace and origination headers written at delivery: C{Return-Path:},
C{Received:} (RFC 5321 4.4), and the C{Date:} and C{Message-ID:} that
submission adds when a client left them out (RFC 6409 8.2, 8.3).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from mailsrv.outbound.envelope import new_queue_id as _queue_id


def new_queue_id(now: float) -> str:
    """
    The id that finds a message in the log, from intake to its last delivery:
    the outbound queue's (microseconds and a counter, in hex), so the first
    queued copy keeps it (L{mailsrv.outbound.envelope.new_queue_id}).
    """
    return _queue_id(now)


_last_date: tuple[int, str] = (-1, "")


def rfc5322_date(now: float) -> str:
    """The date-time of RFC 5322 3.3, in UTC (to the second; the last one is kept)."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        _last_date = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _last_date[1]


def message_id(now: float, hostname: str) -> str:
    """A new C{<...@hostname>} Message-ID (RFC 5322 3.6.4)."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    return f"<{stamp}.{os.getpid()}.{secrets.token_hex(8)}@{hostname}>"


def _clean(text: str, limit: int = 255) -> str:
    """Printable ASCII without the characters that would break the header's comments."""
    out = "".join(c if 32 < ord(c) < 127 and c not in "()\\" else "?" for c in text)
    return out[:limit] or "unknown"


@functools.lru_cache(maxsize=1024)
def address_literal(ip: str) -> str:
    """RFC 5321 4.1.3 address literal: C{[192.0.2.1]} or C{[IPv6:2001:db8::1]}."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return f"[{_clean(ip)}]"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"[{addr.ipv4_mapped}]"  # an IPv4 client of a dual-stack listener
    if addr.version == 6:
        return f"[IPv6:{addr.compressed}]"
    return f"[{addr}]"


def with_protocol(esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool = False) -> str:
    """
    The C{with} keyword of RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA;
    UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA for a transaction with
    SMTPUTF8 (RFC 6531 3.7.3).
    """
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(
    *,
    helo: str,
    client_ip: str,
    client_name: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls_info: str | None,
    now: float,
) -> bytes:
    """
    Return a C{Received:} field, folded, with LF line ends (RFC 5321 4.4).
    C{recipient} is named only for a single-recipient message, as Postfix
    does, so that Bcc recipients stay hidden.
    """
    lines = [
        f"Received: from {_clean(helo)} ({_clean(client_name or 'unknown')} {address_literal(client_ip)})"
    ]
    if tls_info:
        lines.append(f"\t({tls_info})")
    lines.append(f"\tby {hostname} (mailsrv) with {protocol} id {queue_id}")
    date = rfc5322_date(now)
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    # UTF-8 only in a UTF-8 address, which only SMTPUTF8 lets in (RFC 6532 3.7).
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


def return_path(sender: str) -> bytes:
    """
    The C{Return-Path:} field added at final delivery (RFC 5321 4.4); a UTF-8
    sender (received with SMTPUTF8) stays UTF-8 (RFC 6532 3.7).
    """
    return f"Return-Path: <{sender}>\n".encode("utf-8", "replace")


def tls_description(transport) -> str | None:
    """
    Postfix's C{using TLSv1.3 with cipher X (256/256 bits)} for a TLS
    connection, or None when the transport is not encrypted or does not say.
    """
    try:
        conn = transport.getHandle()
        version = conn.get_protocol_version_name()
        cipher = conn.get_cipher_name()
        bits = conn.get_cipher_bits()
    except Exception:
        return None
    if not version or not cipher:
        return None
    return f"using {version} with cipher {cipher} ({bits}/{bits} bits)"
