"""
The administrator's marks on queued messages: on hold, and asked to be
requeued. Each mark is an empty file beside the message's queue file:

    <queue_dir>/<id>.hold       the message is on hold: never attempted, and
                                so never expired or bounced, until released
    <queue_dir>/<id>.requeue    a request to the running relayer: the next
                                attempt now and the back-off from the start

A mark is one atomic change on disk (a create with O_EXCL, or an unlink,
then an fsync of the folder), so a crash leaves a message held or not,
never half of it, and the admin command never rewrites an envelope that
the relayer may be writing at the same moment. This is Postfix's hold
queue (``postsuper -h``/``-H``) and ``postsuper -r``, without moving the
message: a move would be two renames (the queue file and the newer
envelope) that a crash could split.

The relayer reads the marks: it checks the hold mark (in its thread pool)
right before each retry and at its start, and looks at every mark at each scan of the
folder, so hold, release and requeue take effect without a restart, and a
mark made while the server is stopped takes effect when it starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from mailsrv.atomic import fsync_dir

HOLD_SUFFIX = ".hold"
REQUEUE_SUFFIX = ".requeue"
MSG_SUFFIX = ".msg"  # the queue file (mailsrv.outbound.queue)


def _valid_id(queue_id: str) -> bool:
    return bool(queue_id) and all(c in "0123456789ABCDEF" for c in queue_id)


def _create(path: Path) -> bool:
    """Create an empty file without following a symlink; False when it was there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(path, flags, 0o600))
    except FileExistsError:
        return False
    return True


class QueueMarks:
    """The hold and requeue marks of the messages in one queue folder."""

    def __init__(self, queue_dir: Path | str) -> None:
        self.dir = Path(queue_dir)

    def _path(self, queue_id: str, suffix: str) -> Path:
        if not _valid_id(queue_id):
            raise FileNotFoundError(f"not a queue id: {queue_id!r}")
        return self.dir / (queue_id + suffix)

    def _queued(self, queue_id: str) -> bool:
        return _valid_id(queue_id) and (self.dir / (queue_id + MSG_SUFFIX)).exists()

    def hold(self, queue_id: str) -> bool:
        """Put a queued message on hold (durably); False when there is no such message."""
        if not self._queued(queue_id):
            return False
        path = self._path(queue_id, HOLD_SUFFIX)
        if _create(path) and not self._queued(queue_id):
            path.unlink(missing_ok=True)  # delivered and removed meanwhile
            return False
        fsync_dir(self.dir)
        return True

    def release(self, queue_id: str) -> bool:
        """Take the hold off (durably); False when the message was not on hold."""
        try:
            self._path(queue_id, HOLD_SUFFIX).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.dir)
        return True

    def is_held(self, queue_id: str) -> bool:
        return _valid_id(queue_id) and self._path(queue_id, HOLD_SUFFIX).exists()

    def held(self) -> set[str]:
        """The ids of every message on hold."""
        return self._ids(HOLD_SUFFIX)

    def request_requeue(self, queue_id: str) -> bool:
        """
        Ask for the next attempt now, with the back-off from the start, and
        release the hold (as ``postsuper -r``); False when there is no such
        message.
        """
        if not self._queued(queue_id):
            return False
        _create(self._path(queue_id, REQUEUE_SUFFIX))
        self._path(queue_id, HOLD_SUFFIX).unlink(missing_ok=True)
        fsync_dir(self.dir)
        return True

    def take_requeue_requests(self) -> list[str]:
        """The ids asked to be requeued since the last call; consumes the requests."""
        taken = []
        for queue_id in sorted(self._ids(REQUEUE_SUFFIX)):
            try:
                self._path(queue_id, REQUEUE_SUFFIX).unlink()
            except FileNotFoundError:
                continue
            taken.append(queue_id)
        return taken

    def forget(self, queue_id: str) -> None:
        """The message is removed: its marks go too (after its queue file)."""
        for suffix in (HOLD_SUFFIX, REQUEUE_SUFFIX):
            self._path(queue_id, suffix).unlink(missing_ok=True)

    def cleanup(self, names: set[str]) -> None:
        """At start-up: remove the marks left without their queue file (C{names}: the folder's)."""
        for n in names:
            for suffix in (HOLD_SUFFIX, REQUEUE_SUFFIX):
                if n.endswith(suffix) and (n[: -len(suffix)] + MSG_SUFFIX) not in names:
                    (self.dir / n).unlink(missing_ok=True)

    def _ids(self, suffix: str) -> set[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return set()
        ids = (n[: -len(suffix)] for n in names if n.endswith(suffix))
        return {i for i in ids if _valid_id(i)}
