"""The queue on disk: durable enqueue, envelopes that survive a new Queue object, admin commands."""

from __future__ import annotations

import argparse
import io
import os

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailsrv.config import parse
from mailsrv.interfaces import IMessageSource, IOutboundQueue
from mailsrv.outbound import admin
from mailsrv.outbound.queue import (
    FAILED,
    PENDING,
    SENT,
    Envelope,
    FileSource,
    OutboundQueue,
    QueueStore,
    Recipient,
)
from mailsrv.spool import BytesSource, SpooledSource
from tests.test_outbound_support import temp_dir

MESSAGE = b"From: a@example.test\nTo: b@remote.test\nSubject: hi\n\nbody\n.\nline\n"


class QueueTests(unittest.TestCase):
    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.pool = ThreadPool(1, 2, name="test-queue")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dir = str(temp_dir(self) / "queue")
        self.queue = OutboundQueue(self.dir, reactor, self.pool)

    def test_interfaces(self):
        verifyObject(IOutboundQueue, self.queue)
        verifyObject(IMessageSource, FileSource(__file__, 1))

    @defer.inlineCallbacks
    def test_enqueue_is_on_disk_when_it_fires(self):
        seen = []
        self.queue.add_listener(seen.append)
        qid = yield self.queue.enqueue(
            "a@example.test",
            ["b@remote.test", "c@remote.test", "b@remote.test"],
            BytesSource(MESSAGE),
        )
        store = QueueStore(self.dir)
        env = store.load_envelope(qid)
        self.assertEqual(store.read_message(env), MESSAGE)
        with store.message_source(env).open() as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(env.sender, "a@example.test")
        self.assertEqual([r.address for r in env.recipients], ["b@remote.test", "c@remote.test"])
        self.assertEqual({r.state for r in env.recipients}, {PENDING})
        self.assertEqual(env.size, len(MESSAGE))
        self.assertEqual([e.id for e in seen], [qid])
        self.assertEqual(os.listdir(os.path.join(self.dir, "tmp")), [])

    @defer.inlineCallbacks
    def test_large_spooled_message_is_copied_whole(self):
        src = SpooledSource(temp_dir(self), spill_at=1024)
        data = b"".join(b"line %d of a long message\n" % i for i in range(20000))
        src.write(data)
        src.finish()
        qid = yield self.queue.enqueue("", ["x@remote.test"], src)
        store = QueueStore(self.dir)
        env = store.load_envelope(qid)
        self.assertEqual(store.read_message(env), data)
        self.assertEqual(env.sender, "")

    @defer.inlineCallbacks
    def test_recipient_state_survives_a_new_queue_object(self):
        qid = yield self.queue.enqueue(
            "a@example.test", ["b@remote.test", "c@remote.test"], BytesSource(MESSAGE)
        )
        envs, bad = yield self.queue.scan()
        (env,) = envs
        env.recipients[0].state = SENT
        env.recipients[1].state = FAILED
        env.recipients[1].reply = "550 5.1.1 no such user"
        env.attempts = 3
        saved = yield self.queue.save(env)
        self.assertTrue(saved)

        again = OutboundQueue(self.dir, self.reactor, self.pool)
        envs, bad = yield again.scan()
        self.assertEqual(bad, [])
        (env2,) = envs
        self.assertEqual(env2.id, qid)
        self.assertEqual([r.state for r in env2.recipients], [SENT, FAILED])
        self.assertEqual(env2.recipients[1].reply, "550 5.1.1 no such user")
        self.assertEqual(env2.attempts, 3)
        self.assertEqual(env2, env)

    @defer.inlineCallbacks
    def test_scan_drops_orphans_and_save_after_delete_writes_nothing(self):
        qid = yield self.queue.enqueue("a@example.test", ["b@remote.test"], BytesSource(MESSAGE))
        store = QueueStore(self.dir)
        # A crash during a removal: a newer envelope without its queue file.
        orphan = store.envelope_path("00000000000001ABCDEF")
        orphan.write_bytes(b"{}")
        (store.tmp_dir / "half-written").write_bytes(b"x")
        # Not a queue file at all: reported, left for the administrator.
        store.message_path("00000000000002ABCDEF").write_bytes(b"x")
        store.message_path("00000000000003ABCDEF").write_bytes(b"MAILSRV-QUEUE 1 99\n{}")
        store.cleanup()
        envs, bad = yield self.queue.scan()
        self.assertEqual([e.id for e in envs], [qid])
        self.assertEqual(bad, ["00000000000002ABCDEF", "00000000000003ABCDEF"])
        store.remove("00000000000002ABCDEF")
        store.remove("00000000000003ABCDEF")
        self.assertFalse(orphan.exists())
        self.assertEqual(os.listdir(store.tmp_dir), [])
        self.assertTrue(store.remove(qid))
        saved = yield self.queue.save(envs[0])
        self.assertFalse(saved)
        self.assertEqual(store.ids(), [])
        self.assertFalse(store.remove(qid))
        self.assertFalse(store.remove("../../etc/passwd"))

    def test_a_new_queue_file_never_replaces_one_with_the_same_id(self):
        store = QueueStore(self.dir)
        first = Envelope("00000000000001ABCDEF", "a@example.test", [Recipient("b@x.test")], 1, 1)
        store.store(first, MESSAGE)
        clash = Envelope("00000000000001ABCDEF", "c@example.test", [Recipient("d@x.test")], 2, 2)
        self.assertRaises(FileExistsError, store.store, clash, b"other\n")
        env = store.load_envelope(first.id)
        self.assertEqual(env.sender, "a@example.test")
        self.assertEqual(store.read_message(env), MESSAGE)
        self.assertEqual(os.listdir(store.tmp_dir), [])

    def test_envelope_json_round_trip(self):
        env = Envelope("0A", "s@x", [], 1.5, 2.5)
        self.assertEqual(Envelope.from_json(env.to_json()), env)


class AdminTests(unittest.TestCase):
    def setUp(self):
        self.data = temp_dir(self) / "data"
        self.config = parse(f'[server]\ndata_dir = "{self.data}"\n')
        self.store = QueueStore(self.config.queue_dir)

    def run_cmd(self, *argv):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        admin.add_queue_commands(sub)
        args = parser.parse_args(["queue", *argv])
        out = io.StringIO()
        return getattr(args, admin.HANDLER)(args, self.config, out), out.getvalue()

    def test_list_show_flush_delete(self):
        code, out = self.run_cmd("list")
        self.assertEqual((code, out.strip()), (0, "Mail queue is empty"))
        env = Envelope("0ABC", "a@example.test", [], 100.0, 100.0, size=len(MESSAGE))
        from mailsrv.outbound.queue import Recipient

        env.recipients = [Recipient("b@remote.test"), Recipient("c@remote.test", state=SENT)]
        env.last_error = "451 4.3.0 try later"
        self.store.store(env, BytesSource(MESSAGE))
        code, out = self.run_cmd("list")
        self.assertEqual(code, 0)
        self.assertIn("0ABC", out)
        self.assertIn("b@remote.test", out)
        self.assertNotIn("c@remote.test", out)  # already delivered
        self.assertIn("451 4.3.0 try later", out)
        code, out = self.run_cmd("show", "0abc")
        self.assertEqual(code, 0)
        self.assertIn('"sender": "a@example.test"', out)
        self.assertIn("Subject: hi", out)
        self.assertNotIn("body", out)
        code, out = self.run_cmd("flush")
        self.assertEqual(code, 0)
        self.assertTrue(self.store.take_flush_request())
        self.assertFalse(self.store.take_flush_request())
        code, out = self.run_cmd("delete", "0ABC")
        self.assertEqual(code, 0)
        self.assertEqual(self.store.ids(), [])
        code, _ = self.run_cmd("delete", "0ABC")
        self.assertEqual(code, 1)
        code, _ = self.run_cmd("show", "0ABC")
        self.assertEqual(code, 1)
