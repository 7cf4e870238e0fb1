"""
``mailsrv status``: what the running daemon is doing, from the daemon.

The daemon answers on a Unix socket in its data folder (L{SOCKET_NAME},
mode 0600, the server account's: made after the privilege drop), whatever
C{[metrics]} says: each connection gets one JSON document and is closed.

    {"pid": 1234, "started": 1700000000.0, "uptime": 42.0,
     "listeners": [{"name": "smtp", "endpoint": "tcp:25", "address": "0.0.0.0:25"}, ...],
     "queue": {"messages": 3, "oldest_age": 120.5},
     "connections": {"smtp": 2, "imap": 10, ...},
     "counters": {"mailsrv_messages_received_total": 7.0, ...}}

The command prints it for a person (or as it is with C{--json}); when no
daemon answers it says so, shows the queue as the folder holds it, and
exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailsrv.metrics.registry import MailMetrics, queue_figures

SOCKET_NAME = "status.sock"
HANDLER = "handler"
CLIENT_TIMEOUT = 5.0  # seconds the command waits for the daemon's answer
# Seconds the start waits to learn whether a daemon listens on the socket
# found there: one whose backlog is full (busy, or hung) does not take the
# connection, and a blocking connect would wait for it for ever.
STALE_CHECK_TIMEOUT = 2.0
MAX_DOCUMENT = 1 << 20


def socket_path(config: Any) -> Path:
    """Where the daemon of C{config} answers."""
    return Path(config.server.data_dir) / SOCKET_NAME


class StatusProtocol(protocol.Protocol):
    """Writes the status document and closes."""

    factory: StatusFactory

    def connectionMade(self) -> None:
        d = self.factory.document()
        d.addCallback(lambda doc: json.dumps(doc, sort_keys=True).encode() + b"\n")
        d.addErrback(lambda f: json.dumps({"error": f.getErrorMessage()}).encode() + b"\n")
        d.addCallback(self._send)

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.transport.loseConnection()


class StatusFactory(protocol.Factory):
    """Builds the status document of a running server."""

    protocol = StatusProtocol  # type: ignore[assignment]
    noisy = False

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        """The port's "status starting on '<socket>'" line."""
        return "status"

    def __init__(self, ctx: Any, metrics: MailMetrics, listeners: Any) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self.listeners = listeners
        self.started = time.time()

    def document(self) -> defer.Deferred:
        now = time.time()
        d = deferToThreadPool(
            self.ctx.reactor, self.ctx.threadpool, queue_figures, self.ctx.config.queue_dir, now
        )

        def build(figures: Any) -> dict[str, Any]:
            return {
                "running": True,
                "pid": os.getpid(),
                "started": self.started,
                "uptime": now - self.started,
                "listeners": [
                    {"name": n, "endpoint": e, "address": a} for n, e, a in self.listeners.bound
                ],
                "queue": {"messages": figures.messages, "oldest_age": figures.oldest_age},
                "connections": self.metrics.open_connections(),
                "counters": self.metrics.totals(),
            }

        return d.addCallback(build)


class StatusService(service.Service):
    """
    The status socket, made in L{startService}: after twistd's privilege
    drop, so that it is the server account's. The socket of a daemon that
    died (nothing answers on it) is replaced; one that answers is left alone.
    """

    log = Logger()

    def __init__(self, ctx: Any, metrics: MailMetrics, listeners: Any) -> None:
        self.ctx = ctx
        self.factory = StatusFactory(ctx, metrics, listeners)
        self.port: Any = None
        self.setName("status")

    def startService(self) -> None:
        super().startService()
        path = socket_path(self.ctx.config)
        problem = clear_stale_socket(path)
        if problem is not None:
            self._cannot_listen(path, problem)
            return
        endpoint = endpoints.UNIXServerEndpoint(self.ctx.reactor, str(path), mode=0o600)
        d = endpoint.listen(self.factory)

        def listening(port: Any) -> None:
            self.port = port

        d.addCallbacks(listening, lambda f: self._cannot_listen(path, f.getErrorMessage()))

    def _cannot_listen(self, path: Path, why: str) -> None:
        self.log.warn(
            "mailsrv status will not reach this server: cannot listen on {path}: {why}",
            path=str(path),
            why=why,
        )

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening)


def clear_stale_socket(path: Path, timeout: float = STALE_CHECK_TIMEOUT) -> str | None:
    """
    Remove the socket at C{path} if no daemon answers on it; None when the
    path is free now, else why it is not (another daemon, or not a socket).
    A daemon that does not take the connection within C{timeout} seconds is
    taken to be alive: its socket is left.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return "it is not a socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except ConnectionRefusedError:
            os.unlink(path)  # a daemon that died left it
            return None
        except (TimeoutError, BlockingIOError):  # a full backlog: EAGAIN
            return "another mailsrv listens there (it does not answer)"
        except OSError as e:
            return e.strerror or str(e)
    return "another mailsrv answers there"


# --- the command ---------------------------------------------------------------


def add_status_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``status [--json]`` to C{subparsers}."""
    p = subparsers.add_parser(
        "status", help="show the running server's listeners, queue, connections and counters"
    )
    p.add_argument("--json", action="store_true", help="the daemon's status document as JSON")
    p.set_defaults(**{HANDLER: handle})
    return p


def query(path: Path, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any] | None:
    """The running daemon's status document, or None when none answers at C{path}."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            data = b""
            while len(data) < MAX_DOCUMENT:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("the daemon's answer is not a JSON object")
    return document


def age(seconds: float) -> str:
    """A duration as a person reads it: 45s, 12m, 3h 5m, 2d 4h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


# The counters C{mailsrv status} shows, with their labels for a person.
_MAIN_COUNTERS = (
    ("received", "mailsrv_messages_received_total"),
    ("delivered", "mailsrv_messages_delivered_total"),
    ("deferred", "mailsrv_messages_deferred_total"),
    ("bounced", "mailsrv_messages_bounced_total"),
    ("rejected", "mailsrv_messages_rejected_total"),
    ("connections", "mailsrv_connections_total"),
    ("logins", "mailsrv_logins_total"),
    ("login failures", "mailsrv_login_failures_total"),
)


def format_status(doc: dict[str, Any]) -> str:
    """The status document for a person."""
    lines = [f"mailsrv is running (pid {doc.get('pid')}, up {age(doc.get('uptime', 0))})"]
    lines.append("listeners:")
    for listener in doc.get("listeners", []):
        lines.append(f"  {listener['name']:<12} {listener['address']:<24} {listener['endpoint']}")
    queue = doc.get("queue", {})
    lines.append(_queue_line(queue.get("messages", 0), queue.get("oldest_age", 0.0)))
    open_ = {k: v for k, v in sorted(doc.get("connections", {}).items()) if v}
    described = ", ".join(f"{k} {v}" for k, v in open_.items()) or "none"
    lines.append(f"open connections: {described}")
    counters = doc.get("counters", {})
    lines.append("since start:")
    for label, name in _MAIN_COUNTERS:
        lines.append(f"  {label:<15} {int(counters.get(name, 0))}")
    return "\n".join(lines) + "\n"


def _queue_line(messages: int, oldest: float) -> str:
    if not messages:
        return "queue: empty"
    return f"queue: {messages} message{'s' if messages != 1 else ''}, oldest {age(oldest)}"


def handle(args: argparse.Namespace, config: Any, out: TextIO | None = None) -> int:
    """``mailsrv status``: 0 when the daemon answered, 1 when it is not running."""
    out = out or sys.stdout
    path = socket_path(config)
    problem = None
    try:
        doc = query(path)
    except (OSError, ValueError) as e:
        doc = None
        problem = f"no status from {path}: {e}"
        if isinstance(e, PermissionError):
            problem += " (run it as root or as the server's account)"
    if doc is not None:
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n" if args.json else "")
        if not args.json:
            out.write(format_status(doc))
        return 0
    figures = queue_figures(config.queue_dir, time.time())
    if args.json:
        doc = {
            "running": None if problem else False,
            "queue": {"messages": figures.messages, "oldest_age": figures.oldest_age},
        }
        if problem:
            doc["error"] = problem
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        if problem:
            out.write(f"mailsrv: {problem}\n")
        else:
            out.write(f"mailsrv is not running (nothing answers on {path})\n")
        out.write(_queue_line(figures.messages, figures.oldest_age) + " (on disk)\n")
    return 1
