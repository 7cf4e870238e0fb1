"""
What an SMTP client is told: the one reply type (code, RFC 3463 enhanced
code, short public text), the named replies the server sends, and the one
error type that carries a reply to the client while keeping the cause of the
failure apart, for the log only (as maddy's C{exterrors.SMTPError} and mox's
C{smtpserver} errors do).

Each constant names the RFC 5321 section its code comes from (or the
section of the RFC that defines the command: RFC 3207 STARTTLS, RFC 4954
AUTH) and the RFC 3463 section (or the RFC that registered it) of its
enhanced code. The
enhanced code goes first in the reply text (RFC 2034 3).
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
        """The reply's text as sent after the code: enhanced code, then text."""
        return f"{self.enhanced} {text or self.text}".encode()

    @property
    def permanent(self) -> bool:
        """5yz: never try again (RFC 5321 4.2.1)."""
        return self.code >= 500

    @property
    def temporary(self) -> bool:
        """4yz: try again later (RFC 5321 4.2.1)."""
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.line().decode()}"


# --- 2yz, 3yz: RFC 5321 4.2.2 ---------------------------------------------------
# 250 (RFC 5321 4.2.2), 2.0.0 other (RFC 3463 3.1)
OK = Reply(250, "2.0.0", "OK")
# 250 (RFC 5321 4.2.2), 2.1.0 other address status: the sender (RFC 3463 3.2)
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
# 250 (RFC 5321 4.2.2), 2.1.5 destination address valid (RFC 3463 3.2)
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
# 250 (RFC 5321 4.2.2) after DATA (4.3.2), 2.0.0 (RFC 3463 3.1)
QUEUED = Reply(250, "2.0.0", "Message accepted")
# 354 (RFC 5321 4.2.2, 4.3.2): an intermediate reply has no enhanced code (RFC 2034 3)
DATA_START = Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>")

# --- 4yz: try again ---------------------------------------------------------------
# 421 (RFC 5321 3.8, 4.2.2), 4.3.2 system not accepting network messages (RFC 3463 3.4)
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
# 421 (RFC 5321 3.8, 4.2.2), 4.7.0 other security or policy status (RFC 3463 3.8)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
# 421 (RFC 5321 4.5.3.2: timeouts), 4.4.2 bad connection (RFC 3463 3.5)
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
# 451 local error in processing (RFC 5321 4.2.2), 4.3.0 other mail system status (RFC 3463 3.4)
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
# 451 (RFC 5321 4.2.2), 4.3.0 (RFC 3463 3.4): submission with no outbound queue to relay through
RELAY_UNAVAILABLE = Reply(451, "4.3.0", "Relaying is not available, try again later")
# 450 mailbox unavailable, e.g. busy (RFC 5321 4.2.2), 4.2.0 other mailbox status (RFC 3463 3.3)
MAILBOX_BUSY = Reply(450, "4.2.0", "Mailbox busy, try again later")
# 452 insufficient system storage (RFC 5321 4.2.2), 4.3.1 mail system full (RFC 3463 3.4)
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
# 452 (RFC 5321 4.2.2), 4.2.2 mailbox full (RFC 3463 3.3): a user over quota (Postfix, Dovecot)
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")
# 452 (RFC 5321 4.5.3.1.10), 4.5.3 too many recipients (RFC 3463 3.6)
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
# 454 (RFC 4954 6), 4.7.0 (RFC 3463 3.8; RFC 4954 6)
AUTH_TEMP_FAIL = Reply(454, "4.7.0", "Temporary authentication failure")

# --- 5yz: never -------------------------------------------------------------------
# 500 syntax error, command unrecognized (RFC 5321 4.2.2), 5.5.2 syntax error (RFC 3463 3.6)
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
# 500 command line too long (RFC 5321 4.2.2, 4.5.3.1.4), 5.5.6 (registered by RFC 4954 6
# for an over-long AUTH line)
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
# 501 syntax error in parameters (RFC 5321 4.2.2), 5.5.4 invalid command arguments (RFC 3463 3.6)
BAD_ARGUMENTS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
# 503 bad sequence of commands (RFC 5321 4.2.2), 5.5.1 invalid command (RFC 3463 3.6)
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
# 555 parameters not recognized (RFC 5321 4.2.2, 3.3), 5.5.4 invalid command arguments
# (RFC 3463 3.6)
BAD_PARAMETER = Reply(555, "5.5.4", "MAIL FROM/RCPT TO parameter not recognized")
# 530 and 5.7.0 (RFC 4954 6)
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
# 538 and 5.7.11 (RFC 4954 6)
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
# 535 and 5.7.8 (RFC 4954 6)
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
# 550 mailbox unavailable (RFC 5321 4.2.2, 3.3), 5.1.1 bad destination mailbox address
# (RFC 3463 3.2)
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
# 501 (RFC 5321 4.2.2), 5.1.3 bad destination mailbox address syntax (RFC 3463 3.2)
BAD_DESTINATION_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
# 501 (RFC 5321 4.2.2), 5.1.7 bad sender's mailbox address syntax (RFC 3463 3.2)
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
# 553 mailbox name not allowed (RFC 5321 4.2.2), 5.1.3 bad destination mailbox address syntax
# (RFC 3463 3.2): an address no mailbox or queue envelope can hold
MAILBOX_NAME_NOT_ALLOWED = Reply(553, "5.1.3", "Mailbox name not allowed")
# 553 mailbox name not allowed (RFC 5321 4.2.2), 5.6.7 (media status, RFC 3463 3.7) non-ASCII
# addresses not permitted for that sender/recipient (RFC 6531 3.7.4.1): UTF-8 without SMTPUTF8
NON_ASCII_SENDER = Reply(553, "5.6.7", "Non-ASCII addresses not permitted for that sender")
# 553 (RFC 5321 4.2.2), 5.6.7 (RFC 3463 3.7; RFC 6531 3.7.4.1): the same for RCPT
NON_ASCII_RECIPIENT = Reply(553, "5.6.7", "Non-ASCII addresses not permitted for that recipient")
# 554 (RFC 5321 4.2.2; relaying: 3.6.2), 5.7.1 delivery not authorized (RFC 3463 3.8)
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
# 553 mailbox name not allowed (RFC 5321 4.2.2; RFC 6409 6.1), 5.7.1 (RFC 3463 3.8)
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
# 550 (RFC 5321 4.3.2 lists no 553 after DATA), 5.7.1 (RFC 3463 3.8; RFC 6409
# 8: the MSA checks what the user may claim): a From: address the user may
# not use.
FROM_NOT_OWNED = Reply(550, "5.7.1", "From: address not owned by authenticated user")
# 552 (RFC 5321 4.2.2; RFC 1870 6.3), 5.3.4 message too big for system (RFC 3463 3.4)
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# 550 (RFC 5321 4.2.2; 554 is not a RCPT reply, 4.3.2), 5.4.6 routing loop
# detected (RFC 3463 3.5): the aliases of an address loop or nest too deep.
ALIAS_LOOP = Reply(550, "5.4.6", "Alias expansion loop or too deep")
# 550 (RFC 5321 4.2.2), 5.1.1 bad destination mailbox address (RFC 3463 3.2):
# an SRS address whose hash is not ours, or whose time stamp is too old.
BAD_SRS_ADDRESS = Reply(550, "5.1.1", "Invalid or expired SRS address")
# 550 (RFC 5321 4.2.2), 5.7.1 delivery not authorized (RFC 3463 3.8): mail to
# an SRS address of ours from a sender other than <>. Bounces (RFC 5321 4.5.5;
# RFC 3464 2) and auto-replies (RFC 3834 5.1) come from the null sender.
SRS_BOUNCES_ONLY = Reply(550, "5.7.1", "SRS addresses take only bounces (MAIL FROM:<>)")
# 554 (RFC 5321 6.3: loops), 5.4.6 routing loop detected (RFC 3463 3.5)
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops, mail loop detected")
# 554 transaction failed (RFC 5321 4.2.2), 5.0.0 other (RFC 3463 3.1)
TRANSACTION_FAILED = Reply(554, "5.0.0", "Transaction failed")
# The relayer's wording of the routing step's refusals of a queued recipient, as its
# records, log lines and DSNs give them (Postfix's words for the first):
# 550 (RFC 5321 4.2.2, 3.3), 5.1.1 bad destination mailbox address (RFC 3463 3.2)
QUEUED_NO_SUCH_USER = Reply(550, "5.1.1", "User unknown in local recipient table")
# 451 (RFC 5321 4.2.2), 4.3.0 other mail system status (RFC 3463 3.4): try again later
QUEUED_USERS_UNAVAILABLE = Reply(451, "4.3.0", "local user database unavailable")
# 550 (RFC 5321 4.2.2), 5.6.0 other media error (RFC 3463 3.7). RFC 5321 2.3.8: CR and LF
# only as CRLF. A bare one can end DATA early at a lenient next hop and smuggle
# a second message (like Postfix's smtpd_forbid_bare_newline = reject).
BARE_NEWLINE = Reply(550, "5.6.0", "Message contains a bare CR or LF")


# --- the SMTP server's own: session, AUTH, STARTTLS --------------------------------
# 220 (RFC 3207 4), 2.0.0 (RFC 3463 3.1)
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
# 221 service closing transmission channel (RFC 5321 4.2.2), 2.0.0 (RFC 3463 3.1)
BYE = Reply(221, "2.0.0", "Bye")
# 214 help message (RFC 5321 4.2.2), 2.0.0 (RFC 3463 3.1)
HELP = Reply(214, "2.0.0", "See RFC 5321")
# 252 cannot VRFY user (RFC 5321 3.5.3, 4.2.2), 2.0.0 (RFC 3463 3.1)
CANNOT_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
# 235 and 2.7.0 (RFC 4954 6)
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
# 454 temporary authentication failure (RFC 4954 6), 4.7.0 (RFC 3463 3.8)
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed logins, try again later")
# 454 TLS not available for a temporary reason (RFC 3207 4), 4.7.0 (RFC 3463 3.8)
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
# 503 bad sequence of commands (RFC 5321 4.2.2; RFC 4954 4), 5.5.1 invalid command
# (RFC 3463 3.6)
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Authentication not enabled")
# 501 for an exchange the client cancelled with "*" (RFC 4954 4), 5.7.0 other security
# status (RFC 3463 3.8)
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
# 504 command parameter not implemented (RFC 5321 4.2.2; RFC 4954 4), 5.5.4 invalid
# command arguments (RFC 3463 3.6)
AUTH_BAD_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
# 501 for a response that is not base64 (RFC 4954 4), 5.5.2 syntax error (RFC 3463 3.6)
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Cannot decode response")
# 502 command not implemented (RFC 5321 4.2.2), 5.5.1 invalid command (RFC 3463 3.6)
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
# 554 after DATA with no valid recipient (RFC 5321 3.3; RFC 2920 3.1), 5.5.1 invalid
# command (RFC 3463 3.6)
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")


class ReplyError(smtp.SMTPServerError):
    """
    The one error that carries a L{Reply}: raised (or failed with) to send
    C{reply} (its text replaced by C{text}, if given) to the client; a subclass of
    Twisted's C{SMTPServerError}, so Twisted's SMTP code sends it as it is. The
    C{cause} is for the log only and never reaches the client.
    """

    def __init__(self, reply: Reply, text: str | None = None, cause: str | None = None) -> None:
        if text:
            reply = Reply(reply.code, reply.enhanced, text)
        self.reply = reply
        self.cause = cause
        super().__init__(reply.code, reply.line().decode())

    @property
    def permanent(self) -> bool:
        return self.reply.permanent


# The name the SMTP server and its tests know it by.
SMTPReplyError = ReplyError


def cause_of(error: BaseException) -> str:
    """What to log of C{error}: a L{ReplyError}'s cause, else its text, else its type."""
    if isinstance(error, ReplyError) and error.cause:
        return error.cause
    return str(error) or type(error).__name__
