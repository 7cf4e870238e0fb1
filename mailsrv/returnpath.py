"""
A message as finally delivered into a local mailbox: its C{Return-Path:}
field first (RFC 5321 4.4), exactly one. The store's delivery target
(L{mailsrv.store.target}) wraps every copy it stores in L{ReturnPathSource}.
"""

from __future__ import annotations

import io
from typing import Any

from zope.interface import implementer

from mailsrv.interfaces import IMessageSource
from mailsrv.smtp.received import return_path

# A Return-Path field already at the top of a queued copy (written by an
# earlier version that queued local retries with it) is looked for this far.
_HEAD = 8192


@implementer(IMessageSource)
class ReturnPathSource:
    """
    A message as finally delivered: C{Return-Path: <sender>}, then the
    message without a Return-Path field of its own at its top.
    """

    def __init__(self, sender: str, inner: Any) -> None:
        self._field = return_path(sender)
        self._inner = inner
        self.size = len(self._field) + inner.size  # at most: a field may be dropped

    def open(self):
        f = self._inner.open()
        head = _without_return_path(f.read(_HEAD))
        return io.BufferedReader(_ChainReader(self._field + head, f), 64 * 1024)


@implementer(IMessageSource)
class PrefixSource:
    """
    A message with header fields put in its header (C{fields}: whole lines,
    LF line ends): after its first C{after} bytes (the trace fields this
    server wrote, which RFC 5322 3.6.7 keeps in one block at the top).
    """

    def __init__(self, fields: bytes, inner: Any, after: int = 0) -> None:
        self._fields = fields
        self._inner = inner
        self._after = after
        self.size = len(fields) + inner.size

    def open(self):
        f = self._inner.open()
        head = f.read(self._after) if self._after else b""
        return io.BufferedReader(_ChainReader(head + self._fields, f), 64 * 1024)


def _without_return_path(head: bytes) -> bytes:
    """C{head} without the Return-Path fields (and their folded lines) at its start."""
    while head[:12].lower() == b"return-path:":
        end = head.find(b"\n")
        while end >= 0 and head[end + 1 : end + 2] in (b" ", b"\t"):
            end = head.find(b"\n", end + 1)
        if end < 0:
            break  # longer than we looked at: leave it
        head = head[end + 1 :]
    return head


class _ChainReader(io.RawIOBase):
    """Reads C{prefix}, then the file C{inner}."""

    def __init__(self, prefix: bytes, inner: Any) -> None:
        self._prefix = prefix
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._inner.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()
