"""
Verifier processes: the end-of-DATA verification (DKIM, ARC, DMARC:
L{mailsrv.authres.verify}) run in a pool of worker processes, so that its
pure Python work (dkimpy) neither holds the server's GIL against the
reactor thread nor stays on one core.

Each process is L{mailsrv.authres.worker_main}, started with the reactor's
C{spawnProcess} (a fresh interpreter; never a fork of a threaded server),
the configured C{[dns] nameservers} on its command line. Jobs and results
travel over its standard input and output as length-prefixed pickles
(L{worker_main.frame}): the octets of the message (read by the caller; the
spool file is unnamed, so no path can be handed over) and the SPF result
out, the L{Results} back. Only our own child's answers are unpickled, over
a pipe only it holds: trusted data.

The server side has no thread of its own: the pipes are read by the
reactor (L{_Worker}, a process protocol per process). A job goes to the
least busy process, at most L{PER_WORKER} in flight each, the rest wait in
order; at most C{max_jobs} jobs are in flight (read, waiting or running), so
a flood cannot queue unbounded octets. A process that dies fails its jobs
with L{WorkerDied} (the caller gives temperror), is logged once, and is
started anew after a back-off. A process ends at the end of its input, so
the server's death (its pipes closed by the kernel) ends it too.
L{VerifierService} stops the pool with the server: input closed, the exits
awaited for a bounded time, then SIGKILL.
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv.authres.spf import SpfResult
from mailsrv.authres.worker_main import FRAME, frame

PER_WORKER = 2  # jobs in flight in one process: one running, the next already in its pipe
STOP_WAIT = 10.0  # seconds a stopping process has to finish its jobs before SIGKILL
RESPAWN_FIRST = 0.1  # seconds before a dead process is replaced, doubled per death in a row
RESPAWN_MAX = 30.0


class WorkerDied(Exception):
    """A verifier process ended (killed, out of memory) before it answered."""


class _Worker(protocol.ProcessProtocol):
    """One verifier process: its jobs in flight, the answers read from its output."""

    def __init__(self, pool: VerifierPool) -> None:
        self.pool = pool
        self.jobs: dict[int, Callable[[bool, Any], None]] = {}
        self.buffer = bytearray()
        self.pid: int | None = None
        self.ended: defer.Deferred = defer.Deferred()
        self.alive = True

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def send(self, job_id: int, payload: bytes, done: Callable[[bool, Any], None]) -> None:
        self.jobs[job_id] = done
        self.transport.write(frame(payload))  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        answered = False
        while len(self.buffer) >= FRAME.size:
            (size,) = FRAME.unpack_from(self.buffer)
            if len(self.buffer) < FRAME.size + size:
                break
            payload = bytes(self.buffer[FRAME.size : FRAME.size + size])
            del self.buffer[: FRAME.size + size]
            job_id, ok, value = pickle.loads(payload)  # our own child's: trusted
            answered = True
            done = self.jobs.pop(job_id, None)
            if done is not None:
                done(ok, value)
        if answered:
            self.pool._answered()

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        jobs, self.jobs = self.jobs, {}
        self.pool._ended(self, reason, bool(jobs))
        for done in jobs.values():
            done(False, WorkerDied(f"the verifier process ended: {reason.value}"))
        self.ended.callback(None)


class VerifierPool:
    """
    C{workers} verifier processes, started at the first job or by L{start},
    asking C{nameservers}; C{reactor} provides C{spawnProcess} and C{callLater}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        workers: int,
        nameservers: tuple[tuple[str, int], ...] = (),
        max_jobs: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a verifier pool needs at least one process")
        self.workers = workers
        self.max_jobs = max_jobs if max_jobs is not None else PER_WORKER * workers
        self._reactor = reactor
        self._nameservers = nameservers
        self._slots = defer.DeferredSemaphore(self.max_jobs)
        self._running: list[_Worker] = []
        self._waiting: deque[tuple[int, bytes, Callable[[bool, Any], None]]] = deque()
        self._job_ids = itertools.count()
        self._respawns: list[Any] = []  # the delayed calls that start a process anew
        self._deaths = 0  # in a row, for the back-off
        self._started = False
        self._stopped = False

    def start(self) -> None:
        """Start the processes now (each builds its resolver) rather than at the first job."""
        if self._started:
            return
        self._started, self._stopped = True, False
        for _ in range(self.workers):
            self._spawn()

    def verify(
        self,
        read: Callable[[], defer.Deferred],
        spf: SpfResult,
        max_verify: int,
        timeout: float = 30.0,  # the step's (mailsrv.authres.step.TIMEOUT)
    ) -> defer.Deferred:
        """
        A Deferred of the L{Results} for the message C{read()} gives (a
        Deferred of its first C{max_verify} + 1 octets), read once a slot is
        free, its lookups ending within C{timeout} seconds of the job's
        start. It fails with L{WorkerDied} when the process died or the pool
        is stopped, with the job's error otherwise; cancelling it drops the
        job if no process has it yet.
        """
        job_id = next(self._job_ids)
        out: defer.Deferred = defer.Deferred(lambda _: self._drop(job_id))
        if not self._started and not self._stopped:
            self.start()

        def acquired(_: Any) -> None:
            if out.called:  # cancelled (timed out) while waiting
                self._slots.release()
                return
            read().addCallbacks(submit, read_failed)

        def read_failed(failure: Failure) -> None:
            self._slots.release()
            if not out.called:
                out.errback(failure)

        def submit(data: bytes) -> None:
            if out.called or self._stopped:
                self._slots.release()
                if not out.called:
                    out.errback(WorkerDied("the verifier processes are stopped"))
                return
            payload = pickle.dumps(
                (job_id, data, spf, max_verify, timeout), pickle.HIGHEST_PROTOCOL
            )
            self._waiting.append((job_id, payload, done))
            self._dispatch()

        def done(ok: bool, value: Any) -> None:
            self._slots.release()
            if out.called:
                return
            if ok:
                out.callback(value)
            else:
                out.errback(value)

        self._slots.acquire().addCallback(acquired)
        return out

    def stop(self) -> defer.Deferred:
        """
        Stop the processes: waiting jobs fail with L{WorkerDied}, running
        ones finish; a Deferred that fires once every process has exited
        (killed if it has not within L{STOP_WAIT} seconds).
        """
        self._stopped, self._started = True, False
        for call in self._respawns:
            if call.active():
                call.cancel()
        self._respawns = []
        waiting, self._waiting = self._waiting, deque()
        for _, _, done in waiting:
            done(False, WorkerDied("the verifier processes are stopped"))
        running, self._running = self._running, []
        ends = []
        for worker in running:
            if not worker.alive:
                continue
            worker.transport.closeStdin()  # type: ignore[union-attr]
            kill = self._reactor.callLater(STOP_WAIT, _kill, worker)
            worker.ended.addBoth(_cancel, kill)
            ends.append(worker.ended)
        return defer.gatherResults(ends).addCallback(lambda _: None)

    def _spawn(self) -> None:
        if self._stopped:
            return
        worker = _Worker(self)
        argv = [sys.executable, "-m", "mailsrv.authres.worker_main"]
        for host, port in self._nameservers:
            argv += [host, str(port)]
        try:
            self._reactor.spawnProcess(
                worker, sys.executable, argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: 2}
            )
        except OSError as e:
            self.log.error("cannot start a sender verification process: {error}", error=e)
            self._respawn_later()
            return
        self._running.append(worker)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand the waiting jobs to the least busy processes with room."""
        while self._waiting:
            free = [w for w in self._running if w.alive and len(w.jobs) < PER_WORKER]
            if not free:
                return
            worker = min(free, key=lambda w: len(w.jobs))
            job_id, payload, done = self._waiting.popleft()
            worker.send(job_id, payload, done)

    def _drop(self, job_id: int) -> None:
        """A cancelled job: out of the queue if no process has it yet."""
        for job in self._waiting:
            if job[0] == job_id:
                self._waiting.remove(job)
                job[2](False, defer.CancelledError())
                return

    def _answered(self) -> None:
        """A process answered: it works (the back-off starts over), and has room for more."""
        self._deaths = 0
        self._dispatch()

    def _ended(self, worker: _Worker, reason: Failure, had_jobs: bool) -> None:
        if worker not in self._running:
            return  # stopped
        self._running.remove(worker)
        self._deaths += 1
        self.log.warn(
            "a sender verification process ({pid}) ended: {why}; {jobs}starting a new one",
            pid=worker.pid,
            why=reason.value,
            jobs="its messages get temperror; " if had_jobs else "",
        )
        self._respawn_later()

    def _respawn_later(self) -> None:
        delay = min(RESPAWN_MAX, RESPAWN_FIRST * 2 ** max(0, self._deaths - 1))
        self._respawns = [c for c in self._respawns if c.active()]
        self._respawns.append(self._reactor.callLater(delay, self._spawn))


def _cancel(result: Any, call: Any) -> Any:
    """Cancel the delayed C{call} if still due; C{result} unchanged."""
    if call.active():
        call.cancel()
    return result


def _kill(worker: _Worker) -> None:
    """SIGKILL a process that did not stop in time (by its pid, through its transport)."""
    try:
        worker.transport.signalProcess("KILL")  # type: ignore[union-attr]
    except error.ProcessExitedAlready:
        pass


class VerifierService(service.Service):
    """
    Stops the verifier processes with the server. They start with the first
    message (some half a second, once), not with the server: a server that
    gets no MX mail, or one built on a fake reactor in a test, starts none.
    """

    def __init__(self, pool: VerifierPool) -> None:
        self.pool = pool

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.pool.stop()


__all__ = ["VerifierPool", "VerifierService", "WorkerDied"]
