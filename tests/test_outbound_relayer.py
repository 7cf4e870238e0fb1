"""The relayer on a fake clock: back-off, the one "delayed" warning, expiry and its bounce."""

from __future__ import annotations

import email

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from mailsrv.config import parse
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.queue import Envelope, OutboundQueue, QueueStore, Recipient, new_queue_id
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from tests.test_outbound_support import temp_dir


class DownResolver:
    """Every lookup fails temporarily, like a DNS server that does not answer."""

    def __init__(self):
        self.calls = []

    def resolve(self, domain):
        self.calls.append(domain)
        return defer.fail(DeliveryError(False, "4.4.3", f"MX lookup for {domain} timed out"))


class Passwords:
    def lookup(self, address):
        return address if address == "alice@example.test" else None

    def has_user(self, address):
        return self.lookup(address) is not None


class RelayerClockTests(unittest.TestCase):
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
delay_warning = "4h"
""")
        self.queue = OutboundQueue(self.config.queue_dir, self.clock, None)
        self.resolver = DownResolver()
        self.store = MemoryMailStore(clock=self.clock.seconds)
        self.relayer = build_relayer(
            self.config,
            queue=self.queue,
            reactor=self.clock,
            threadpool=None,
            resolver=self.resolver,
            mailboxes=self.store,
            passwords=Passwords(),
        )

    def inbox(self):
        folder = self.successResultOf(self.store.open_folder("alice@example.test", "INBOX"))
        return [
            email.message_from_bytes(folder.open_message(i.uid).read()) for i in folder.messages()
        ]

    def test_backoff_warning_and_expiry(self):
        self.successResultOf(self.relayer.start())
        qid = self.successResultOf(
            self.queue.enqueue(
                "alice@example.test",
                ["bob@remote.test", "carol@remote.test"],
                BytesSource(b"Subject: hi\n\nbody\n"),
            )
        )
        self.assertEqual(self.resolver.calls, ["remote.test"])  # at once, both in one group
        times = [0.0]
        warned_at = None
        while QueueStore(self.config.queue_dir).ids():
            n = len(self.resolver.calls)
            self.clock.advance(60)
            if len(self.resolver.calls) > n:
                times.append(self.clock.seconds())
            if warned_at is None and self.inbox():
                warned_at = self.clock.seconds()
            self.assertLess(self.clock.seconds(), 2 * 86400)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        self.assertEqual(gaps[:5], [300, 600, 1200, 2400, 3600])
        self.assertTrue(all(g <= 3600 for g in gaps))
        self.assertEqual(times[-1], 86400)  # the last attempt at the end of the lifetime
        self.assertEqual(warned_at, 15300)  # the first attempt after 4 hours (4h15m)

        delayed, failed = self.inbox()
        self.assertEqual(delayed["Subject"], "Delayed Mail (still being retried)")
        blocks = delayed.get_payload(1).get_payload()[1:]
        self.assertEqual([b["Action"] for b in blocks], ["delayed", "delayed"])
        self.assertEqual(blocks[0]["Status"], "4.4.3")
        self.assertEqual(failed["Subject"], "Undelivered Mail Returned to Sender")
        blocks = failed.get_payload(1).get_payload()[1:]
        self.assertEqual(
            [b["Final-Recipient"] for b in blocks],
            ["rfc822; bob@remote.test", "rfc822; carol@remote.test"],
        )
        self.assertEqual({b["Status"] for b in blocks}, {"5.4.7"})
        self.assertIn("timed out", blocks[0]["Diagnostic-Code"])
        self.assertNotIn(qid, self.relayer.entries)
        self.successResultOf(self.relayer.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_request_retries_now(self):
        self.successResultOf(self.relayer.start())
        self.successResultOf(
            self.queue.enqueue("alice@example.test", ["bob@remote.test"], BytesSource(b"\n"))
        )
        self.clock.advance(10)
        self.assertEqual(len(self.resolver.calls), 1)
        QueueStore(self.config.queue_dir).request_flush()
        self.clock.advance(5)  # the next scan of the queue folder
        self.assertEqual(len(self.resolver.calls), 2)
        self.successResultOf(self.relayer.stop())

    def test_a_message_nobody_announced_is_found_in_the_queue_folder(self):
        # Written by another process (the server) whose notice never came.
        self.successResultOf(self.relayer.start())
        store = QueueStore(self.config.queue_dir)
        env = Envelope(
            new_queue_id(1.0), "alice@example.test", [Recipient("bob@remote.test")], 0.0, 0.0
        )
        store.store(env, b"Subject: found\n\nbody\n")
        # A broken file beside it is reported once and left alone.
        store.message_path("00000000000001ABCDEF").write_bytes(b"garbage")
        self.assertEqual(self.resolver.calls, [])
        self.clock.advance(5)  # the next scan of the queue folder
        self.assertEqual(len(self.resolver.calls), 1)
        self.assertIn(env.id, self.relayer.entries)
        self.assertEqual(self.relayer._unreadable, {"00000000000001ABCDEF"})
        self.clock.advance(5)
        self.assertEqual(len(self.resolver.calls), 1)  # not started twice
        self.successResultOf(self.relayer.stop())


class _HeldMailboxes:
    """Local deliveries that wait until the test lets them finish."""

    def __init__(self):
        self.pending: list[tuple[str, defer.Deferred]] = []

    def deliver(self, user, source, sender):
        d: defer.Deferred = defer.Deferred()
        self.pending.append((user, d))
        return d


class _AllLocal:
    def lookup(self, address):
        return address

    def has_user(self, address):
        return True


class LocalCheckpointTests(unittest.TestCase):
    def test_each_local_copy_is_recorded_before_the_next(self):
        clock = MemoryReactorClock()
        config = parse(f"""
[server]
hostname = "mail.example.test"
data_dir = "{temp_dir(self) / "data"}"
""")
        queue = OutboundQueue(config.queue_dir, clock, None)
        mailboxes = _HeldMailboxes()
        relayer = build_relayer(
            config,
            queue=queue,
            reactor=clock,
            threadpool=None,
            resolver=DownResolver(),
            mailboxes=mailboxes,
            passwords=_AllLocal(),
        )
        self.successResultOf(relayer.start())
        qid = self.successResultOf(
            queue.enqueue(
                "x@remote.test",
                ["a@example.test", "b@example.test", "c@example.test"],
                BytesSource(b"Subject: hi\n\nbody\n"),
            )
        )
        store = QueueStore(config.queue_dir)
        ((user, d),) = mailboxes.pending
        self.assertEqual(user, "a@example.test")
        d.callback(None)
        # a's copy is on disk as sent before b's delivery begins: a crash now
        # would not deliver it again.
        self.assertEqual([u for u, _ in mailboxes.pending[1:]], ["b@example.test"])
        states = [r.state for r in store.load_envelope(qid).recipients]
        self.assertEqual(states, ["sent", "pending", "pending"])
        mailboxes.pending[1][1].callback(None)
        mailboxes.pending[2][1].callback(None)
        self.assertEqual(store.ids(), [])  # all three done: removed
        self.successResultOf(relayer.stop())


class RecordLogTests(unittest.TestCase):
    """The per-attempt line: built once as text, its named fields kept for other observers."""

    def test_line_text_and_fields(self):
        from twisted.logger import formatEvent, globalLogPublisher

        from mailsrv.outbound.client import RemoteReply
        from mailsrv.outbound.queue import Envelope, Recipient

        clock = MemoryReactorClock()
        clock.advance(1000.0)
        config = parse(f"""
[server]
hostname = "mail.example.test"
data_dir = "{temp_dir(self) / "data"}"
""")
        relayer = build_relayer(
            config,
            queue=OutboundQueue(config.queue_dir, clock, None),
            reactor=clock,
            threadpool=None,
            resolver=DownResolver(),
        )
        env = Envelope("Q1", "a@example.test", [Recipient("x@remote.test")], 998.5, 1000.0)
        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        relayer._record(
            env, env.recipients[0], RemoteReply(250, "2.0.0 Ok {x}"), "mx", "mx[127.0.0.1]:25"
        )
        [event] = [e for e in seen if e.get("queue_id") == "Q1"]
        self.assertEqual(
            formatEvent(event),
            "Q1: to=<x@remote.test>, relay=mx[127.0.0.1]:25, delay=1.50, "
            "dsn=2.0.0, status=sent (250 2.0.0 Ok {x})",
        )
        self.assertEqual(
            (event["rcpt"], event["result"], event["status"], event["delay"]),
            ("x@remote.test", "sent", "2.0.0", 1.5),
        )
