"""
SIGHUP: read again what can be read again while running, instead of dying
(the signal's default): the TLS certificate and key (ACME clients renew
them in place) and, with a L{Reloader}, the config file, the users, the
aliases and the network lists (L{mailsrv.reload}). systemd hears
C{RELOADING=1} before and C{READY=1} after; a SIGHUP that comes while the
start-up recovery still holds the listeners is put off until they accept,
so that C{READY=1} is never said early. SIGHUPs that come during a reload
make one more reload after it.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailsrv.reload import Reloader
from mailsrv.sdnotify import Notifier
from mailsrv.startup import StartGate, StartupError
from mailsrv.tls import ServerTLS


def _stopping(signum: int, frame: Any) -> None:
    """SIGHUP once the service stopped: nothing to read again, and no reason to die."""


class HangupService(service.Service):
    """Handles SIGHUP while the server runs."""

    log = Logger()

    def __init__(
        self,
        tls: ServerTLS,
        reactor: Any,
        notifier: Notifier | None = None,
        gate: StartGate | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        self.tls = tls
        self.reactor = reactor
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.gate = gate
        self.reloader = reloader
        self._previous: Any = None
        self._reloading: defer.Deferred | None = None
        self._again = False  # another SIGHUP came during a reload
        self._put_off = False  # a SIGHUP came during the start-up

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            # The stop may take a while (transactions under way, the relay
            # process, the store's last writes): a SIGHUP meanwhile (a log
            # rotation) must not end the process by the signal's default action.
            # A handler, not SIG_IGN: the programs started later do not inherit it.
            previous = self._previous
            if previous in (signal.SIG_DFL, None):
                previous = _stopping
            signal.signal(signal.SIGHUP, previous)
            self._previous = None

    def _signalled(self, signum: int, frame: Any) -> None:
        # Python runs signal handlers between bytecodes: do the work in the
        # reactor's own turn.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> defer.Deferred | None:
        """
        Read the TLS files and the configuration again, and log what
        happened; the Deferred of the reload under way, or None when it is
        put off (the start-up, or another reload, is not over).
        """
        if self.gate is not None and not self.gate.is_open:
            if not self._put_off:
                self._put_off = True
                self.log.info("SIGHUP during the start-up: reloading once the listeners accept")
                self.gate.when_open(self._after_start)
            return None
        if self._reloading is not None:
            self._again = True
            return None
        self.notifier.reloading()
        self._reload_tls()
        d: defer.Deferred = defer.succeed(None)
        if self.reloader is not None:
            d = self.reloader.reload()
        d.addErrback(lambda f: self.log.failure("SIGHUP: reload failed", f))
        self._reloading = d
        d.addBoth(self._done)
        return d

    def _after_start(self) -> None:
        # In a turn of its own: READY=1 for the start-up comes first.
        self.reactor.callLater(0, self._reload_put_off)

    def _reload_put_off(self) -> None:
        self._put_off = False
        if self.running:
            self.reload()

    def _done(self, result: Any) -> Any:
        self._reloading = None
        self.notifier.ready("accepting connections")
        if self._again and self.running:
            self._again = False
            self.reload()
        return result

    def _reload_tls(self) -> None:
        try:
            path = self.tls.reload()
        except Exception as e:
            why = str(e) if isinstance(e, StartupError) else f"{type(e).__name__}: {e}"
            self.log.error(
                "SIGHUP: cannot reload the TLS certificate ({why}); still using the one "
                "read before",
                why=why,
            )
            return
        self.log.info("SIGHUP: reloaded the TLS certificate {path}", path=str(path))
