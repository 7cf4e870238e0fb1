"""
The outbound queue on disk: one queue file per message, holding its
envelope and the message, under the queue folder.

    <queue_dir>/<id>.msg    the queue file: a line "MAILSRV-QUEUE 1 <n>", the
                            envelope as n bytes of JSON and a newline, then
                            the message (LF line ends, headers included)
    <queue_dir>/<id>.env    a newer envelope (JSON), written after an attempt
                            that left some recipients pending; it replaces
                            the one in the queue file
    <queue_dir>/tmp/        files being written
    <queue_dir>/flush       present: the running relayer retries everything now
    <queue_dir>/relay.lock  locked (flock) by the one process that relays
    <queue_dir>/<id>.hold, <id>.requeue
                            the administrator's marks (mailsrv.outbound.marks)

Every file is written under tmp/, fsynced, renamed into place, and the folder
fsynced: a queue file on disk is whole, and queuing a message costs one file
and one fsync. After an attempt that leaves recipients pending the envelope
is rewritten the same way, so a recipient confirmed by a remote server is
never sent to again. Removal unlinks the queue file first, so a crash can
leave only a stray newer envelope (removed at start-up), never a queue file
whose old envelope would send again.

Group commit: the writes of messages queued at the same time run as one batch
in the thread pool, with one fsync of the folder for the whole batch, and
their Deferreds fire together once it is done (one thread hop and one reactor
wake-up per batch instead of per message).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mailsrv.atomic import fsync_dir, make_dirs, write_atomic
from mailsrv.groupcommit import GroupCommit
from mailsrv.interfaces import IMessageSource, IOutboundQueue
from mailsrv.logsafe import SafeLogger
from mailsrv.outbound.envelope import FAILED, PENDING, SENT, Envelope, Recipient, new_queue_id
from mailsrv.outbound.marks import QueueMarks
from mailsrv.spool import BytesSource

# The envelope's names, long imported from here.
__all__ = [
    "FAILED",
    "PENDING",
    "SENT",
    "Envelope",
    "FileSource",
    "FolderState",
    "OutboundQueue",
    "QueueJob",
    "QueueStore",
    "Recipient",
    "RemoveMessage",
    "SaveEnvelope",
    "StoreMessage",
    "new_queue_id",
]

MSG_SUFFIX = ".msg"
ENV_SUFFIX = ".env"
FLUSH_FILE = "flush"
RELAY_LOCK = "relay.lock"
_COPY_CHUNK = 256 * 1024
MAX_BATCHES = 2  # batches of queue writes in the thread pool at once
LAZY_DELAY = 0.01  # seconds a removal of delivered mail waits for company
RECENT_MESSAGE_MAX = 64 * 1024  # messages kept in memory for the relayer's first attempt
RECENT_TOTAL_MAX = 16 * 1024 * 1024


QUEUE_MAGIC = b"MAILSRV-QUEUE 1 "
HEADER_MAX = 64  # the first line is short


def queue_file_head(envelope_json: bytes) -> bytes:
    """The start of a queue file: its first line and the envelope, up to the message."""
    return b"%s%d\n%s\n" % (QUEUE_MAGIC, len(envelope_json), envelope_json)


def _valid_id(queue_id: str) -> bool:
    return bool(queue_id) and all(c in "0123456789ABCDEF" for c in queue_id)


def _checked(queue_id: str) -> str:
    if not _valid_id(queue_id):
        raise FileNotFoundError(f"not a queue id: {queue_id!r}")
    return queue_id


@dataclass(frozen=True)
class StoreMessage:
    """A queue job: write a new queue file (the envelope and the message, an
    L{IMessageSource} or its bytes). Its value is None."""

    envelope: Envelope
    source: Any


@dataclass(frozen=True)
class SaveEnvelope:
    """A queue job: rewrite a message's envelope. Its value is False (and
    nothing is written) when the message has been removed meanwhile."""

    envelope: Envelope


@dataclass(frozen=True)
class RemoveMessage:
    """A queue job: remove a message (see L{QueueStore.remove}); C{sync} False
    leaves the folder's fsync out. Its value is whether the message was there."""

    queue_id: str
    sync: bool = True


QueueJob = StoreMessage | SaveEnvelope | RemoveMessage
"""A write L{QueueStore.run_batch} runs in a batch."""


@dataclass(frozen=True)
class FolderState:
    """What the relayer learns at each scan of the queue folder."""

    ids: list[str]  # every queued message
    flush: bool  # ``queue flush`` asked for a retry of everything now
    held: set[str]  # the messages on hold
    requeue: list[str]  # the messages ``queue requeue`` asked to be tried now


class QueueStore:
    """
    The blocking file operations of the queue. Every method here runs in a
    thread pool (L{OutboundQueue} sees to that) or in the admin command.
    """

    def __init__(self, queue_dir: Path | str) -> None:
        self.dir = Path(queue_dir)
        self.tmp_dir = self.dir / "tmp"
        self.marks = QueueMarks(self.dir)

    def ensure(self) -> None:
        make_dirs(self.tmp_dir)

    def message_path(self, queue_id: str) -> Path:
        return self.dir / (_checked(queue_id) + MSG_SUFFIX)

    def envelope_path(self, queue_id: str) -> Path:
        return self.dir / (_checked(queue_id) + ENV_SUFFIX)

    def _fsync_dir(self) -> None:
        fsync_dir(self.dir)

    def _write_file(self, final: Path, write: Callable[[Any], None], replace: bool = True) -> None:
        """
        Write a file under tmp/, fsync it and rename it into place. With
        C{replace} False an existing file is never overwritten (a new queue
        file whose id is taken, however unlikely: FileExistsError).
        """
        write_atomic(final, write, tmp_dir=self.tmp_dir, replace=replace, sync_dir=False)

    def store(self, envelope: Envelope, source: Any) -> None:
        """Write the queue file (envelope and message) durably."""
        self.ensure()
        self._store_file(envelope, source)
        self._fsync_dir()

    def _store_file(self, envelope: Envelope, source: Any) -> None:
        """Write and fsync the queue file, renamed into place; the folder is not fsynced."""
        head = queue_file_head(envelope.to_json())

        def copy(out: Any) -> None:
            out.write(head)
            if isinstance(source, bytes):
                out.write(source)
                return
            with source.open() as f:
                shutil.copyfileobj(f, out, _COPY_CHUNK)

        self._write_file(self.message_path(envelope.id), copy, replace=False)
        envelope.offset = len(head)

    def run_batch(self, jobs: Sequence[QueueJob]) -> list[tuple[bool, Any]]:
        """
        Run queued writes in order (L{StoreMessage}, L{SaveEnvelope},
        L{RemoveMessage}). The folder is fsynced once at the end for all of
        them (group commit); a job's result is (True, value) or (False,
        exception), and a job that needed the folder's fsync fails if that
        fsync does. A job of any other type fails with TypeError.
        """
        self.ensure()
        results: list[tuple[bool, Any]] = []
        need_sync: list[int] = []
        for i, job in enumerate(jobs):
            try:
                value, sync = self._run_job(job)
                if sync:
                    need_sync.append(i)
                results.append((True, value))
            except Exception as e:
                results.append((False, e))
        if need_sync:
            try:
                self._fsync_dir()
            except Exception as e:
                for i in need_sync:
                    results[i] = (False, e)
        return results

    def _run_job(self, job: QueueJob) -> tuple[Any, bool]:
        """Run one job of a batch: its value, and whether it needs the folder's fsync."""
        match job:
            case StoreMessage(envelope, source):
                self._store_file(envelope, source)
                return None, True
            case SaveEnvelope(envelope):
                saved = self._save_file(envelope)
                return saved, saved
            case RemoveMessage(queue_id, sync):
                found = self.remove(queue_id, sync=False)
                return found, found and sync
        raise TypeError(f"not a queue job: {job!r}")

    def save_envelope(self, envelope: Envelope) -> bool:
        """
        Rewrite an envelope durably. Returns False (and writes nothing) when
        the message has been removed meanwhile, e.g. by ``queue delete``.
        """
        if not self._save_file(envelope):
            return False
        self._fsync_dir()
        return True

    def _save_file(self, envelope: Envelope) -> bool:
        if not self.message_path(envelope.id).exists():
            return False
        self._write_file(self.envelope_path(envelope.id), lambda f: f.write(envelope.to_json()))
        return True

    def load_envelope(self, queue_id: str) -> Envelope:
        """The message's envelope: the newer one if an attempt wrote it, else the queue file's."""
        with open(self.message_path(queue_id), "rb") as f:
            line = f.readline(HEADER_MAX)
            if not line.startswith(QUEUE_MAGIC) or not line.endswith(b"\n"):
                raise ValueError(f"{queue_id}: not a queue file")
            length = int(line[len(QUEUE_MAGIC) :])
            offset = len(line) + length + 1
            try:
                newer = self.envelope_path(queue_id).read_bytes()
            except FileNotFoundError:
                data = f.read(length + 1)
                if len(data) != length + 1 or not data.endswith(b"\n"):
                    raise ValueError(f"{queue_id}: queue file cut short")
                return Envelope.from_json(data[:-1], offset)
        return Envelope.from_json(newer, offset)

    def open_message(self, envelope: Envelope) -> Any:
        """The message's queue file, positioned where the message starts."""
        f = open(self.message_path(envelope.id), "rb")
        try:
            f.seek(envelope.offset)
        except BaseException:
            f.close()
            raise
        return f

    def message_source(self, envelope: Envelope) -> FileSource:
        """The message as an L{IMessageSource}."""
        return FileSource(self.message_path(envelope.id), envelope.size, envelope.offset)

    def read_message(self, envelope: Envelope) -> bytes:
        with self.open_message(envelope) as f:
            return f.read()

    def remove(self, queue_id: str, sync: bool = True) -> bool:
        """
        Remove a message: the queue file first, so a crash never leaves it
        with an older envelope than the last one written. With C{sync} False
        the folder is not fsynced, as Postfix does for delivered mail: a kill
        -9 cannot undo the removal, only a crash of the whole machine could,
        and that means at worst a duplicate.
        """
        if not _valid_id(queue_id):
            return False
        found = False
        for p in (self.message_path(queue_id), self.envelope_path(queue_id)):
            try:
                p.unlink()
                found = True
            except FileNotFoundError:
                pass
        self.marks.forget(queue_id)
        if found and sync:
            self._fsync_dir()
        return found

    def ids(self) -> list[str]:
        """The ids of every queued message, oldest first."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        out = [n[: -len(MSG_SUFFIX)] for n in names if n.endswith(MSG_SUFFIX)]
        return sorted(i for i in out if _valid_id(i))

    def scan(self) -> tuple[list[Envelope], list[str]]:
        """Load every envelope; return them and the ids whose envelope is unreadable."""
        self.ensure()
        envelopes, bad = [], []
        for queue_id in self.ids():
            try:
                envelopes.append(self.load_envelope(queue_id))
            except (OSError, ValueError, TypeError, KeyError):
                bad.append(queue_id)
        return envelopes, bad

    def cleanup(self) -> None:
        """
        At start-up, before anything is queued or relayed: remove half-written
        temp files (never acknowledged) and newer envelopes left without their
        queue file (a crash during a removal).
        """
        self.ensure()
        names = set(os.listdir(self.dir))
        for n in names:
            if n.endswith(ENV_SUFFIX) and (n[: -len(ENV_SUFFIX)] + MSG_SUFFIX) not in names:
                (self.dir / n).unlink(missing_ok=True)
        self.marks.cleanup(names)
        for n in os.listdir(self.tmp_dir):
            (self.tmp_dir / n).unlink(missing_ok=True)

    def try_lock_relay(self) -> int | None:
        """
        Take the relayer's lock without waiting: a descriptor (close it to
        let go), or None while another process holds it. One relayer per
        queue: two would send the same messages.
        """
        self.ensure()
        fd = os.open(self.dir / RELAY_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def take_flush_request(self) -> bool:
        """Whether ``queue flush`` asked for a retry now; consumes the request."""
        try:
            (self.dir / FLUSH_FILE).unlink()
            return True
        except FileNotFoundError:
            return False

    def request_flush(self) -> None:
        make_dirs(self.dir)
        (self.dir / FLUSH_FILE).touch()

    def folder_state(self) -> FolderState:
        """The queue folder as the relayer scans it; consumes the flush and requeue requests."""
        return FolderState(
            self.ids(),
            self.take_flush_request(),
            self.marks.held(),
            self.marks.take_requeue_requests(),
        )


@implementer(IOutboundQueue)
class OutboundQueue:
    """
    The queue as the SMTP server sees it: L{enqueue} stores a message durably
    in the thread pool and then tells the listeners (the relayer) about it.
    """

    log = SafeLogger()

    def __init__(
        self, queue_dir: Path | str, reactor: Any, threadpool: Any, max_batches: int = MAX_BATCHES
    ) -> None:
        """C{threadpool} runs the disk work; None runs it in line (unit tests only)."""
        # The disk layer, for this class only: others use the calls below.
        self.store = QueueStore(queue_dir)
        self._reactor = reactor
        self._pool = threadpool
        self._listeners: list[Callable[[Envelope], Any]] = []
        self._commits: GroupCommit[QueueJob] = GroupCommit(
            self._run_batch, max_batches=max_batches, clock=reactor, lazy_delay=LAZY_DELAY
        )
        # The bytes of small messages just queued, for the relayer's first
        # attempt (it need not read them back from the disk).
        self._recent: dict[str, bytes] = {}
        self._recent_bytes = 0

    def _submit(self, job: QueueJob, lazy: bool = False) -> defer.Deferred:
        """
        Run one write in the next batch; fires with its result. A C{lazy} job
        waits up to L{LAZY_DELAY} for others to share its batch (one thread
        hop for several removals of delivered mail, which nobody waits for).
        """
        return self._commits.submit(job, lazy=lazy and self._pool is not None)

    def flush_lazy(self) -> None:
        """Start the waiting lazy jobs now (when stopping)."""
        self._commits.flush_lazy()

    def _run_batch(self, take: Callable[[], list[QueueJob]]) -> defer.Deferred:
        """One batch of writes in the thread pool: one (ok, value) per job (L{GroupCommit})."""
        return self._in_pool(self.store.run_batch, take())

    def remember(self, queue_id: str, data: bytes) -> None:
        """Keep a just-queued message's bytes for the relayer's first attempt, if room."""
        if queue_id not in self._recent and self._recent_bytes + len(data) <= RECENT_TOTAL_MAX:
            self._recent[queue_id] = data
            self._recent_bytes += len(data)

    def take_recent(self, queue_id: str) -> bytes | None:
        """The message's bytes if it was queued lately and is small (once), else None."""
        data = self._recent.pop(queue_id, None)
        if data is not None:
            self._recent_bytes -= len(data)
        return data

    def _in_pool(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self._pool is None:  # tests on a fake clock: run in line
            return defer.maybeDeferred(f, *args)
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def add_listener(self, callback: Callable[[Envelope], Any]) -> None:
        """Call C{callback(envelope)} after each message is queued."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[Envelope], Any]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def enqueue(
        self,
        sender: str,
        recipients: Iterable[str],
        source: Any,
        *,
        smtputf8: bool = False,
        queue_id: str | None = None,
    ) -> defer.Deferred:
        """
        Store the message and its envelope durably; fire with the queue id.
        C{smtputf8}: received with SMTPUTF8 (RFC 6531), kept in the envelope.
        C{queue_id}: the id the message was received under (one id in the log
        from intake to the last delivery), or None for a new one.
        """
        now = self._reactor.seconds()
        rcpts = list(dict.fromkeys(recipients))  # once each, in order
        if not rcpts:
            return defer.fail(ValueError("no recipients"))
        envelope = Envelope(
            id=queue_id if queue_id and _valid_id(queue_id) else new_queue_id(time.time()),
            sender=sender or "",
            recipients=[Recipient(r) for r in rcpts],
            created=now,
            next_attempt=now,
            size=source.size,
            smtputf8=smtputf8,
        )
        data: Any = source
        if (
            isinstance(source, BytesSource) or getattr(source, "in_memory", False)
        ) and source.size <= RECENT_MESSAGE_MAX:
            with source.open() as f:  # in memory: no disk to wait for
                data = f.read()
        d = self._submit(StoreMessage(envelope, data))

        def stored(_: None) -> str:
            if isinstance(data, bytes):
                self.remember(envelope.id, data)
            # No line of its own: the caller's names the queue id (the SMTP
            # server's "accepted ... queued=ID", the relayer's DSN line), and
            # each line costs the reactor as much as a reply.
            for cb in list(self._listeners):
                try:
                    cb(envelope)
                except Exception:
                    self.log.failure("queue listener failed for {queue_id}", queue_id=envelope.id)
            return envelope.id

        return d.addCallback(stored)

    def save(self, envelope: Envelope) -> defer.Deferred:
        """Rewrite an envelope durably; fires with False if the message is gone."""
        return self._submit(SaveEnvelope(envelope))

    def remove(self, queue_id: str, sync: bool = True) -> defer.Deferred:
        """Remove a message (see L{QueueStore.remove}); fires with whether it was there."""
        self.take_recent(queue_id)
        return self._submit(RemoveMessage(queue_id, sync), lazy=not sync)

    def scan(self) -> defer.Deferred:
        return self._in_pool(self.store.scan)

    def poll(self) -> defer.Deferred:
        """Fire with the L{FolderState}: the ids on disk and the administrator's requests."""
        return self._in_pool(self.store.folder_state)

    # --- blocking calls, for a thread (or for start-up and shutdown) --------
    # What the relayer, the relay process and the server need of the disk
    # layer, so that none of them reaches through the queue to it.

    def cleanup(self) -> None:
        """At start-up, before anything is queued or relayed: see L{QueueStore.cleanup}."""
        self.store.cleanup()

    def try_lock_relay(self) -> int | None:
        """Take the relayer's lock without waiting: see L{QueueStore.try_lock_relay}."""
        return self.store.try_lock_relay()

    def is_held(self, queue_id: str) -> bool:
        """Whether the message is on hold now (L{mailsrv.outbound.marks})."""
        return self.store.marks.is_held(queue_id)

    def held(self) -> set[str]:
        """The ids of the messages on hold now."""
        return self.store.marks.held()

    def load_envelope(self, queue_id: str) -> Envelope:
        """The message's envelope as last written (FileNotFoundError: it is gone)."""
        return self.store.load_envelope(queue_id)

    def open_message(self, envelope: Envelope) -> Any:
        """The message's queue file, positioned where the message starts."""
        return self.store.open_message(envelope)

    def message_source(self, envelope: Envelope) -> FileSource:
        """The message as an L{IMessageSource} (opens nothing yet)."""
        return self.store.message_source(envelope)

    def save_in_line(self, envelope: Envelope) -> bool:
        """L{save} outside any batch, blocking (when the thread pool is gone)."""
        return self.store.save_envelope(envelope)

    def remove_in_line(self, queue_id: str, sync: bool = True) -> bool:
        """L{remove} outside any batch, blocking (when the thread pool is gone)."""
        return self.store.remove(queue_id, sync)

    def write_temp(self, data: bytes, prefix: str) -> Path:
        """
        C{data} in a new file under the queue's tmp/ (mode 0600, not synced),
        for another process to read; the caller removes it, and start-up
        removes any left behind.
        """
        self.store.ensure()
        path = self.store.tmp_dir / f"{prefix}.{os.getpid()}.{secrets.token_hex(8)}"
        write_atomic(path, data, sync_dir=False)
        return path


@implementer(IMessageSource)
class FileSource:
    """
    A message in a file, from C{offset} to the end, as an L{IMessageSource}
    (a queue file, for local delivery and DSNs).
    """

    def __init__(self, path: Path | str, size: int, offset: int = 0) -> None:
        self.path = Path(path)
        self.size = size
        self.offset = offset

    def open(self) -> Any:
        f = open(self.path, "rb")
        if self.offset:
            try:
                f.seek(self.offset)
            except BaseException:
                f.close()
                raise
        return f
