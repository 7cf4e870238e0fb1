"""
The relayer in a process of its own, as Postfix runs its qmgr and smtp
apart from smtpd: the server takes mail in on one core while the relay
process delivers the queue on another.

The server spawns ``python -m mailsrv.outbound.worker``, gives it the
settings, tells it of each message it queues, stores the local deliveries it
asks for (only the server writes mailboxes and their indexes) and writes its
log events into the server's own log. If the relay process dies it is started
again after a back-off; the queue on disk is the only state they share, so
nothing is lost meanwhile. At shutdown the server asks it to stop and waits
for the attempts under way to be recorded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import (
    FileLogObserver,
    InvalidLogLevelError,
    Logger,
    LogLevel,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv import localdelivery, loglines, routing
from mailsrv.logsafe import SafeLogger
from mailsrv.outbound import ipc
from mailsrv.outbound.queue import Envelope, FileSource, OutboundQueue
from mailsrv.replies import cause_of
from mailsrv.spool import BytesSource
from mailsrv.store.quota import OVER_QUOTA, QuotaExceeded
from mailsrv.store.target import MailboxTarget

RESTART_MIN = 1.0  # seconds before a relay process that died is started again
RESTART_MAX = 60.0
STABLE_AFTER = 60.0  # a process that ran this long resets the back-off
STOP_TIMEOUT = 15.0  # then the relay process is killed
BACKLOG_NOTICES = 10_000  # notices (without bytes) sent while the relay process lags
PROFILE_ENV = "MAILSRV_RELAY_PROFILE"  # a file: run the relay process under cProfile


class ServerSide(ipc.QuietAMP):
    """The server's end of the pipes: local deliveries and log events."""

    log = SafeLogger()

    def __init__(
        self, store: Any, queue_dir: Path, quotas: Any = None, metrics: Any = None
    ) -> None:
        super().__init__()
        self.store = store
        self.quotas = quotas  # the users' storage limits (mailsrv.store.quota), or None
        self.metrics = metrics  # mailsrv.metrics.registry.MailMetrics, or None
        self.queue_dirs = {os.path.normpath(queue_dir), os.path.normpath(queue_dir / "tmp")}
        self._loggers: dict[str, Logger] = {}

    @ipc.DeliverLocal.responder
    def deliver_local(
        self,
        recipient: str,
        sender: str,
        size: int,
        path: str | None = None,
        offset: int | None = None,
        data: bytes | None = None,
    ) -> defer.Deferred:
        source: Any
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            # The answer could not reach the relay process, which would then
            # count the delivery as failed and make it again next time.
            return defer.fail(ipc.LocalDeliveryFailed("the server is stopping"))
        if data is not None:
            source = BytesSource(data)
        elif path is not None and os.path.dirname(os.path.normpath(path)) in self.queue_dirs:
            source = FileSource(path, size, offset or 0)
        else:
            return defer.fail(ipc.LocalDeliveryFailed(f"not a queue file: {path!r}"))
        if self.store is None:
            return defer.fail(ipc.LocalDeliveryFailed("no local mailboxes"))

        def failed(f: Failure) -> None:
            if f.check(QuotaExceeded):  # recorded as 452 4.2.2 (mailsrv.outbound.local)
                raise ipc.LocalDeliveryFailed(OVER_QUOTA)
            raise ipc.LocalDeliveryFailed(cause_of(f.value) if f.value else f.getErrorMessage())

        route = routing.queued_mailbox(recipient)
        if not isinstance(route, routing.Mailbox):
            return defer.fail(ipc.LocalDeliveryFailed(f"not routed to a mailbox: {route}"))
        return localdelivery.deliver(
            MailboxTarget(self.store, self.quotas), route, source, sender
        ).addCallbacks(lambda _: {}, failed)

    @ipc.Counted.responder
    def counted(self, items: bytes) -> dict:
        if self.metrics is not None:
            for relay, result in ipc.decode(items):
                self.metrics.delivery_result(str(relay), str(result))
        return {}

    @ipc.Log.responder
    def log_events(self, items: bytes) -> dict:
        # The texts come formatted from the relay process's SafeLoggers, their
        # fields escaped there: a plain Logger passes them on as they are (a
        # SafeLogger would escape the escapes' backslashes again).
        for namespace, level, text in ipc.decode(items):
            logger = self._loggers.get(namespace)
            if logger is None:
                logger = self._loggers[namespace] = Logger(namespace=namespace)
            try:
                lvl = LogLevel.levelWithName(level)
            except InvalidLogLevelError:
                lvl = LogLevel.info
            logger.emit(lvl, "{text}", text=text)
        return {}


def _shrink_queued(item: list[Any]) -> list[Any] | None:
    """A notice without the message's bytes, then without its envelope: the disk has both."""
    queue_id, envelope, offset, data = item
    if data is not None:
        return [queue_id, envelope, offset, None]
    if envelope is not None:
        return [queue_id, None, offset, None]
    return None


@implementer(IPushProducer)
class RelayProcessProtocol(protocol.ProcessProtocol):
    """One run of the relay process: its pipes carry AMP."""

    log = SafeLogger()

    def __init__(self, amp_protocol: ServerSide, reactor: Any) -> None:
        self.amp = amp_protocol
        self.ended: defer.Deferred = defer.Deferred()
        self.reason: Failure | None = None
        self.notices = ipc.Batcher(reactor, self._send_notices, _shrink_queued)
        self.backlog = False  # the relay process is not keeping up with its pipe
        self.backlog_notices = 0

    def _send_notices(self, items: bytes) -> None:
        if self.amp.transport is None:
            return  # gone: the next relay process finds the messages on disk
        try:
            self.amp.callRemote(ipc.Queued, items=items)
        except Exception:
            self.log.failure("could not tell the relay process of queued mail")

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()  # nothing to read on its standard input
        self.amp.makeConnection(ipc.PipeTransport(self.transport))
        # The pipe tells us when the relay process does not keep up with it
        # (its buffer fills): notices then go without the messages' bytes,
        # and after BACKLOG_NOTICES of those, not at all until it catches up
        # (it finds the messages in the queue folder at its next look).
        writer: Any = getattr(self.transport, "pipes", {}).get(ipc.CHILD_IN)
        register = getattr(writer, "registerProducer", None)  # Twisted's pipe writer
        if register is not None:
            register(self, True)

    def notice(self, item: list[Any]) -> None:
        """Tell the relay process of a queued message, as far as its pipe allows."""
        if self.backlog:
            self.backlog_notices += 1
            if self.backlog_notices > BACKLOG_NOTICES:
                return
            item = item[:3] + [None]
        self.notices.add(item)

    # IPushProducer, for the pipe to the relay process

    def pauseProducing(self) -> None:
        self.backlog = True

    def resumeProducing(self) -> None:
        self.backlog = False
        self.backlog_notices = 0

    def stopProducing(self) -> None:
        self.backlog = True

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == ipc.CHILD_OUT:
            self.amp.dataReceived(data)

    def childConnectionLost(self, childFD: int) -> None:
        pipe = self.amp.transport
        if childFD == ipc.CHILD_IN and isinstance(pipe, ipc.PipeTransport):
            pipe.disconnecting = True  # nothing more can be written
        if childFD == ipc.CHILD_OUT:
            self.amp.connectionLost(Failure(error.ConnectionDone("relay process closed its pipe")))

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason  # ProcessDone or ProcessTerminated: a Failure either way
        self.ended.callback(None)


class RelayProcessService(service.Service):
    """Runs the relay process while the server runs; see the module docstring."""

    log = SafeLogger()

    def __init__(self, ctx: Any, queue: OutboundQueue, argv: list[str] | None = None) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.reactor = ctx.reactor
        self.queue = queue
        self.argv = argv or [sys.executable, "-m", "mailsrv.outbound.worker"]
        profile = os.environ.get(PROFILE_ENV)
        if profile and argv is None:  # benchmarks/relay_bench.py --profile-relay
            self.argv = [sys.executable, "-m", "cProfile", "-o", profile] + self.argv[1:]
        self.proto: RelayProcessProtocol | None = None
        self._retiring: RelayProcessProtocol | None = None  # stopping for a reload
        self._restart: Any = None
        self._delay = RESTART_MIN
        self._started_at = 0.0
        self.setName("outbound")

    def startService(self) -> None:
        super().startService()
        self.queue.add_listener(self.queued)
        self._spawn()

    def _spawn(self) -> None:
        self._restart = None
        if not self.running:
            return
        proto = RelayProcessProtocol(
            ServerSide(
                self.ctx.store,
                self.config.queue_dir,
                getattr(self.ctx, "quota", None),
                getattr(self.ctx, "metrics", None),
            ),
            self.reactor,
        )
        try:
            self.reactor.spawnProcess(
                proto,
                self.argv[0],
                self.argv,
                env=os.environ.copy(),
                childFDs={0: "w", 1: 1, 2: 2, ipc.CHILD_IN: "w", ipc.CHILD_OUT: "r"},
            )
        except OSError as e:
            self.log.error("cannot start the relay process: {why}", why=str(e))
            self._again()
            return
        self.proto = proto
        self._started_at = self.reactor.seconds()
        self.log.info(
            "relay process started (pid {pid})", pid=getattr(proto.transport, "pid", None)
        )
        proto.ended.addCallback(self._ended, proto)
        base = self.config.base_dir or Path.cwd()
        d = proto.amp.callRemote(
            ipc.Start,
            config=self.config.source,
            path=self.config.path,
            base=str(base),
            log_direct=logs_to_stdout(),
        )
        d.addErrback(self._start_failed, proto)

    def _start_failed(self, f: Failure, proto: RelayProcessProtocol) -> None:
        if proto.reason is None and proto.transport is not None:
            # Still running: it could not use the settings.
            self.log.failure("the relay process did not start", f)
            proto.transport.signalProcess("TERM")

    def restart(self, ctx: Any) -> None:
        """
        Use the settings of C{ctx} (a reload): the running relay process is
        stopped as at a stop (it records the attempts under way, then exits)
        and a new one starts with them at once. The new one takes the
        queue's relay lock only once the old one let it go, and reads the
        messages queued meanwhile from the queue folder: the queue stays
        consistent, as across a restart of the server.
        """
        self.ctx = ctx
        self.config = ctx.config
        proto = self.proto
        if not self.running or proto is None or self._retiring is not None:
            return  # the next relay process started gets the new settings
        self.log.info("restarting the relay process with the new settings")
        self.proto = None  # notices of mail queued meanwhile: the new one reads the folder
        self._retiring = proto
        self._stop(proto, drain=True)

    def _ended(self, _: None, proto: RelayProcessProtocol) -> None:
        reason = proto.reason
        assert reason is not None
        if proto is self.proto:
            self.proto = None
        if proto is self._retiring:
            self._retiring = None
            if self.running:
                self._spawn()
            return
        if not self.running:
            self.log.info("relay process stopped")
            return
        if self.reactor.seconds() - self._started_at >= STABLE_AFTER:
            self._delay = RESTART_MIN
        self.log.error(
            "relay process ended ({why}); starting it again in {delay:.0f}s",
            why=reason.getErrorMessage(),
            delay=self._delay,
        )
        self._again()

    def _again(self) -> None:
        self._restart = self.reactor.callLater(self._delay, self._spawn)
        self._delay = min(self._delay * 2, RESTART_MAX)

    def queued(self, env: Envelope) -> None:
        """The server queued a message: tell the relay process (it reads the disk otherwise)."""
        data = self.queue.take_recent(env.id)
        proto = self.proto
        if proto is None or proto.amp.transport is None:
            return  # it finds the message in the queue folder when it starts
        proto.notice(
            [
                env.id,
                env.to_dict(),
                env.offset,
                None if data is None else data.decode("latin-1"),
            ]
        )

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.queue.remove_listener(self.queued)
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        waits = []
        retiring = self._retiring
        if retiring is not None:
            waits.append(retiring.ended)  # asked to stop already, by a reload
        if self.proto is not None:
            waits.append(self._stop(self.proto))
        return defer.DeferredList(waits)

    def _stop(self, proto: RelayProcessProtocol, drain: bool = False) -> defer.Deferred:
        """
        Ask C{proto}'s process to stop (killed after L{STOP_TIMEOUT}); fires
        once it ended. With C{drain} (a reload), its SMTP transactions under
        way finish first (L{ipc.Stop}), within L{ipc.DRAIN_GRACE} more.
        """
        ended = proto.ended
        timeout = STOP_TIMEOUT + (ipc.DRAIN_GRACE if drain else 0.0)

        def kill() -> None:
            self.log.warn("relay process did not stop in {t:.0f}s; killing it", t=timeout)
            try:
                if proto.transport is not None:
                    proto.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

        timer = self.reactor.callLater(timeout, kill)
        proto.notices.flush()
        stopped = defer.maybeDeferred(
            proto.amp.callRemote, ipc.Stop, **({"drain": True} if drain else {})
        )

        # Once it has recorded its last results, closing its pipe lets it exit.
        def close(_: Any) -> None:
            if proto.amp.transport is not None:
                proto.amp.transport.loseConnection()

        stopped.addBoth(close)
        return ended.addBoth(lambda _: timer.cancel() if timer.active() else None)


def logs_to_stdout() -> bool:
    """
    Whether this process's only log observer is twistd's text log on standard
    output (``twistd -n``, systemd): the relay process, which inherits that
    descriptor, then writes its lines there itself, in the same format. With
    any other set-up (a log file twistd rotates, syslog, several observers)
    its events come here and go through this process's observers.
    """
    observers = [loglines.unwrapped(o) for o in getattr(globalLogPublisher, "_observers", ())]
    observers = [o for o in observers if not getattr(o, "counts_only", False)]  # the metrics
    if len(observers) != 1 or not isinstance(observers[0], FileLogObserver):
        return False
    out = getattr(observers[0], "_outFile", None)
    try:
        return out is not None and out.fileno() == 1
    except (AttributeError, OSError, ValueError):
        return False


def open_queue(config: Any, reactor: Any, threadpool: Any) -> OutboundQueue:
    """The queue the SMTP server fills and the relay process works through."""
    queue = OutboundQueue(config.queue_dir, reactor, threadpool)
    lock = queue.try_lock_relay()
    if lock is not None:
        # No relay process is left from an earlier run (it would hold the
        # lock while it finishes): half-written files can go.
        try:
            queue.cleanup()
        finally:
            os.close(lock)
    return queue


def relay_process_service(ctx: Any) -> RelayProcessService:
    """The relay process, working through C{ctx.queue} (from L{open_queue})."""
    return RelayProcessService(ctx, ctx.queue)
