"""
Log entries to systemd's journal in its native protocol (C{[log] journal},
C{"auto"} by default: when systemd started the server with its standard
output connected to the journal).

Each event is one datagram on C{/run/systemd/journal/socket} with the fields
C{MESSAGE} (the event's own text: the Postfix- and Dovecot-shaped lines of
L{mailsrv.loglines}, as syslog gets them), C{PRIORITY}, C{SYSLOG_FACILITY}
(mail), C{SYSLOG_IDENTIFIER=mailsrv} and C{SYSLOG_PID}, plus
C{MAILSRV_QUEUE_ID}, C{MAILSRV_CLIENT}, C{MAILSRV_SERVICE} and
C{MAILSRV_LOGGER} where the event has them. C{journalctl -u mailsrv} then
shows C{mailsrv[PID]: TEXT}, as fail2ban's systemd backend reads it, so the
stock postfix and dovecot filters match it given C{_daemon=mailsrv}.

twistd's own copy on standard output (the journal's stream, which would
prefix twistd's time stamp and namespace) is stopped then, so each line is
in the journal once. Sending never blocks the reactor: the socket
is non-blocking and what journald does not take now waits, bounded
(L{mailsrv.syslogobserver.DatagramSender}).

The native protocol (systemd's "Native Journal Protocol"): C{NAME=value\\n}
per field; a value holding a newline is C{NAME\\n}, its length as a 64-bit
little-endian integer, the value, C{\\n}.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import implementer

from mailsrv.loglines import unwrapped
from mailsrv.syslogobserver import (
    DEFAULT_FACILITY,
    FACILITIES,
    IDENT,
    SEVERITIES,
    DatagramSender,
    LogSocketService,
    dropped_text,
    event_text,
)

DEFAULT_SOCKET = "/run/systemd/journal/socket"
MODES = ("auto", True, False)
MAX_MESSAGE = 65536  # octets of MESSAGE per entry (a datagram must fit the socket)
# Event fields worth a journal field of their own (journalctl MAILSRV_QUEUE_ID=...).
_FIELDS: Mapping[str, str] = {
    "queue_id": "MAILSRV_QUEUE_ID",
    "client": "MAILSRV_CLIENT",
    "service": "MAILSRV_SERVICE",
}


def journal_mode(value: Any) -> str | bool:
    """C{[log] journal}: true, false or C{"auto"} (ValueError otherwise)."""
    if value is True or value is False or value == "auto":
        return value
    raise ValueError('must be true, false or "auto"')


@dataclass(frozen=True)
class JournalSettings:
    """The C{[log]} settings for the journal."""

    mode: str | bool = "auto"
    socket: str = DEFAULT_SOCKET
    facility: str = DEFAULT_FACILITY


def journal_settings(config: Any) -> JournalSettings:
    """C{config}'s C{[log]} section (validated when the config was loaded)."""
    raw = getattr(config, "raw", {}).get("log", {})
    return JournalSettings(
        mode=raw.get("journal", "auto"),
        socket=str(raw.get("journal_socket", DEFAULT_SOCKET)),
        facility=str(raw.get("facility", DEFAULT_FACILITY)),
    )


def journal_stream(fd: int, environ: Mapping[str, str]) -> bool:
    """
    Whether descriptor C{fd} is connected to the journal: C{JOURNAL_STREAM}
    names its C{device:inode} (systemd.exec(5), "JOURNAL_STREAM").
    """
    named = environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return named == f"{st.st_dev}:{st.st_ino}"


def wanted(settings: JournalSettings, environ: Mapping[str, str]) -> bool:
    """Whether to log to the journal: as set, or when stdout or stderr is the journal's."""
    if settings.mode != "auto":
        return bool(settings.mode)
    return journal_stream(1, environ) or journal_stream(2, environ)


def field(name: str, value: str | bytes) -> bytes:
    """One field in the native protocol; the length form for a value with a newline."""
    data = value.encode("utf-8", "replace") if isinstance(value, str) else value
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


@implementer(ILogObserver)
class JournalObserver(DatagramSender):
    """Sends each event to the journal as one entry."""

    def __init__(
        self,
        path: str = DEFAULT_SOCKET,
        facility: str = DEFAULT_FACILITY,
        ident: str = IDENT,
        pid: Callable[[], int] = os.getpid,
    ) -> None:
        super().__init__(path)
        self.facility = FACILITIES[facility]
        self.ident = ident
        self._pid = pid

    def entry(self, text: str, level: LogLevel, extra: Mapping[str, str] = {}) -> bytes:
        """The datagram of one journal entry."""
        message = text.encode("utf-8", "replace")[:MAX_MESSAGE]
        fields = [
            field("MESSAGE", message),
            field("PRIORITY", str(SEVERITIES.get(level, 6))),
            field("SYSLOG_FACILITY", str(self.facility)),
            field("SYSLOG_IDENTIFIER", self.ident),
            field("SYSLOG_PID", str(self._pid())),
        ]
        fields += [field(name, value) for name, value in extra.items()]
        return b"".join(fields)

    def __call__(self, event: dict) -> None:
        text = event_text(event).rstrip("\n")
        if not text.strip():
            return
        extra = {}
        for key, name in _FIELDS.items():
            value = event.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool):
                extra[name] = str(value)
        namespace = event.get("log_namespace")
        if isinstance(namespace, str):
            extra["MAILSRV_LOGGER"] = namespace
        self.send([self.entry(text, event.get("log_level", LogLevel.info), extra)])

    def dropped_notice(self, count: int) -> bytes:
        return self.entry(dropped_text(count, "journal"), LogLevel.warn)


def _writes_to_stdout(observer: Any) -> bool:
    """Whether C{observer} is twistd's text log on standard output."""
    out = getattr(unwrapped(observer), "_outFile", None)
    try:
        return out is not None and out.fileno() == 1
    except (AttributeError, OSError, ValueError):
        return False


class JournalService(LogSocketService):
    """
    While running, sends the log to the journal. While standard output is
    the journal's stream, twistd's copy there is taken off for good: the
    journal is then the log until the process ends, the lines of the stop
    included.
    """

    def __init__(
        self,
        settings: JournalSettings,
        clock: Any,
        environ: Mapping[str, str],
        publisher: Any = globalLogPublisher,
    ) -> None:
        super().__init__(JournalObserver(settings.socket, settings.facility), clock, publisher)
        self._environ = environ
        self.replaced: list[Any] = []  # twistd's observers taken off

    @property
    def keeps_logging(self) -> bool:  # type: ignore[override]
        return bool(self.replaced)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if journal_stream(1, self._environ):
            for observer in list(getattr(self._publisher, "_observers", ())):
                if _writes_to_stdout(observer):
                    self._publisher.removeObserver(observer)
                    self.replaced.append(observer)


def journal_service(
    config: Any, clock: Any, environ: Mapping[str, str] = os.environ
) -> JournalService | None:
    """The L{JournalService} C{[log] journal} asks for (by default: under systemd), else None."""
    settings = journal_settings(config)
    return JournalService(settings, clock, environ) if wanted(settings, environ) else None
