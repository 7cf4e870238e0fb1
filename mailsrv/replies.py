"""
SMTP reply codes with their RFC 3463 enhanced status codes, and the error
type that carries them to the client.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.mail import smtp


@dataclass(frozen=True)
class Reply:
    """A reply a client sees: code, enhanced code, short public text."""

    code: int
    enhanced: str
    text: str

    def line(self, text: str | None = None) -> bytes:
        return f"{self.enhanced} {text or self.text}".encode()

    @property
    def permanent(self) -> bool:
        return self.code >= 500


# RFC 3463 3.x, with RFC 5321 4.2 codes
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
QUEUED = Reply(250, "2.0.0", "Message accepted")
DATA_START = Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>")

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
MAILBOX_BUSY = Reply(450, "4.2.0", "Mailbox busy, try again later")
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
AUTH_TEMP_FAIL = Reply(454, "4.7.0", "Temporary authentication failure")

SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
BAD_ARGUMENTS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
BAD_PARAMETER = Reply(555, "5.5.4", "MAIL FROM/RCPT TO parameter not recognized")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
BAD_DESTINATION_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops, mail loop detected")
TRANSACTION_FAILED = Reply(554, "5.0.0", "Transaction failed")
# RFC 5321 2.3.8: CR and LF only as CRLF. A bare one can end DATA early at a
# lenient next hop and smuggle a second message (like Postfix's
# smtpd_forbid_bare_newline = reject).
BARE_NEWLINE = Reply(550, "5.6.0", "Message contains a bare CR or LF")


class SMTPReplyError(smtp.SMTPServerError):
    """
    Raised from delivery code to send C{reply} to the client. The C{cause} is
    for the log only and never reaches the client.
    """

    def __init__(self, reply: Reply, text: str | None = None, cause: str | None = None) -> None:
        self.reply = reply
        self.cause = cause
        message = reply.line(text).decode()
        super().__init__(reply.code, message)
