"""
The queue's writes as typed jobs: each kind runs as before, a job of any
other type is refused (the rest of its batch still runs), and the code
around the queue uses the queue's own calls, never its disk layer.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path

from twisted.internet import task
from twisted.trial import unittest

import mailsrv.outbound
from mailsrv.outbound.queue import (
    SENT,
    Envelope,
    OutboundQueue,
    QueueStore,
    Recipient,
    RemoveMessage,
    SaveEnvelope,
    StoreMessage,
)
from mailsrv.spool import BytesSource
from tests.test_outbound_support import temp_dir

MESSAGE = b"From: a@example.test\nSubject: hi\n\nbody\n"


def _envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id, "a@example.test", [Recipient("b@remote.test")], 1.0, 1.0, size=8)


class TypedJobTests(unittest.TestCase):
    def setUp(self):
        self.dir = temp_dir(self) / "queue"
        self.store = QueueStore(self.dir)
        self.fsyncs = 0
        real = self.store._fsync_dir

        def counting() -> None:
            self.fsyncs += 1
            real()

        self.store._fsync_dir = counting  # type: ignore[method-assign]

    def test_store_save_and_remove_in_one_batch(self):
        env = _envelope("00000000000001ABCDEF")
        gone = _envelope("00000000000002ABCDEF")
        results = self.store.run_batch(
            [
                StoreMessage(env, MESSAGE),
                SaveEnvelope(dataclasses.replace(env, attempts=3)),
                SaveEnvelope(gone),  # never queued: nothing written
                RemoveMessage(gone.id),
            ]
        )
        self.assertEqual(results, [(True, None), (True, True), (True, False), (True, False)])
        self.assertEqual(self.fsyncs, 1)  # one folder fsync for the whole batch
        loaded = self.store.load_envelope(env.id)
        self.assertEqual(loaded.attempts, 3)
        self.assertEqual(self.store.read_message(loaded), MESSAGE)
        self.assertFalse(self.store.envelope_path(gone.id).exists())
        self.assertEqual(self.store.run_batch([RemoveMessage(env.id, sync=False)]), [(True, True)])
        self.assertEqual(self.fsyncs, 1)  # delivered mail: the removal is not synced
        self.assertEqual(self.store.ids(), [])

    def test_a_job_of_another_type_is_refused_and_the_rest_still_runs(self):
        env = _envelope("00000000000001ABCDEF")
        results = self.store.run_batch(
            [("store", (env, MESSAGE)), StoreMessage(env, MESSAGE), "remove"]  # type: ignore[list-item]
        )
        (ok, error), stored, (ok_2, error_2) = results
        self.assertFalse(ok)
        self.assertIsInstance(error, TypeError)
        self.assertIn("not a queue job", str(error))
        self.assertEqual(stored, (True, None))
        self.assertFalse(ok_2)
        self.assertIsInstance(error_2, TypeError)
        self.assertEqual(self.store.ids(), [env.id])

    def test_an_unknown_job_fails_only_its_own_deferred(self):
        clock = task.Clock()
        queue = OutboundQueue(self.dir, clock, None)
        refused = queue._submit(("remove", ("00000000000001ABCDEF", True)))  # type: ignore[arg-type]
        self.failureResultOf(refused, TypeError)
        qid = self.successResultOf(
            queue.enqueue("a@example.test", ["b@x.test"], BytesSource(b"m\n"))
        )
        self.assertEqual(QueueStore(self.dir).ids(), [qid])

    def test_jobs_are_frozen_values(self):
        env = _envelope("0A")
        job = RemoveMessage("0A")
        self.assertEqual(job, RemoveMessage("0A", sync=True))
        self.assertNotEqual(job, RemoveMessage("0A", sync=False))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            job.sync = False  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            SaveEnvelope(env).envelope = env  # type: ignore[misc]


class QueueCallsTests(unittest.TestCase):
    """What the relayer, the relay process and the server need, asked of the queue itself."""

    def setUp(self):
        self.dir = temp_dir(self) / "queue"
        self.queue = OutboundQueue(self.dir, task.Clock(), None)
        self.qid = self.successResultOf(
            self.queue.enqueue("a@example.test", ["b@remote.test"], BytesSource(MESSAGE))
        )

    def test_reads(self):
        env = self.queue.load_envelope(self.qid)
        self.assertEqual([r.address for r in env.recipients], ["b@remote.test"])
        with self.queue.open_message(env) as f:
            self.assertEqual(f.read(), MESSAGE)
        with self.queue.message_source(env).open() as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(self.queue.message_source(env).size, len(MESSAGE))
        self.assertRaises(FileNotFoundError, self.queue.load_envelope, "00000000000009ABCDEF")

    def test_writes_in_line(self):
        env = self.queue.load_envelope(self.qid)
        env.recipients[0].state = SENT
        self.assertTrue(self.queue.save_in_line(env))
        self.assertEqual(self.queue.load_envelope(self.qid).recipients[0].state, SENT)
        self.assertTrue(self.queue.remove_in_line(self.qid, sync=False))
        self.assertFalse(self.queue.save_in_line(env))  # gone: nothing written
        self.assertFalse(self.queue.remove_in_line(self.qid))
        self.assertEqual(QueueStore(self.dir).ids(), [])
        self.assertEqual(env.recipients[0].state, SENT)

    def test_temp_file_lock_and_cleanup(self):
        path = self.queue.write_temp(b"a DSN\n", "local")
        self.assertEqual(path.parent, self.dir / "tmp")
        self.assertTrue(path.name.startswith(f"local.{os.getpid()}."))
        self.assertEqual(path.read_bytes(), b"a DSN\n")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        fd = self.queue.try_lock_relay()
        self.assertIsNotNone(fd)
        self.addCleanup(os.close, fd)
        self.assertIsNone(OutboundQueue(self.dir, task.Clock(), None).try_lock_relay())
        self.queue.cleanup()  # start-up: files left under tmp/ go
        self.assertFalse(path.exists())
        self.assertEqual(QueueStore(self.dir).ids(), [self.qid])


class NoReachThroughTests(unittest.TestCase):
    def test_no_outbound_module_reaches_through_the_queue_to_its_disk_layer(self):
        folder = Path(mailsrv.outbound.__file__).parent
        offenders = [
            f"{p.name}: {line.strip()}"
            for p in sorted(folder.glob("*.py"))
            if p.name != "queue.py"
            for line in p.read_text().splitlines()
            if re.search(r"queue\.store\b", line)
        ]
        self.assertEqual(offenders, [])
