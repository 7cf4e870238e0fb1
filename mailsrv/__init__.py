"""mailsrv: a mail server on Twisted (ESMTP, submission, POP3, IMAP4) over mbox files."""

from importlib import metadata

try:
    # pyproject.toml is the one place the version is written.
    __version__ = metadata.version("mailsrv")
except metadata.PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"
