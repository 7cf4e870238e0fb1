"""The error a delivery attempt ends with, before any remote server answered."""

from __future__ import annotations


class DeliveryError(Exception):
    """
    A failure for every recipient of an attempt: C{permanent} (bounce) or not
    (retry), with the RFC 3463 status and a reason for the DSN and the log.
    """

    def __init__(self, permanent: bool, status: str, text: str, remote: str = "") -> None:
        super().__init__(text)
        self.permanent = permanent
        self.status = status
        self.text = text
        self.remote = remote

    def __repr__(self) -> str:
        kind = "permanent" if self.permanent else "temporary"
        return f"DeliveryError({kind}, {self.status}, {self.text!r})"
