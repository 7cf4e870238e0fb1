"""
The relay process (``python -m mailsrv.outbound.worker``), started by the
server (L{mailsrv.outbound.process}): it runs the L{Relayer} over the queue
folder and speaks AMP with the server on descriptors 3 and 4.

It holds the queue's relay lock while it relays, so a process left from an
earlier run finishes before a new one starts. It stops when the server says
Stop, when the server's pipe closes (the server is gone) or on SIGTERM; it
ignores SIGINT, which a terminal sends to the whole process group: the
server then stops it in order.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol, stdio
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    ILogObserver,
    LogLevel,
    eventAsText,
    globalLogBeginner,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailsrv import loglines
from mailsrv.addresses.resolver import AliasWatcher, address_rules
from mailsrv.auth.passwd import PasswordFile
from mailsrv.config import parse
from mailsrv.logsafe import SafeLogger
from mailsrv.malloc import tune_malloc
from mailsrv.metrics.relaycounts import ResultCounter
from mailsrv.outbound import ipc
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.envelope import Envelope
from mailsrv.outbound.local import ServerMailboxes
from mailsrv.outbound.queue import OutboundQueue
from mailsrv.outbound.relayer import Relayer

LOCK_RETRY = 0.5  # seconds between tries for the relay lock
RELAY_NICE = 5  # a lower CPU priority than the server's


class RelaySide(ipc.QuietAMP):
    """The relay process's end of the pipes."""

    log = SafeLogger()

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.relayer: Relayer | None = None
        self.aliases: AliasWatcher | None = None
        self.queue: OutboundQueue | None = None
        self.pool: ThreadPool | None = None
        self._lock_fd: int | None = None
        self._lock_call: Any = None
        self._waiting_said = False
        self._started: defer.Deferred | None = None
        self._stop_waiters: list[defer.Deferred] = []
        self.before_exit: Any = lambda: None  # sends what is still to be said
        self.log_to_stdout: Any = lambda: None  # write log lines to standard output
        self._stopped = False

    # --- commands from the server -----------------------------------------

    @ipc.Start.responder
    def start(self, config: str, path: str, base: str, log_direct: bool = False) -> dict:
        if self.relayer is not None:
            raise RuntimeError("already started")
        settings = parse(config, path, Path(base))
        if log_direct:
            self.log_to_stdout()
        self.pool = pool = ThreadPool(minthreads=1, maxthreads=4, name="mailsrv-relay")
        pool.start()
        self.queue = OutboundQueue(settings.queue_dir, self.reactor, pool)
        addresses = address_rules(settings, self.reactor)
        if addresses.aliases is not None:
            self.aliases = AliasWatcher(
                addresses.aliases, self.reactor, pool, process="relay process"
            )
            self.aliases.startService()
        self.relayer = build_relayer(
            settings,
            queue=self.queue,
            reactor=self.reactor,
            threadpool=pool,
            mailboxes=ServerMailboxes(self, self.reactor, pool, self.queue),
            passwords=PasswordFile(settings.auth.passwd_file, self.reactor, pool),
            addresses=addresses,
        )
        self._take_lock()
        return {}

    def _take_lock(self) -> None:
        self._lock_call = None
        if self._stop_waiters or self._stopped or self.queue is None or self.relayer is None:
            return
        fd = self.queue.try_lock_relay()
        if fd is None:
            if not self._waiting_said:
                self._waiting_said = True
                self.log.warn("waiting for the relay process of an earlier run to finish")
            self._lock_call = self.reactor.callLater(LOCK_RETRY, self._take_lock)
            return
        self._lock_fd = fd
        self._started = self.relayer.start()
        self._started.addErrback(self._start_failed)

    def _start_failed(self, f: Failure) -> None:
        """The queue could not be read: exit, so that the server starts a new relay process."""
        self.log.failure("the relayer could not start", f)
        if self.transport is not None:
            self.transport.loseConnection()  # then connectionLost: shut down and exit

    @ipc.Queued.responder
    def queued(self, items: bytes) -> dict:
        if self.relayer is None or self.queue is None:
            return {}
        for queue_id, envelope, offset, data in ipc.decode(items):
            message = None if data is None else data.encode("latin-1")
            if envelope is not None:
                self._add(Envelope.from_dict(envelope, offset), message)
                continue
            # Too big to send: read it from the disk.
            assert self.pool is not None
            d = deferToThreadPool(self.reactor, self.pool, self.queue.load_envelope, queue_id)
            d.addCallback(self._add, None)
            d.addErrback(self._unreadable, queue_id)
        return {}

    def _unreadable(self, f: Failure, queue_id: str) -> None:
        self.log.failure("cannot read queued {queue_id}", f, queue_id=queue_id)

    def _add(self, env: Envelope, data: bytes | None) -> None:
        assert self.queue is not None and self.relayer is not None
        if data is not None:
            self.queue.remember(env.id, data)
        if not self.relayer.queued(env) and data is not None:
            self.queue.take_recent(env.id)  # known already: do not keep the bytes

    @ipc.Stop.responder
    def stop(self, drain: bool | None = None) -> defer.Deferred:
        return self.shutdown(bool(drain)).addCallback(lambda _: {})

    # --- stopping -----------------------------------------------------------

    def shutdown(self, drain: bool = False) -> defer.Deferred:
        """
        Stop relaying: the attempts under way record their results (with
        C{drain}, once their SMTP transactions finished); then let go of the lock.
        """
        d: defer.Deferred = defer.Deferred()
        if self._stopped:
            d.callback(None)
            return d
        self._stop_waiters.append(d)
        if len(self._stop_waiters) > 1:
            return d  # stopping already
        if self._lock_call is not None and self._lock_call.active():
            self._lock_call.cancel()
        if self.aliases is not None and self.aliases.running:
            self.aliases.stopService()
        relayer = self.relayer
        if self._started is not None and relayer is not None:
            stopping = self._started.addBoth(lambda _: relayer.stop(drain))
        else:
            stopping = defer.succeed(None)

        def release(_: Any) -> None:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if self.pool is not None and self.pool.started:
                self.pool.stop()
            self._stopped = True
            self.before_exit()
            waiters, self._stop_waiters = self._stop_waiters, []
            for w in waiters:
                w.callback(None)

        stopping.addBoth(release)
        return d

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """The server closed the pipe (after Stop, or because it is gone): exit."""
        super().connectionLost(reason)
        self.shutdown().addBoth(lambda _: self._exit())

    def _exit(self) -> None:
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:  # stopping already (SIGTERM)
            pass


def _shrink_log(item: list[Any]) -> list[Any] | None:
    namespace, level, text = item
    if len(text) < 200:
        return None
    return [namespace, level, text[: len(text) // 2] + " [cut]"]


@implementer(ILogObserver)
class LogForwarder:
    """
    A log observer that sends the events to the server, which writes them to
    its log, a turn's events in one command.
    """

    def __init__(self, proto: RelaySide, reactor: Any) -> None:
        self.proto = proto
        self.batch = ipc.Batcher(reactor, self._send, _shrink_log)

    def __call__(self, event: dict) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        level = event.get("log_level", LogLevel.info)
        namespace = event.get("log_namespace", "mailsrv.outbound.worker")
        self.batch.add([namespace, level.name, text])

    def _send(self, items: bytes) -> None:
        if self.proto.transport is not None:
            try:
                self.proto.callRemote(ipc.Log, items=items)
                return
            except Exception:  # the pipe is gone: standard error is inherited
                pass
        for namespace, level, text in ipc.decode(items):
            sys.stderr.write(f"mailsrv relay process: [{namespace}#{level}] {text}\n")


def main() -> None:
    # A terminal's hang-up reaches the whole process group; the server
    # decides what SIGHUP means and stops this process when it stops.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    tune_malloc()
    # Clients first: on a busy host the server answers SMTP, POP3 and IMAP
    # before this process relays mail that is safe on disk already.
    try:
        os.nice(RELAY_NICE)
    except OSError:
        pass
    from twisted.internet import reactor

    proto = RelaySide(reactor)
    forwarder = LogForwarder(proto, reactor)
    results = ResultCounter(proto, reactor)  # the server's metrics

    def before_exit() -> None:
        results.batch.flush()
        forwarder.batch.flush()

    proto.before_exit = before_exit

    # Without Twisted's lines per DNS query and per connection (mailsrv.loglines).
    quiet_forwarder = loglines.quiet(forwarder)

    def log_to_stdout() -> None:
        forwarder.batch.flush()
        globalLogPublisher.addObserver(loglines.quiet(textFileLogObserver(sys.stdout)))
        globalLogPublisher.removeObserver(quiet_forwarder)

    proto.log_to_stdout = log_to_stdout
    stdio.StandardIO(  # type: ignore[call-arg]
        proto, stdin=ipc.CHILD_IN, stdout=ipc.CHILD_OUT, reactor=reactor
    )
    globalLogBeginner.beginLoggingTo([quiet_forwarder, results], redirectStandardIO=False)
    reactor.addSystemEventTrigger("before", "shutdown", proto.shutdown)
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.run()


if __name__ == "__main__":
    main()
