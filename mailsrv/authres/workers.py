"""
Verifier processes: the end-of-DATA verification (DKIM, ARC, DMARC:
L{mailsrv.authres.verify}) run in a pool of worker processes, so that its
pure Python work (dkimpy) neither holds the server's GIL against the
reactor thread nor stays on one core.

The processes are started with the "spawn" method (a fresh interpreter;
never a fork of a threaded server) and each builds, once, its own
L{Resolver} (the configured C{[dns] nameservers}, with its cache) and
L{Dmarc} evaluator. A job takes the message's octets (read from the spool
in a pool thread by the caller; the spool file is unnamed, so no path can
be handed over) and the SPF result, and returns the results, pickled.

On the server's side nothing blocks: a job's completion comes back to the
reactor with C{callFromThread}. At most C{max_jobs} jobs are in flight (read,
queued or running), so a flood cannot queue unbounded octets. A worker that
dies fails its jobs with L{WorkerDied} (the caller gives temperror) and the
pool is built anew for the next job. L{VerifierService} shuts the pool down
with the server, its processes gone when its C{stopService} has fired.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailsrv.authres.dmarc import Dmarc
from mailsrv.authres.resolver import Resolver
from mailsrv.authres.spf import SpfResult
from mailsrv.authres.verify import Results, verify_message

PARENT_CHECK = 1.0  # seconds between a verifier process's looks for its server


class WorkerDied(Exception):
    """A verifier process ended (killed, out of memory) before it answered."""


class VerifierPool:
    """
    C{workers} verifier processes, started at the first job or by L{start},
    asking C{nameservers}; C{reactor} provides C{callFromThread}.
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
        self.max_jobs = max_jobs if max_jobs is not None else 2 * workers
        self._reactor = reactor
        self._nameservers = nameservers
        self._slots = defer.DeferredSemaphore(self.max_jobs)
        self._executor: ProcessPoolExecutor | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the processes now (each builds its resolver) rather than at the first job."""
        executor = self._current()
        for _ in range(self.workers):
            executor.submit(_ready)

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
        free, its lookups ending within C{timeout} seconds of the job's start. It fails with L{WorkerDied} when the process died, with the
        job's error otherwise; cancelling it cancels the job if not yet begun.
        """
        futures: list[Future] = []

        def cancel(_: defer.Deferred) -> None:
            for future in futures:
                future.cancel()

        out: defer.Deferred = defer.Deferred(cancel)

        def acquired(_: Any) -> None:
            if out.called:  # cancelled (timed out) while waiting
                self._slots.release()
                return
            read().addCallbacks(submit, read_failed)

        def read_failed(failure: Any) -> None:
            self._slots.release()
            if not out.called:
                out.errback(failure)

        def submit(data: bytes) -> None:
            if out.called or self._stopped:
                self._slots.release()
                if not out.called:
                    out.errback(WorkerDied("the verifier processes are stopped"))
                return
            executor = self._current()
            try:
                try:
                    future = executor.submit(_verify_job, data, spf, max_verify, timeout)
                except BrokenProcessPool:
                    # It broke before its jobs told us: a new pool, once.
                    self._broken(executor)
                    executor = self._current()
                    future = executor.submit(_verify_job, data, spf, max_verify, timeout)
            except (BrokenProcessPool, RuntimeError, OSError) as e:
                self._slots.release()
                out.errback(WorkerDied(f"no verifier process: {e}"))
                return
            futures.append(future)
            future.add_done_callback(lambda f: self._reactor.callFromThread(done, executor, f))

        def done(executor: ProcessPoolExecutor, future: Future) -> None:
            self._slots.release()
            try:
                results = future.result()
            except CancelledError:
                if not out.called:  # dropped by a pool that broke or stopped
                    out.errback(WorkerDied("the job was dropped"))
                return
            except BrokenProcessPool as e:
                self._broken(executor)
                if not out.called:
                    out.errback(WorkerDied(str(e)))
                return
            except BaseException as e:
                if not out.called:
                    out.errback(e)
                return
            if not out.called:
                out.callback(results)

        self._slots.acquire().addCallback(acquired)
        return out

    def stop(self) -> defer.Deferred:
        """
        Stop the processes: queued jobs cancelled, running ones finished; a
        Deferred that fires once every process has exited.
        """
        self._stopped = True
        executor, self._executor = self._executor, None
        if executor is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()

        def shut_down() -> None:
            executor.shutdown(wait=True, cancel_futures=True)
            self._reactor.callFromThread(d.callback, None)

        # shutdown(wait=True) joins the processes: a thread of its own, not the reactor's.
        threading.Thread(target=shut_down, name="verifier-shutdown", daemon=True).start()
        return d

    def _current(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._stopped = False
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self._nameservers, os.getpid()),
            )
        return self._executor

    def _broken(self, executor: ProcessPoolExecutor) -> None:
        """C{executor} lost a process: logged once, and the next job gets a new pool."""
        if self._executor is not executor:
            return  # already replaced
        self._executor = None
        self.log.warn(
            "a sender verification process died: its messages get temperror; starting new processes"
        )
        executor.shutdown(wait=False, cancel_futures=True)


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


# In a verifier process only: its resolver and DMARC evaluator, built once
# by the pool's initializer (a process's own state; never set in the server).
_verifier: tuple[Resolver, Dmarc] | None = None


def _start_worker(nameservers: tuple[tuple[str, int], ...], server: int) -> None:
    global _verifier
    # The server's own signal handlers stop it; a ^C on its terminal must not
    # break the pool under it (the process group gets the SIGINT too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(server,), name="server-watch", daemon=True).start()
    _verifier = (Resolver(nameservers), Dmarc())


def _end_with(server: int) -> None:
    """
    End this process when the server has gone without stopping it (killed):
    a worker holds both ends of its job queue, so it would wait forever.
    """
    while os.getppid() == server:  # (once the server is gone, another process adopts us)
        time.sleep(PARENT_CHECK)
    os._exit(0)


def _ready() -> None:
    """A job that does nothing: it makes the pool start a process."""


def _verify_job(data: bytes, spf: SpfResult, max_verify: int, timeout: float) -> Results:
    assert _verifier is not None, "not in a verifier process"
    resolver, dmarc = _verifier
    return verify_message(data, spf, resolver, dmarc, max_verify, timeout)


__all__ = ["VerifierPool", "VerifierService", "WorkerDied"]
