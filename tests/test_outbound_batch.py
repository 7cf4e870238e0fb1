"""Group commit in the outbound queue: batched writes, one folder fsync per batch, failures kept apart."""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.trial import unittest

from mailsrv.outbound.queue import LAZY_DELAY, PENDING, OutboundQueue, QueueStore
from mailsrv.spool import BytesSource
from tests.test_outbound_support import temp_dir

MESSAGE = b"From: a@example.test\nTo: b@remote.test\nSubject: hi\n\nbody\n"


class _BrokenSource:
    size = 10

    def open(self):
        raise OSError("spool file vanished")


class HeldPoolQueue(OutboundQueue):
    """A queue whose thread-pool calls wait until the test runs them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[tuple[object, tuple, defer.Deferred]] = []

    def _in_pool(self, f, *args):
        d: defer.Deferred = defer.Deferred()
        self.held.append((f, args, d))
        return d

    def run_next(self) -> None:
        f, args, d = self.held.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


class GroupCommitTests(unittest.TestCase):
    def setUp(self):
        self.dir = temp_dir(self) / "queue"
        self.clock = _clock()
        self.queue = HeldPoolQueue(self.dir, self.clock, threadpool=object(), max_batches=1)
        self.events: list[str] = []
        store = self.queue.store
        real_fsync_dir, real_replace = store._fsync_dir, os.replace

        def fsync_dir():
            self.events.append("fsync-dir")
            real_fsync_dir()

        def replace(src, dst):
            self.events.append("rename " + os.path.basename(dst))
            real_replace(src, dst)

        real_link = os.link

        def link(src, dst):
            self.events.append("rename " + os.path.basename(dst))
            real_link(src, dst)

        store._fsync_dir = fsync_dir
        self.patch(os, "replace", replace)
        self.patch(os, "link", link)

    def test_concurrent_enqueues_share_one_folder_fsync(self):
        results: dict[int, str] = {}
        for i in range(5):
            d = self.queue.enqueue("a@example.test", [f"r{i}@remote.test"], BytesSource(MESSAGE))
            d.addCallback(lambda qid, i=i: results.__setitem__(i, qid))
        # The first batch holds the first message; the other four wait for the next one.
        self.assertEqual([len(args[0]) for _, args, _ in self.queue.held], [1])
        self.assertEqual(results, {})
        self.queue.run_next()
        self.assertEqual(list(results), [0])
        self.assertEqual([len(args[0]) for _, args, _ in self.queue.held], [4])
        self.queue.run_next()
        self.assertEqual(sorted(results), [0, 1, 2, 3, 4])
        self.assertEqual(self.events.count("fsync-dir"), 2)
        # Every rename of a batch comes before its folder fsync: one queue file
        # per message, holding the envelope and the message.
        last = self.events[-1]
        self.assertEqual(last, "fsync-dir")
        store = QueueStore(self.dir)
        for qid in results.values():
            self.assertLess(self.events.index(f"rename {qid}.msg"), len(self.events) - 1)
            self.assertNotIn(f"rename {qid}.env", self.events)
            env = store.load_envelope(qid)
            self.assertEqual(store.read_message(env), MESSAGE)
            self.assertEqual([r.state for r in env.recipients], [PENDING])
        self.assertEqual(os.listdir(store.tmp_dir), [])

    def test_a_failed_write_fails_only_its_own_message(self):
        self.queue = HeldPoolQueue(self.dir, self.clock, threadpool=object(), max_batches=2)
        held_first = self.queue.enqueue("a@example.test", ["x@remote.test"], BytesSource(MESSAGE))
        good = self.queue.enqueue("a@example.test", ["y@remote.test"], BytesSource(MESSAGE))
        bad = self.queue.enqueue("a@example.test", ["z@remote.test"], _BrokenSource())
        self.assertEqual(len(self.queue.held), 2)  # two batches at once, the third waits
        while self.queue.held:
            self.queue.run_next()
        self.successResultOf(held_first)
        qid = self.successResultOf(good)
        self.failureResultOf(bad, OSError)
        store = QueueStore(self.dir)
        self.assertIn(qid, store.ids())
        self.assertEqual(len(store.ids()), 2)
        self.assertEqual(os.listdir(store.tmp_dir), [])

    def test_a_failed_folder_fsync_fails_the_whole_batch(self):
        def broken():
            raise OSError("EIO")

        self.queue.store._fsync_dir = broken
        ds = [
            self.queue.enqueue("a@example.test", [f"r{i}@remote.test"], BytesSource(MESSAGE))
            for i in range(3)
        ]
        while self.queue.held:
            self.queue.run_next()
        for d in ds:
            self.failureResultOf(d, OSError)  # never a 250 for any of them

    def test_saves_and_removals_are_batched_in_order(self):
        d = self.queue.enqueue("a@example.test", ["r@remote.test"], BytesSource(MESSAGE))
        self.queue.run_next()
        qid = self.successResultOf(d)
        self.assertEqual(self.queue.take_recent(qid), MESSAGE)
        self.assertIsNone(self.queue.take_recent(qid))  # handed out once
        env = QueueStore(self.dir).load_envelope(qid)
        env.attempts = 2
        saved = self.queue.save(env)
        removed = self.queue.remove(qid, sync=False)
        self.queue.run_next()
        self.assertTrue(self.successResultOf(saved))
        self.assertNoResult(removed)  # waits for the next batch, after the save
        self.queue.run_next()
        self.assertTrue(self.successResultOf(removed))
        self.assertEqual(QueueStore(self.dir).ids(), [])

    def test_removals_of_delivered_mail_wait_briefly_to_share_a_batch(self):
        ids = []
        for i in range(3):
            d = self.queue.enqueue("a@example.test", [f"r{i}@remote.test"], BytesSource(MESSAGE))
            while self.queue.held:
                self.queue.run_next()
            ids.append(self.successResultOf(d))
        removed = [self.queue.remove(qid, sync=False) for qid in ids]
        self.assertEqual(self.queue.held, [])  # nothing yet: waiting for company
        self.clock.advance(LAZY_DELAY)
        self.assertEqual(len(self.queue.held), 1)  # all three in one batch
        self.queue.run_next()
        self.assertEqual([self.successResultOf(d) for d in removed], [True, True, True])
        self.assertEqual(QueueStore(self.dir).ids(), [])
        # An administrator's removal (synced) does not wait.
        d = self.queue.enqueue("a@example.test", ["s@remote.test"], BytesSource(MESSAGE))
        self.queue.run_next()
        self.queue.remove(self.successResultOf(d))
        self.assertEqual(len(self.queue.held), 1)

    def test_crash_mid_batch_keeps_acknowledged_and_drops_half_written(self):
        # Batch 1 is acknowledged; batch 2 dies while its queue file is half
        # written under tmp/: that message was never acknowledged. A removal
        # cut short left a newer envelope without its queue file.
        d = self.queue.enqueue("a@example.test", ["r@remote.test"], BytesSource(MESSAGE))
        self.queue.run_next()
        acked = self.successResultOf(d)
        store = self.queue.store
        pending = self.queue.enqueue("a@example.test", ["s@remote.test"], BytesSource(MESSAGE))
        _, args, _ = self.queue.held.pop(0)
        (job,) = args[0]
        env = job.envelope
        (store.tmp_dir / f"{env.id}.msg.1234.5").write_bytes(b"MAILSRV-QUEUE 1 200\n{half")
        store.envelope_path("00000000000001ABCDEF").write_bytes(env.to_json())
        self.assertNoResult(pending)
        # Restart.
        again = QueueStore(self.dir)
        again.cleanup()
        envs, bad = again.scan()
        self.assertEqual(([e.id for e in envs], bad), ([acked], []))
        self.assertFalse(again.message_path(env.id).exists())
        self.assertFalse(again.envelope_path("00000000000001ABCDEF").exists())
        self.assertEqual(os.listdir(again.tmp_dir), [])


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(1_000_000)
    return clock
