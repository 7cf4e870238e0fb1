"""
Training the spam filter from what users file over IMAP, as Dovecot's
IMAPSieve antispam setup does (Pigeonhole's imapsieve with
C{imapsieve_mailbox1_name = Junk}, C{causes = COPY}, and
C{imapsieve_mailbox2_from = Junk}, C{name = *}, C{causes = COPY}):

  - a message copied or moved (COPY, MOVE, UID COPY, UID MOVE) into Junk
    is learnt as spam;
  - one copied or moved out of Junk into any folder but Trash is learnt as
    ham (deleting a spam is no sign it was ham; Dovecot's report-ham script
    stops on Trash too).

An APPEND into Junk is not learnt: Dovecot's setup names COPY as the only
cause (MOVE is a COPY there), and an APPEND is a client saving a message,
not a user judging one that was delivered.

The rule (L{learn_class}) and the work are apart from the daemons: a
L{IMessageTrainer} learns one message (rspamd, spamd or a command:
L{mailsrv.filter.trainers}), and L{TrainingQueue} runs the learning after
the IMAP command has answered, so it never delays or fails the command: it
reads each message from the store on the disk thread pool, at most
C{concurrency} at once, each within C{timeout}; at most C{max_queued}
wait, and more are dropped with a log line. Each outcome is logged. A
Sieve C{fileinto} could call the same queue later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Interface

from mailsrv.filter.step import JUNK_FOLDER
from mailsrv.logsafe import SafeLogger

SPAM, HAM = "spam", "ham"
TRASH_FOLDER = "Trash"
MAX_MESSAGE_SIZE = 10 * 1024 * 1024  # bigger messages are not learnt (rspamd's and spamc's
# own limits are smaller by default: spamc skips messages over 500 KB)


class IMessageTrainer(Interface):
    """Something that teaches a spam filter one message (rspamd, spamd, a command)."""

    def learn(message: bytes, message_class: str, user: str) -> defer.Deferred:
        """
        Learn C{message} (the whole message, CRLF line ends) as C{message_class}
        (L{SPAM} or L{HAM}) for C{user}. Fires with a short outcome for the
        log ("learnt", "already learnt"), or fails with
        L{mailsrv.filter.verdict.FilterError}. Cancelling it stops the work.
        """


def learn_class(source: str, target: str) -> str | None:
    """What a message copied from folder C{source} into C{target} is learnt as, if anything."""
    if target == source:
        return None
    if target == JUNK_FOLDER:
        return SPAM
    if source == JUNK_FOLDER and target != TRASH_FOLDER:
        return HAM
    return None


@dataclass(frozen=True)
class _Job:
    user: str
    folder: str
    uid: int
    message_class: str


class TrainingQueue:
    """
    The learning that follows IMAP copies and moves, in the background and
    bounded (see the module docstring). C{run(f, *args)} runs C{f} on the
    disk thread pool; C{store} is the L{mailsrv.interfaces.IMailStore}.
    """

    log = SafeLogger()

    def __init__(
        self,
        trainer: IMessageTrainer,
        store: Any,
        run: Callable[..., defer.Deferred],
        clock: Any,
        timeout: float,
        concurrency: int = 2,
        max_queued: int = 1000,
    ) -> None:
        self.trainer = trainer
        self.store = store
        self.run = run
        self.clock = clock
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_queued = max_queued
        self._waiting: deque[_Job] = deque()
        self._running = 0
        self._idle: list[defer.Deferred] = []

    def filed(self, user: str, source: str, target: str, uids: Sequence[int]) -> None:
        """
        Messages were copied or moved from C{source} into C{target}, where
        they now have C{uids}: learn them if the rule says so. Returns at once.
        """
        message_class = learn_class(source, target)
        if message_class is None or not uids:
            return
        # What can start at once, and what may wait.
        room = self.max_queued - len(self._waiting) + max(0, self.concurrency - self._running)
        if room < len(uids):
            self.log.warn(
                "learning queue full: {dropped} of {count} messages filed into {folder} "
                "by {user} not learnt as {message_class}",
                dropped=len(uids) - max(room, 0),
                count=len(uids),
                folder=target,
                user=user,
                message_class=message_class,
            )
        for uid in uids[: max(room, 0)]:
            self._waiting.append(_Job(user, target, uid, message_class))
        self._next()

    def idle(self) -> defer.Deferred:
        """Fires when nothing is waiting or running (for tests and shutdown)."""
        if not self._waiting and not self._running:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle.append(d)
        return d

    def _next(self) -> None:
        while self._waiting and self._running < self.concurrency:
            job = self._waiting.popleft()
            self._running += 1
            d = self._learn(job)
            d.addBoth(self._done)
        if not self._waiting and not self._running:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _done(self, _: Any) -> None:
        self._running -= 1
        self._next()

    @defer.inlineCallbacks
    def _learn(self, job: _Job) -> Any:
        try:
            message = yield self._read(job)
            if message is None:
                return
            d = defer.maybeDeferred(self.trainer.learn, message, job.message_class, job.user)
            d.addTimeout(self.timeout, self.clock)
            outcome = yield d
        except Exception:
            self._failed(Failure(), job)
            return
        self._note(self.log.info, job, outcome)

    @defer.inlineCallbacks
    def _read(self, job: _Job) -> Any:
        """The message's bytes (read on the pool), or None if gone or too big (logged)."""
        folder = yield self.store.open_folder(job.user, job.folder, read_only=True)
        try:
            message = yield self.run(_read_message, folder, job.uid)
        finally:
            folder.close()
        if message is None:
            self._note(self.log.info, job, "skipped, gone")
        elif len(message) > MAX_MESSAGE_SIZE:
            self._note(self.log.info, job, f"skipped, over {MAX_MESSAGE_SIZE} octets")
            return None
        return message

    def _failed(self, failure: Failure, job: _Job) -> None:
        if failure.check(defer.TimeoutError):
            why = f"no answer within {self.timeout:g}s"
        else:
            why = failure.getErrorMessage()
        self._note(self.log.warn, job, f"failed ({why})")

    @staticmethod
    def _note(emit: Any, job: _Job, outcome: str) -> None:
        """One log line on C{job}: what became of it."""
        emit(
            "learn {message_class} {user} {folder} uid {uid}: {outcome}",
            message_class=job.message_class,
            user=job.user,
            folder=job.folder,
            uid=job.uid,
            outcome=outcome,
        )


def _read_message(folder: Any, uid: int) -> bytes | None:
    """The stored message (CRLF), at most one octet over the limit; None if gone. Pool thread."""
    try:
        with folder.open_message(uid) as f:
            return f.read(MAX_MESSAGE_SIZE + 1)  # type: ignore[no-any-return]
    except KeyError:
        return None
