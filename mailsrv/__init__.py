"""mailsrv: a mail server on Twisted (ESMTP, submission, POP3, IMAP4) over mbox files."""

__version__ = "0.1.0"
