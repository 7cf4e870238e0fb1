"""
Log lines to the local syslog socket (C{[log] syslog = true}), as C{syslog(3)}
writes them: one datagram per line, C{<PRI>Mmm dd hh:mm:ss mailsrv[PID]: TEXT}
(RFC 3164 4.1), facility C{mail} unless C{[log] facility} says otherwise.

The text is the event's own (the Postfix- and Dovecot-shaped lines of
L{mailsrv.loglines}), without twistd's time stamp and namespace, so syslog
files read as Postfix's and Dovecot's do and fail2ban's stock filters match
them given C{_daemon=mailsrv} (README: Deployment). twistd's own log (file or
standard output) is kept as it is.

The socket is non-blocking: when the syslog daemon does not keep up (a Unix
datagram socket queues only net.unix.max_dgram_qlen datagrams, 10 by
default) or is away, lines wait in memory (at most L{MAX_PENDING} of them and
L{MAX_PENDING_BYTES} octets, then the oldest are dropped, counted, and told in a warning line once the rest is
sent) and are sent again with the next line or every L{FLUSH_INTERVAL}
seconds, so the reactor is never held; a restarted daemon's socket is
connected again. L{DatagramSender} is that sending, shared with the
journal (L{mailsrv.journal}).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import (
    ILogObserver,
    LogLevel,
    eventAsText,
    globalLogPublisher,
)
from zope.interface import implementer

from mailsrv.loglines import quiet

IDENT = "mailsrv"
DEFAULT_SOCKET = "/dev/log"
DEFAULT_FACILITY = "mail"
# RFC 5424 6.2.1 table 1 (the facility codes syslog(3) uses).
FACILITIES: Mapping[str, int] = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    **{f"local{n}": 16 + n for n in range(8)},
}
# RFC 5424 6.2.1 table 2: severities.
SEVERITIES: Mapping[LogLevel, int] = {
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}
MAX_PENDING = 10_000  # lines kept while the reader (syslog, journal) is behind or away
# Octets kept likewise: journal entries are up to 64 KiB (a client's long
# name), and 10,000 of those would be 640 MiB of memory.
MAX_PENDING_BYTES = 8 << 20
FLUSH_INTERVAL = 0.5  # seconds between attempts to send the lines kept
MAX_LINE = 8192  # octets of text per datagram (rsyslog's default maxMessageSize)
_RECONNECT = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTCONN, errno.EDESTADDRREQ)


@dataclass(frozen=True)
class SyslogSettings:
    """The C{[log]} settings for syslog."""

    enabled: bool = False
    socket: str = DEFAULT_SOCKET
    facility: str = DEFAULT_FACILITY


def syslog_settings(config: Any) -> SyslogSettings:
    """C{config}'s C{[log]} section (validated when the config was loaded)."""
    raw = getattr(config, "raw", {}).get("log", {})
    return SyslogSettings(
        enabled=bool(raw.get("syslog", False)),
        socket=str(raw.get("syslog_socket", DEFAULT_SOCKET)),
        facility=str(raw.get("facility", DEFAULT_FACILITY)),
    )


def rfc3164_time(when: float) -> str:
    """C{Mmm dd hh:mm:ss} in local time, the day padded with a space (RFC 3164 4.1.2)."""
    t = time.localtime(when)
    month = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()[t.tm_mon - 1]
    return f"{month} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


@implementer(ILogObserver)
class DatagramSender:
    """
    Sends datagrams to a Unix datagram socket without ever blocking: what the
    reader does not take now waits (at most L{MAX_PENDING} datagrams and
    L{MAX_PENDING_BYTES} octets, then the oldest go, counted in C{dropped}) and goes with the next datagram or L{flush};
    once the backlog is sent, a notice (L{dropped_notice}) says how many were
    lost. Shared by syslog and the journal (L{mailsrv.journal}).
    """

    def __init__(
        self, path: str, max_pending: int = MAX_PENDING, max_pending_bytes: int = MAX_PENDING_BYTES
    ) -> None:
        self.path = path
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0  # octets of the datagrams waiting
        self._sock: socket.socket | None = None
        self._pending: deque[bytes] = deque()
        # Events come from the disk threads too: one sender at a time.
        self._lock = threading.Lock()
        self.dropped = 0  # datagrams lost: the oldest while too many waited, or unsendable
        self._unreported = 0  # of those, not yet told in a notice

    def __call__(self, event: dict) -> None:
        """Send C{event} (a log observer: its subclasses say in which form)."""
        raise NotImplementedError

    def dropped_notice(self, count: int) -> bytes:
        """The datagram that says C{count} earlier ones were lost."""
        raise NotImplementedError

    def send(self, datagrams: list[bytes]) -> None:
        """Send C{datagrams} after those waiting; keep them when the reader is behind."""
        with self._lock:
            for datagram in datagrams:
                self._flush()
                if self._pending or not self._send_one(datagram):
                    self._keep(datagram)

    def _keep(self, datagram: bytes) -> None:
        self._pending.append(datagram)
        self.pending_bytes += len(datagram)
        while len(self._pending) > 1 and (
            len(self._pending) > self.max_pending or self.pending_bytes > self.max_pending_bytes
        ):
            self.pending_bytes -= len(self._pending.popleft())
            self._lost()

    def _lost(self) -> None:
        self.dropped += 1
        self._unreported += 1

    def flush(self) -> None:
        """Send the datagrams kept while the reader was behind, as far as it takes them."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        while self._pending:
            if not self._send_one(self._pending[0]):
                return
            self.pending_bytes -= len(self._pending.popleft())
        if self._unreported:
            count, self._unreported = self._unreported, 0
            if not self._send_one(self.dropped_notice(count)):
                self._unreported += count  # told with the next notice

    def _send_one(self, datagram: bytes) -> bool:
        """True: sent, or dropped for good; False: try again later (socket full or absent)."""
        for attempt in (1, 2):
            try:
                self._connected().send(datagram)
                return True
            except (BlockingIOError, InterruptedError):
                return False  # EAGAIN: the reader is behind
            except OSError as e:
                self.close()
                if e.errno == errno.ENOBUFS:
                    return False
                if e.errno not in _RECONNECT:
                    self._lost()  # EMSGSIZE and the like: this one never fits
                    return True
                if attempt == 2:
                    return False  # no reader listening yet
        return False

    def connect(self) -> bool:
        """Connect now (before the privileges are dropped); False: at the next datagram."""
        try:
            self._connected()
        except OSError:
            return False
        return True

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def event_text(event: dict) -> str:
    """An event's own text, without twistd's time stamp and namespace."""
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


@implementer(ILogObserver)
class SyslogObserver(DatagramSender):
    """Sends each event's lines to a syslog datagram socket."""

    def __init__(
        self,
        path: str,
        facility: str = DEFAULT_FACILITY,
        ident: str = IDENT,
        pid: Callable[[], int] = os.getpid,
    ) -> None:
        super().__init__(path)
        self.facility = FACILITIES[facility]
        self.ident = ident
        self._pid = pid

    def _head(self, level: LogLevel, when: float) -> str:
        pri = self.facility * 8 + SEVERITIES.get(level, 6)
        return f"<{pri}>{rfc3164_time(when)} {self.ident}[{self._pid()}]: "

    def __call__(self, event: dict) -> None:
        text = event_text(event)
        if not text:
            return
        head = self._head(
            event.get("log_level", LogLevel.info), event.get("log_time") or time.time()
        )
        self.send(
            [
                (head + line).encode("utf-8", "replace")[:MAX_LINE]
                for line in text.splitlines()
                if line.strip()
            ]
        )

    def dropped_notice(self, count: int) -> bytes:
        head = self._head(LogLevel.warn, time.time())
        return (head + dropped_text(count, "syslog")).encode()


def dropped_text(count: int, where: str) -> str:
    """The warning that C{count} log lines did not reach C{where}."""
    return f"warning: {count} log lines lost: the {where} socket was full or absent"


class LogSocketService(Service):
    """
    While running, also sends the log to a local socket (syslog, the
    journal). Started before the listeners (privilegedStartService, as root:
    the socket is connected before the privileges are dropped) and stopped
    after them.
    """

    def __init__(
        self, observer: DatagramSender, clock: Any, publisher: Any = globalLogPublisher
    ) -> None:
        self.observer = observer
        self._filtered = quiet(self.observer)
        self._publisher = publisher
        self._flush = LoopingCall(self.observer.flush)
        self._flush.clock = clock

    def privilegedStartService(self) -> None:
        self._publisher.addObserver(self._filtered)
        self.observer.connect()
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self._flush.start(FLUSH_INTERVAL, now=False)

    # True: the log stays on after stop (it is the only log, and the lines
    # of the stop itself belong there).
    keeps_logging = False

    def stopService(self) -> Any:
        if self._flush.running:
            self._flush.stop()
        if not self.keeps_logging:
            self._publisher.removeObserver(self._filtered)
        self.observer.flush()
        if not self.keeps_logging:
            self.observer.close()
        return super().stopService()


class SyslogService(LogSocketService):
    """While running, also sends the log to syslog."""

    def __init__(
        self, settings: SyslogSettings, clock: Any, publisher: Any = globalLogPublisher
    ) -> None:
        super().__init__(SyslogObserver(settings.socket, settings.facility), clock, publisher)


def syslog_service(config: Any, clock: Any) -> SyslogService | None:
    """The L{SyslogService} C{[log] syslog = true} asks for, else None."""
    settings = syslog_settings(config)
    return SyslogService(settings, clock) if settings.enabled else None
