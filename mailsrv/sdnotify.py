"""
Tell systemd how the server is doing (sd_notify(3)), for C{Type=notify}:
C{READY=1} once every listener accepts, C{EXTEND_TIMEOUT_USEC} now and
then while the start-up recovery holds the listeners (it may outlast
C{TimeoutStartSec}), C{RELOADING=1} and C{READY=1} around a SIGHUP,
C{STOPPING=1} when it stops. systemd names its socket in
C{$NOTIFY_SOCKET}; without it (not run by systemd) nothing is sent.

The protocol is one datagram of C{KEY=value} lines to a unix socket (an
abstract one when the name starts with C{@}), so it is written here rather
than taken from a library: C{python3-systemd} needs libsystemd to build and
the C{sdnotify} package is unmaintained.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from mailsrv.startup import StartGate


class Notifier:
    """Sends states to the socket named by C{$NOTIFY_SOCKET}, if any."""

    log = Logger()

    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self.address = address or None
        self._socket: socket.socket | None = None

    @classmethod
    def from_environ(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def notify(self, *states: str) -> bool:
        """Send C{states} (C{"READY=1"}, ...) in one datagram: whether it went."""
        if self.address is None:
            return False
        message = "\n".join(states).encode("utf-8")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(message, self.address)
        except OSError as e:
            self.log.warn(
                "cannot notify systemd at {address}: {error}", address=self.address, error=str(e)
            )
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC: what systemd 253's Type=notify-reload asks for; harmless otherwise.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def extend_timeout(self, seconds: float, status: str) -> bool:
        """Ask systemd for C{seconds} more to start (or stop), from now (systemd 236)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


# While the start-up recovery runs: every EXTEND_EVERY seconds, ask systemd
# for EXTEND_BY seconds more (the time between two asks, with room to spare).
EXTEND_EVERY = 10.0
EXTEND_BY = 30.0


class NotifyService(service.Service):
    """
    Says C{READY=1} once the L{StartGate} is open, and until then asks
    systemd for more time every L{EXTEND_EVERY} seconds: rewriting a large
    mbox a crash interrupted can take longer than C{TimeoutStartSec}.
    Started after every listener's service (so every port is bound by
    then), and so stopped first: C{STOPPING=1} comes before the listeners
    close.
    """

    def __init__(self, notifier: Notifier, gate: StartGate, reactor: object) -> None:
        self.notifier = notifier
        self.gate = gate
        self.reactor = reactor
        self._extending: task.LoopingCall | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # The socket made while still root: what systemd reads is sent by this pid anyway.
        self.notifier.notify("STATUS=starting")

    def startService(self) -> None:
        super().startService()
        if not self.gate.is_open and self.notifier.address is not None:
            self._extending = task.LoopingCall(self._extend)
            self._extending.clock = self.reactor  # type: ignore[assignment]
            self._extending.start(EXTEND_EVERY, now=False)
        self.gate.when_open(self._ready)

    def _extend(self) -> None:
        self.notifier.extend_timeout(EXTEND_BY, "recovering interrupted mailbox rewrites")

    def _stop_extending(self) -> None:
        if self._extending is not None and self._extending.running:
            self._extending.stop()
        self._extending = None

    def _ready(self) -> None:
        self._stop_extending()
        if self.running:
            self.notifier.ready("accepting connections")

    def stopService(self) -> None:
        super().stopService()
        self._stop_extending()
        self.notifier.stopping()
