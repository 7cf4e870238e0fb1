"""
Where the greylist (L{mailsrv.policy.greylist}) is kept between runs.

The state survives a restart (otherwise every correspondent would be delayed
again after each one), in C{data_dir/greylist/state.json}:

    {"format": "mailsrv-greylist 1",
     "pending": [[network, sender, recipient, first_seen, last_seen], ...],
     "passed": [[network, sender, recipient, passed_at, last_seen], ...],
     "clients": [[network, passes, last_counted, last_seen], ...]}

times in seconds since the epoch. A snapshot, written whole (L{write_atomic})
on the disk thread pool every C{SNAPSHOT_INTERVAL} seconds when something
changed, and once more at stop; read once at start. Why a snapshot rather
than a database: the check at RCPT is an in-memory look-up that never waits
on the disk, and what a crash can lose (at most a minute of first sightings)
costs an honest client one more retry, nothing else. A file that cannot be
read is set aside (C{state.json.corrupt}), logged, and the server starts
empty.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, task

from mailsrv.atomic import make_dirs, write_atomic
from mailsrv.logsafe import SafeLogger
from mailsrv.policy.greylist import Greylist, GreylistSettings, snapshot_of
from mailsrv.policy.networks import NetworkList

SNAPSHOT_INTERVAL = 60.0  # seconds between sweeps (and snapshots, when something changed)


class GreylistFile:
    """
    Where the greylist is kept between runs: read at start (on the
    reactor thread, before anything listens), written on the disk thread
    pool through C{run_in_thread} (a function to Deferred).
    """

    log = SafeLogger()

    def __init__(self, path: Path, run_in_thread: Callable[[Callable[[], Any]], Any]) -> None:
        self.path = path
        self._run = run_in_thread
        self._lock = defer.DeferredLock()  # one write at a time, in order

    def load_into(self, greylist: Greylist) -> None:
        """Fill C{greylist} from the file, if there is one; a bad file is set aside."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self.log.warn(
                "greylist: cannot read {path}: {error}; starting empty",
                path=str(self.path),
                error=e.strerror,
            )
            return
        try:
            greylist.restore(json.loads(text))
        except (ValueError, TypeError, KeyError) as e:
            aside = self.path.with_name(self.path.name + ".corrupt")
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = self.path
            self.log.warn(
                "greylist: {path} is not a greylist snapshot ({error}); set aside as {aside},"
                " starting empty",
                path=str(self.path),
                error=str(e)[:200],
                aside=str(aside),
            )
            return
        self.log.info(
            "greylist: read {path}: {pending} waiting, {passed} passed, {clients} clients",
            path=str(self.path),
            pending=len(greylist.pending),
            passed=len(greylist.passed),
            clients=len(greylist.clients),
        )

    def save(self, greylist: Greylist) -> defer.Deferred:
        """Write C{greylist}'s snapshot (one write at a time); fires when written or logged."""
        tables = greylist.tables()  # a copy now; the snapshot is made in the thread

        def write() -> None:
            data = json.dumps(snapshot_of(tables), separators=(",", ":")).encode()
            make_dirs(self.path.parent)
            write_atomic(self.path, data)

        def failed(failure: Any) -> None:
            greylist.dirty = True  # tried again at the next tick
            self.log.warn(
                "greylist: cannot write {path}: {error}",
                path=str(self.path),
                error=failure.getErrorMessage(),
            )

        return self._lock.run(lambda: self._run(write)).addErrback(failed)


class GreylistService(service.Service):
    """Sweeps and snapshots the greylist on the clock, and writes it once more at stop."""

    def __init__(
        self, greylist: Greylist, file: GreylistFile, interval: float = SNAPSHOT_INTERVAL
    ) -> None:
        self.greylist = greylist
        self.file = file
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = greylist.clock
        self.interval = interval

    def tick(self) -> defer.Deferred | None:
        """Forget what expired; write the state if it changed."""
        self.greylist.sweep()
        if self.greylist.dirty:
            return self.file.save(self.greylist)
        return None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self.file.save(self.greylist)


def greylist_file(config: Any, reactor: Any, pool: Any) -> GreylistFile:
    """Where C{config}'s greylist is kept: C{data_dir/greylist/state.json}."""
    from twisted.internet.threads import deferToThreadPool

    return GreylistFile(
        config.server.data_dir / "greylist" / "state.json",
        lambda f: deferToThreadPool(reactor, pool, f),
    )


def build_greylist(config: Any, reactor: Any, pool: Any) -> Greylist | None:
    """The greylist of C{config} ([policy] greylist), its saved state read; None when off."""
    policy = config.policy
    if not policy.greylist:
        return None
    settings = GreylistSettings(
        delay=float(policy.greylist_delay),
        retry_window=float(policy.greylist_retry_window),
        max_age=float(policy.greylist_max_age),
        auto_allow=policy.greylist_auto_allow,
        allow=policy.greylist_allow,
    )
    # [policy] allow: the same networks as the connection gate's (the file is
    # re-read by the network watcher, L{greylist_service}'s caller).
    allowed = NetworkList(tuple(policy.allow), policy.allow_file)
    allowed.load()
    greylist = Greylist(reactor, settings, allowed)
    greylist_file(config, reactor, pool).load_into(greylist)
    return greylist


def greylist_service(ctx: Any) -> GreylistService | None:
    """The service that sweeps and keeps C{ctx}'s greylist; None when it is off."""
    if getattr(ctx, "greylist", None) is None:
        return None
    return GreylistService(ctx.greylist, greylist_file(ctx.config, ctx.reactor, ctx.threadpool))


__all__ = [
    "GreylistFile",
    "GreylistService",
    "build_greylist",
    "greylist_file",
    "greylist_service",
]
