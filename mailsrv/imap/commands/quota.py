"""
The QUOTA extension (RFC 9208): GETQUOTAROOT, GETQUOTA and SETQUOTA, with
the STORAGE resource (QUOTA=RES-STORAGE), and the check that APPEND and
COPY make before storing (L{quota_refuses}).

Each user with a limit has one quota root, Dovecot's "User quota", over all
of the user's folders; a user without a limit has none. Limits are the
administrator's ([quota] in the config): SETQUOTA is refused, and QUOTASET
is not advertised (RFC 9208 4.1.3). Usage and limits are in units of 1024
octets (RFC 9208 5.1), rounded down. Responses and texts are Dovecot 2.3's
(compared on loopback), except that a user without a limit gets
C{* QUOTAROOT INBOX} with no root (RFC 9208 4.1.2 wants the response;
Dovecot sends none) and C{GETQUOTA} of a root that is not the user's a NO
(Dovecot: an OK with no QUOTA response).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from mailsrv.imap import twistedcompat
from mailsrv.imap.commands.base import CommandBase, command
from mailsrv.imap.parsing import CommandParser, mailbox_name
from mailsrv.store.quota import ROOT, QuotaExceeded

CAPABILITIES = [b"QUOTA", b"QUOTA=RES-STORAGE"]
_ROOT = b'"' + ROOT.encode() + b'"'

arg_astring = CommandParser.arg_astring


@defer.inlineCallbacks
def quota_refuses(session: Any, tag: bytes, size: int) -> Any:
    """
    Whether storing C{size} more octets would take the session's user over
    quota; if so, C{NO [OVERQUOTA]} is sent (RFC 9208 4.3, RFC 5530 3) with
    Dovecot's text, and the command stores nothing.
    """
    quotas = getattr(session.factory, "quota", None)
    if quotas is None:
        return False
    try:
        yield quotas.check(session._user, size)
    except QuotaExceeded as e:
        session.log.info("imap {user}: {why}", user=session._user, why=e.cause)
        if not session._lost:
            session.sendNegativeResponse(
                tag, b"[OVERQUOTA] Quota exceeded (mailbox for user is full)"
            )
        return True
    return False


class QuotaCommands(CommandBase):
    """GETQUOTAROOT, GETQUOTA, SETQUOTA (RFC 9208 4.1)."""

    def _quota_line(self, used: int, limit: int) -> bytes:
        """RFC 9208 5.1: QUOTA root (STORAGE usage limit), in 1024-octet units."""
        return b"QUOTA %s (STORAGE %d %d)" % (_ROOT, used // 1024, limit // 1024)

    def _quota_limit(self) -> int:
        quotas = getattr(self.factory, "quota", None)
        return 0 if quotas is None else int(quotas.limit(self._user))

    @command
    def do_GETQUOTAROOT(self, tag: bytes, name: bytes) -> Any:
        # Any name of the user's, existing or not, as Dovecot answers (RFC 9208 4.1.2
        # is silent): the one root covers every folder, also one about to be made.
        folder = mailbox_name(name)
        limit = self._quota_limit()
        if not limit:
            self.sendUntaggedResponse(b"QUOTAROOT " + self.encode_name(folder))
        else:
            used = yield self.factory.quota.usage(self._user)
            self.sendUntaggedResponse(b"QUOTAROOT " + self.encode_name(folder) + b" " + _ROOT)
            self.sendUntaggedResponse(self._quota_line(used, limit))
        self.sendPositiveResponse(tag, b"Getquotaroot completed")

    auth_GETQUOTAROOT = select_GETQUOTAROOT = (do_GETQUOTAROOT, arg_astring)

    @command
    def do_GETQUOTA(self, tag: bytes, root: bytes) -> Any:
        limit = self._quota_limit()
        if root != ROOT.encode() or not limit:
            self.sendNegativeResponse(tag, b"Quota root doesn't exist")
            return
        used = yield self.factory.quota.usage(self._user)
        self.sendUntaggedResponse(self._quota_line(used, limit))
        self.sendPositiveResponse(tag, b"Getquota completed")

    auth_GETQUOTA = select_GETQUOTA = (do_GETQUOTA, arg_astring)

    def do_SETQUOTA(self, tag: bytes, root: bytes, limits: Any) -> None:
        # RFC 9208 4.1.3: without QUOTASET; RFC 5530 3: NOPERM.
        self.sendNegativeResponse(tag, b"[NOPERM] Quota can be changed only by admin")

    auth_SETQUOTA = select_SETQUOTA = (do_SETQUOTA, arg_astring, twistedcompat.arg_plist)
