"""
Delivery status notifications: the RFC 3464 report sent from <> to the
envelope sender when recipients fail for good or are delayed. When the
sender or a recipient has a UTF-8 address (received with SMTPUTF8), the
report is the international one of RFC 6533: message/global-delivery-status
with C{utf-8} address types, and UTF-8 in its header fields (RFC 6532).
"""

from __future__ import annotations

import email.utils
import io
from collections.abc import Iterable, Sequence
from email.generator import BytesGenerator
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32

from mailsrv.outbound.envelope import Envelope, Recipient

FAILED = "failed"
DELAYED = "delayed"
HEADERS_LIMIT = 64 * 1024


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False, usegmt=True)


def read_headers(f: Iterable[bytes], limit: int = HEADERS_LIMIT) -> bytes:
    """The header block of a message file (LF), up to the blank line, at most C{limit} bytes."""
    out = []
    total = 0
    for line in f:
        if line in (b"\n", b"\r\n"):
            break
        out.append(line)
        total += len(line)
        if total >= limit:
            break
    return b"".join(out)


def _human_text(
    hostname: str,
    action: str,
    envelope: Envelope,
    rcpts: Sequence[Recipient],
    retry_until: float | None,
) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action == FAILED:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. Its headers are attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report.",
        ]
    else:
        until = "" if retry_until is None else f" until {_date(retry_until)}"
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered for some time to one or more",
            f"recipients. The mail system will keep trying{until}.",
        ]
    lines += ["", "                   The mail system", ""]
    for r in rcpts:
        if r.remote:
            lines.append(f"<{r.address}>: host {r.remote} said: {r.reply}")
        else:
            lines.append(f"<{r.address}>: {r.reply}")
        lines.append("")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _raw(text: str) -> str:
    """
    C{text} to be written as raw UTF-8 in a header field (RFC 6532 3.2), not
    as an RFC 2047 encoded-word, which has no place in an address: the
    compat32 generator writes surrogate-escaped bytes back as they were.
    """
    return text.encode("utf-8").decode("ascii", "surrogateescape")


class _Generator(BytesGenerator):
    """
    The stdlib's generator, which knows message/delivery-status but not
    RFC 6533's message/global-delivery-status: that part's text (UTF-8,
    surrogate-escaped) is written as it is.
    """

    def _handle_message_global_delivery_status(self, msg: Message) -> None:
        raw = msg.get_payload(decode=True)  # the bytes, as set (8bit: not decoded)
        assert isinstance(raw, bytes)
        self.write(raw.decode("ascii", "surrogateescape"))


def _block_text(block: Message) -> str:
    """One block of fields as text (surrogate-escaped UTF-8 kept), with its blank line."""
    return "".join(f"{name}: {value}\n" for name, value in block.raw_items())


def is_international(envelope: Envelope, recipients: Sequence[Recipient]) -> bool:
    """Whether the DSN names a UTF-8 address, and so is an RFC 6533 one."""
    return not envelope.sender.isascii() or not all(r.address.isascii() for r in recipients)


def _recipient_block(r: Recipient, action: str, retry_until: float | None) -> Message:
    block = Message()
    if r.address.isascii():
        block["Final-Recipient"] = f"rfc822; {_one_line(r.address)}"
    else:
        # RFC 6533 3: the utf-8 address type, as UTF-8 in a global DSN.
        block["Final-Recipient"] = _raw(f"utf-8; {_one_line(r.address)}")
    block["Action"] = action
    status = r.status or ("5.0.0" if action == FAILED else "4.0.0")
    block["Status"] = status
    if r.remote:
        block["Remote-MTA"] = f"dns; {_one_line(r.remote)}"
        if r.reply:
            block["Diagnostic-Code"] = f"smtp; {_one_line(r.reply)}"
    elif r.reply:
        block["Diagnostic-Code"] = f"X-mailsrv; {_one_line(r.reply)}"
    if r.last_attempt:
        block["Last-Attempt-Date"] = _date(r.last_attempt)
    if action == DELAYED and retry_until is not None:
        block["Will-Retry-Until"] = _date(retry_until)  # RFC 3464 2.3.9
    return block


def build_dsn(
    *,
    hostname: str,
    envelope: Envelope,
    recipients: Sequence[Recipient],
    action: str,
    original_headers: bytes,
    now: float,
    retry_until: float | None = None,
) -> bytes:
    """
    The DSN for C{recipients} of C{envelope} as bytes with LF line ends:
    multipart/report; report-type=delivery-status (RFC 3464, RFC 6522) with
    a human-readable part, the message/delivery-status part and the original
    headers as text/rfc822-headers.
    """
    if action not in (FAILED, DELAYED):
        raise ValueError(f"unknown DSN action {action!r}")
    international = is_international(envelope, recipients)
    # RFC 6533 6.2: message/global-delivery-status, named by the report type.
    kind = "global-delivery-status" if international else "delivery-status"
    report = MIMEMultipart("report", report_type=kind)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = _raw(envelope.sender)
    if action == FAILED:
        report["Subject"] = "Undelivered Mail Returned to Sender"
    else:
        report["Subject"] = "Delayed Mail (still being retried)"
    report["Date"] = _date(now)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 5
    report.preamble = "This is a MIME-encapsulated message."

    text = _human_text(hostname, action, envelope, recipients, retry_until)
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))

    # RFC 3464 2.2: per-message fields, then one block per recipient.
    status = MIMEBase("message", kind)
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Queue-ID"] = envelope.id
    per_message["Arrival-Date"] = _date(envelope.created)
    blocks: list[Message | str] = [per_message]
    blocks += [_recipient_block(r, action, retry_until) for r in recipients]
    if international:
        # The generator knows message/delivery-status only: the blocks as text.
        status.set_payload("\n".join(_block_text(b) for b in blocks if isinstance(b, Message)))
        status["Content-Transfer-Encoding"] = "8bit"  # RFC 6533 6.2
    else:
        status.set_payload(blocks)
    report.attach(status)

    headers = MIMEBase("text", "rfc822-headers")
    headers_text = original_headers.decode("utf-8", "replace").replace("\r\n", "\n")
    if headers_text.isascii():
        headers.set_payload(headers_text)
        headers["Content-Transfer-Encoding"] = "7bit"
    else:
        headers.set_payload(headers_text.encode("utf-8"))
        headers.set_param("charset", "utf-8")
        headers["Content-Transfer-Encoding"] = "8bit"
    report.attach(headers)

    out = io.BytesIO()
    _Generator(
        out, mangle_from_=False, policy=compat32.clone(linesep="\n", max_line_length=None)
    ).flatten(report)
    return out.getvalue()
