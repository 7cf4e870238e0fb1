"""The POP3 listener's protocol factory and its registration with the realm."""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet import protocol
from twisted.mail.interfaces import IMailboxPOP3

from mailsrv.pop3.maildrop import MaildropLocks, open_maildrop
from mailsrv.pop3.server import POP3Server
from mailsrv.session import OpenSessions


class POP3Factory(protocol.ServerFactory):
    """Builds L{POP3Server} sessions sharing one context and one set of maildrop locks."""

    noisy = False

    def __init__(self, ctx: Any, locks: MaildropLocks, implicit_tls: bool = False) -> None:
        self.ctx = ctx
        self.locks = locks
        self.implicit_tls = implicit_tls
        self.open_sessions = OpenSessions(ctx.reactor)

    def shut_down(self) -> Any:
        """The server stops: every session hears C{-ERR} and closes (a Deferred)."""
        return self.open_sessions.shut_down()

    def buildProtocol(self, addr: Any) -> POP3Server:
        p = POP3Server(self.ctx, self.locks, self.implicit_tls)
        p.factory = self
        return p


def pop3_factory(ctx: Any, implicit_tls: bool = False) -> POP3Factory:
    """
    The POP3 factory for a listener; service.py wraps it in TLS for pop3s.
    Registers the POP3 avatar with the realm, with the maildrop locks of
    C{ctx.pop3_locks}, shared by every listener.
    """
    locks = ctx.pop3_locks
    ctx.portal.realm.register(IMailboxPOP3, partial(open_maildrop, ctx.store, locks))
    return POP3Factory(ctx, locks, implicit_tls)
