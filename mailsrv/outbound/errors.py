"""The error a delivery attempt ends with, before any remote server answered."""

from __future__ import annotations

from mailsrv.replies import Reply, ReplyError


class DeliveryError(ReplyError):
    """
    A failure for every recipient of an attempt, as a L{Reply}: permanent
    (550, bounce) or not (450, retry), with the RFC 3463 status and a reason
    for the DSN and the log. C{remote} names the host that gave it, if any
    (for the log and the DSN).
    """

    def __init__(self, permanent: bool, status: str, text: str, remote: str = "") -> None:
        # RFC 5321 4.2.2: 550/450 "mailbox unavailable", the code a relayer
        # records for a destination it could not reach or resolve.
        super().__init__(Reply(550 if permanent else 450, status, text), cause=text)
        self.remote = remote

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced status code."""
        return self.reply.enhanced

    @property
    def text(self) -> str:
        return self.reply.text

    def __str__(self) -> str:
        return self.reply.text

    def __repr__(self) -> str:
        kind = "permanent" if self.permanent else "temporary"
        return f"DeliveryError({kind}, {self.status}, {self.text!r})"
