"""
Storage quotas (RFC 9208's STORAGE resource): what a user's folders take,
against the limit of the C{[quota]} section (L{QuotaConfig}).

Usage is the octets of the user's mbox files, as Postfix's
C{mailbox_size_limit} counts them: what the disk holds is what a storage
limit protects, and the file system keeps that figure exact through every
change by any program (our deliveries, APPEND, COPY, EXPUNGE's rewrite,
DELETE; mutt or procmail on the same files), so nothing is cached that
could go stale, and nothing is to be recomputed after a restart. A look is
a walk of the user's folder tree with one C{stat} per folder: its cost does
not depend on how many messages the folders hold. (Dovecot counts the
messages' sizes with CRLF line ends instead; an mbox file has LF line ends
but adds a C{From } line and status fields, so the two differ by a few per
cent.) The walk runs on the store's thread pool.

The check before a message is stored is "usage + its size > limit", as
Dovecot's C{quota_try_alloc}; two messages stored at once may both pass
it, so a user can end a little over the limit, never by more than those.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer

from mailsrv import replies
from mailsrv.replies import ReplyError
from mailsrv.store.names import user_dir
from mailsrv.store.quotalimits import QuotaConfig

# Dovecot's quota root name (RFC 9208 3.2: the names are the server's choice).
ROOT = "User quota"
_RESERVED_SUFFIXES = (".lock",)  # dotlock files (mailsrv.store.mbox.folders)
OVER_QUOTA = replies.MAILBOX_FULL.line().decode()  # "4.2.2 Mailbox full"


class QuotaExceeded(ReplyError):
    """
    Storing a message would take a user over the storage limit. Carries
    the SMTP reply (452 4.2.2 Mailbox full, RFC 3463 3.3); IMAP answers
    C{NO [OVERQUOTA]} (RFC 9208 4.3, RFC 5530).
    """

    def __init__(self, user: str, used: int, size: int, limit: int) -> None:
        super().__init__(
            replies.MAILBOX_FULL,
            cause=f"{user} over quota: {used} + {size} octets > {limit}",
        )
        self.user = user
        self.used = used
        self.size = size
        self.limit = limit


def storage_used(mail_dir: Path, user: str) -> int:
    """
    The octets of C{user}'s mbox files (disk thread): every regular file in
    the user's folder tree but hidden files and dotlocks.
    """
    total = 0
    for dirpath, dirnames, filenames in os.walk(user_dir(mail_dir, user)):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or name.endswith(_RESERVED_SUFFIXES):
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # deleted meanwhile
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


class Quotas:
    """
    The users' storage limits and usage, for SMTP (RCPT, end of DATA), the
    relayer's local delivery and IMAP (APPEND, COPY, GETQUOTA). C{run}
    runs a function on the store's thread pool and returns a Deferred.
    """

    def __init__(
        self, config: QuotaConfig, mail_dir: Path, run: Callable[..., defer.Deferred]
    ) -> None:
        self.config = config
        self.mail_dir = Path(mail_dir)
        self._run = run

    def limit(self, user: str) -> int:
        """C{user}'s storage limit in octets; 0: none."""
        return self.config.limit_of(user)

    def usage(self, user: str) -> defer.Deferred:
        """Fire with the octets C{user}'s folders take now."""
        return self._run(storage_used, self.mail_dir, user)

    def check(self, user: str, size: int) -> defer.Deferred:
        """
        Fire with None if C{size} more octets fit within C{user}'s limit,
        else fail with L{QuotaExceeded}. No look at the disk without a limit.
        """
        limit = self.limit(user)
        if not limit:
            return defer.succeed(None)

        def compare(used: int) -> None:
            if used + size > limit:
                raise QuotaExceeded(user, used, size, limit)

        return self.usage(user).addCallback(compare)

    def refuse_if_full(self, user: str, result: Any) -> Any:
        """
        C{result} while C{user} has room, else a Deferred failing with
        L{QuotaExceeded}: at RCPT, a user at or over the limit gets no mail
        (452 4.2.2, as Dovecot's LMTP with C{lmtp_rcpt_check_quota}).
        """
        limit = self.limit(user)
        if not limit:
            return result

        def decide(used: int) -> Any:
            if used >= limit:
                raise QuotaExceeded(user, used, 0, limit)
            return result

        return self.usage(user).addCallback(decide)


def over_quota(error: BaseException) -> bool:
    """
    Whether a local delivery failed for want of room: L{QuotaExceeded}, or
    its text as it crosses the relay process's pipe (L{OVER_QUOTA}).
    """
    return isinstance(error, QuotaExceeded) or str(error) == OVER_QUOTA


def check(quotas: Quotas | None, user: str, size: int) -> defer.Deferred:
    """L{Quotas.check}, or nothing to check without quotas."""
    return defer.succeed(None) if quotas is None else quotas.check(user, size)


def size_of(source: Any) -> int:
    """The octets a message source will add (its C{size}; 0 when it does not say)."""
    return int(getattr(source, "size", 0) or 0)
