"""
SIGHUP: read again what can be read again while running, instead of dying
(the signal's default). The TLS certificate and key are read again, since
ACME clients renew them in place; the password file is re-read on change
anyway; every other setting takes effect at the next start.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from mailsrv.sdnotify import Notifier
from mailsrv.startup import StartupError
from mailsrv.tls import ServerTLS


class HangupService(service.Service):
    """Handles SIGHUP while the server runs."""

    log = Logger()

    def __init__(self, tls: ServerTLS, reactor: Any, notifier: Notifier | None = None) -> None:
        self.tls = tls
        self.reactor = reactor
        self.notifier = notifier if notifier is not None else Notifier(None)
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _signalled(self, signum: int, frame: Any) -> None:
        # Python runs signal handlers between bytecodes: do the work in the
        # reactor's own turn.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Read the TLS certificate and key again, and log what happened."""
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            self.notifier.ready("accepting connections")

    def _reload(self) -> None:
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
        self.log.info(
            "SIGHUP: reloaded the TLS certificate {path}; other settings take effect at "
            "the next start (the password file is re-read when it changes)",
            path=str(path),
        )
