"""
The line Postfix's smtpd writes when it refuses MAIL or RCPT before any
policy check (a C{SIZE=} over the limit, an address or argument it cannot
parse), in its shape (smtpd.c, log_whatsup()):

    NOQUEUE: reject: MAIL from NAME[IP]: 552 5.3.4 Message size exceeds
    fixed limit; proto=ESMTP helo=<client.example>

(C{from=<...>} before C{proto=} once a sender is given). The event carries
a C{reason} field (C{size}, C{syntax}) that the metrics count as a refusal
(L{mailsrv.metrics.events}).
"""

from __future__ import annotations

from mailsrv import replies
from mailsrv.logsafe import SafeLogger
from mailsrv.replies import Reply
from mailsrv.smtp.address import AddressError, NonASCIIAddressError
from mailsrv.smtp.sessionlog import SessionLog

NOQUEUE_REJECT = (
    "NOQUEUE: reject: {where} from {client_name}[{client}]: {reply};{envelope} "
    "proto={proto} helo=<{helo}>"
)

log = SafeLogger()


def syntax_refusal(error: Exception, where: str) -> Reply:
    """The reply to a C{MAIL} or C{RCPT} argument that failed to parse with C{error}."""
    sender = where == "MAIL"
    if isinstance(error, NonASCIIAddressError):  # RFC 6531 3.7.4.1: UTF-8 without SMTPUTF8
        return replies.NON_ASCII_SENDER if sender else replies.NON_ASCII_RECIPIENT
    if isinstance(error, AddressError):  # RFC 3463 3.2: 5.1.7, 5.1.3
        return replies.BAD_SENDER_SYNTAX if sender else replies.BAD_DESTINATION_SYNTAX
    return replies.BAD_ARGUMENTS


def reason(reply: Reply) -> str:
    """The metrics' reason for a refusal before the checks: C{size} or C{syntax}."""
    return "size" if reply == replies.MESSAGE_TOO_BIG else "syntax"  # RFC 1870 6: 552


def log_rejected(
    session: SessionLog,
    where: str,
    reply: Reply,
    sender: str | None,
    helo: str | None,
    esmtp: bool,
) -> None:
    """Log that C{reply} refused the C{where} command (C{MAIL}, C{RCPT})."""
    log.info(
        NOQUEUE_REJECT,
        where=where,
        client_name=session.client_name,
        client=session.client,
        reply=str(reply),
        envelope="" if sender is None else f" from=<{sender}>",
        proto="ESMTP" if esmtp else "SMTP",
        helo=helo or "",
        reason=reason(reply),
    )
