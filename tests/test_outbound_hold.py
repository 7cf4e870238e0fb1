"""
``mailsrv queue hold``, ``release`` and ``requeue`` against the relayer on a
fake clock: a held message is never attempted and never expires while held,
a release gives it back its schedule, a requeue tries it now with the
back-off from the start; the marks are files that survive a restart.
"""

from __future__ import annotations

import argparse
import io

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from mailsrv.config import parse
from mailsrv.outbound import admin
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from tests.test_outbound_relayer import DownResolver, Passwords
from tests.test_outbound_support import temp_dir


def queue_cli(config, *argv):
    """Run ``mailsrv queue ARGV`` in this process: (exit code, standard output)."""
    parser = argparse.ArgumentParser()
    admin.add_queue_commands(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    return admin.handle(parser.parse_args(["queue", *argv]), config, out), out.getvalue()


class HoldTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.data = temp_dir(self) / "data"
        self.config = parse(f"""
[server]
hostname = "mail.example.test"
data_dir = "{self.data}"
[relay]
retry_min = "5m"
retry_max = "1h"
max_lifetime = "1d"
delay_warning = "0"
""")
        self.store = QueueStore(self.config.queue_dir)
        self.resolver = DownResolver()
        self.mailboxes = MemoryMailStore(clock=self.clock.seconds)
        self.relayer = self.start_relayer()

    def start_relayer(self):
        queue = OutboundQueue(self.config.queue_dir, self.clock, None)
        relayer = build_relayer(
            self.config,
            queue=queue,
            reactor=self.clock,
            threadpool=None,
            resolver=self.resolver,
            mailboxes=self.mailboxes,
            passwords=Passwords(),
        )
        self.successResultOf(relayer.start())
        return relayer

    def deferred_message(self):
        """A message whose first attempt failed: its next one is 5 minutes away."""
        qid = self.successResultOf(
            self.relayer.queue.enqueue(
                "alice@example.test", ["bob@remote.test"], BytesSource(b"Subject: x\n\nbody\n")
            )
        )
        self.assertEqual(len(self.resolver.calls), 1)
        return qid

    def inbox(self):
        folder = self.successResultOf(self.mailboxes.open_folder("alice@example.test", "INBOX"))
        return list(folder.messages())

    def test_held_message_is_never_attempted_nor_expired_and_release_resumes_it(self):
        qid = self.deferred_message()
        self.assertEqual(queue_cli(self.config, "hold", qid.lower()), (0, f"{qid}: on hold\n"))
        code, listing = queue_cli(self.config, "list")
        self.assertIn(f"{qid}!", listing)
        self.assertIn("1 on hold", listing)
        self.store.request_flush()
        for _ in range(3 * 24 * 60):  # three days, past the lifetime of one day
            self.clock.advance(60)
        self.assertEqual(len(self.resolver.calls), 1)  # never attempted while held
        self.assertEqual(self.store.ids(), [qid])  # nor expired
        self.assertEqual(self.inbox(), [])  # nor bounced
        self.assertIn(qid, self.relayer.due.held)

        self.assertEqual(queue_cli(self.config, "release", qid), (0, f"{qid}: released\n"))
        self.assertEqual(queue_cli(self.config, "release", qid), (0, f"{qid}: not on hold\n"))
        self.clock.advance(5)  # the next scan of the queue folder
        # Its schedule says now; past its lifetime it has one attempt, then bounces.
        self.assertEqual(len(self.resolver.calls), 2)
        self.assertEqual(self.store.ids(), [])
        self.assertEqual(len(self.inbox()), 1)
        self.successResultOf(self.relayer.stop())

    def test_hold_is_read_before_each_attempt_even_before_the_next_scan(self):
        qid = self.deferred_message()
        self.assertTrue(self.store.marks.hold(qid))
        self.relayer.flush()  # the retry comes before the relayer's scan sees the mark
        self.assertEqual(len(self.resolver.calls), 1)
        self.assertIn(qid, self.relayer.due.held)
        self.successResultOf(self.relayer.stop())

    def test_requeue_tries_now_with_the_back_off_from_the_start(self):
        qid = self.deferred_message()
        for _ in range(4):  # attempts at 5, 15, 35 and 75 minutes: the next is an hour on
            self.relayer.flush()
        self.assertEqual(len(self.resolver.calls), 5)
        self.assertEqual(self.relayer.entries[qid].attempts, 5)
        self.assertTrue(self.store.marks.hold(qid))
        self.assertEqual(queue_cli(self.config, "requeue", qid), (0, f"{qid}: requeued\n"))
        self.assertFalse(self.store.marks.is_held(qid))  # a requeue releases the hold
        self.clock.advance(5)
        self.assertEqual(len(self.resolver.calls), 6)
        env = self.relayer.entries[qid]
        self.assertEqual(env.attempts, 1)
        self.assertEqual(env.next_attempt, self.clock.seconds() + 300)  # retry_min again
        self.successResultOf(self.relayer.stop())

    def test_a_hold_after_a_requeue_wins(self):
        qid = self.deferred_message()
        self.relayer.flush()
        self.assertEqual(self.relayer.entries[qid].attempts, 2)
        self.assertEqual(queue_cli(self.config, "requeue", qid)[0], 0)
        self.assertEqual(queue_cli(self.config, "hold", qid)[0], 0)  # before the next scan
        self.clock.advance(5)
        self.assertEqual(len(self.resolver.calls), 2)  # held: not attempted
        self.assertEqual(self.relayer.entries[qid].attempts, 0)  # the back-off is reset
        self.assertEqual(queue_cli(self.config, "release", qid)[0], 0)
        self.clock.advance(5)
        self.assertEqual(len(self.resolver.calls), 3)
        self.assertEqual(self.relayer.entries[qid].next_attempt, self.clock.seconds() + 300)
        self.successResultOf(self.relayer.stop())

    def slow_dns(self):
        """From now on each MX lookup waits: the list of its answers, to fire by hand."""
        answers = []

        def resolve(domain):
            self.resolver.calls.append(domain)
            answers.append(defer.Deferred())
            return answers[-1]

        self.resolver.resolve = resolve
        return answers

    def test_a_hold_during_an_attempt_requeued_under_way_is_obeyed(self):
        qid = self.deferred_message()
        answers = self.slow_dns()
        self.relayer.flush()  # the second attempt, under way
        self.assertIn(qid, self.relayer.due.active)
        self.assertEqual(queue_cli(self.config, "requeue", qid)[0], 0)
        self.clock.advance(5)  # the scan: requeued once the attempt is over
        self.assertEqual(queue_cli(self.config, "hold", qid)[0], 0)  # before the next scan
        answers[0].errback(DeliveryError(False, "4.4.3", "MX lookup timed out"))
        self.assertEqual(len(self.resolver.calls), 2)  # held: no attempt after the requeue
        self.assertIn(qid, self.relayer.due.held)
        self.assertEqual(self.store.ids(), [qid])
        self.successResultOf(self.relayer.stop())

    def test_marks_outlive_a_restart_and_go_with_the_message(self):
        qid = self.deferred_message()
        self.successResultOf(self.relayer.stop())
        self.assertEqual(queue_cli(self.config, "hold", qid)[0], 0)  # the server is stopped
        self.store.cleanup()
        self.relayer = self.start_relayer()
        self.relayer.flush()
        self.clock.advance(5)
        self.assertEqual(len(self.resolver.calls), 1)  # still held after the restart
        self.assertEqual(queue_cli(self.config, "delete", qid)[0], 0)
        self.assertEqual(sorted(p.name for p in self.store.dir.iterdir()), ["tmp"])
        self.successResultOf(self.relayer.stop())

    def test_unknown_ids_exit_1(self):
        qid = self.deferred_message()
        for cmd in ("hold", "release", "requeue"):
            code, out = queue_cli(self.config, cmd, qid, "00000000DEADBEEF")
            self.assertEqual(code, 1, cmd)
            self.assertNotIn("DEADBEEF", out)
        code, out = queue_cli(self.config, "requeue", "--all")
        self.assertEqual((code, out), (0, f"{qid}: requeued\n"))
        self.successResultOf(self.relayer.stop())

    def test_a_stray_mark_is_removed_at_start_up(self):
        (self.store.dir / "00000000DEADBEEF.hold").touch()
        (self.store.dir / "00000000DEADBEEF.requeue").touch()
        self.store.cleanup()
        self.assertEqual(self.store.marks.held(), set())
        self.assertEqual(self.store.marks.take_requeue_requests(), [])
        self.successResultOf(self.relayer.stop())
