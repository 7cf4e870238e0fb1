"""twistd plugin: ``twistd -n mailsrv``."""

from twisted.application.service import ServiceMaker

mailsrv = ServiceMaker(
    "mailsrv",
    "mailsrv.tap",
    "A mail server: ESMTP, submission, POP3 and IMAP4 over mbox files.",
    "mailsrv",
)
