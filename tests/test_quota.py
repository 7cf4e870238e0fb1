"""
Storage quotas, the parts: sizes and the [quota] section (a typo is an
error, never "no limit"), the usage walk (file sizes, never the files'
bytes), and the relayer's local delivery to a user over quota, which
defers with 452 4.2.2 and never bounces at once (as Postfix's local does
for a full mailbox), then delivers once there is room.
"""

from __future__ import annotations

import mailbox
import os

import pytest
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.auth.passwd import PasswordFile
from mailsrv.config import ConfigError, parse
from mailsrv.localdelivery import LocalDelivery
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.queue import PENDING, OutboundQueue, QueueStore
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.quota import QuotaExceeded, Quotas, storage_used
from mailsrv.store.quotalimits import QuotaConfig, format_size, parse_size
from tests.test_outbound_local_users import _RefusingResolver
from tests.test_outbound_support import temp_dir


@pytest.mark.parametrize(
    ("text", "octets"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("500M", 500 << 20),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("10K", 10 << 10),
        ("1.5G", 3 << 29),
        ("2 GiB", 2 << 30),
        ("1T", 1 << 40),
    ],
)
def test_sizes(text, octets):
    assert parse_size(text) == octets


@pytest.mark.parametrize("text", ["1Q", "G", "", "-1", -1, "1,5G", True, 1.5, "2 gigs"])
def test_a_size_typo_is_an_error(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (0, 1000, 1024, 1536, 20 << 10, 3 << 29)] == [
        "0",
        "1000",
        "1K",
        "1.5K",
        "20K",
        "1.5G",
    ]


def test_config_quota_section():
    config = parse(
        '[quota]\nstorage = "1G"\nusers = { "Alice@Example.TEST" = "2G", "bob@example.test" = 0 }\n'
    )
    assert config.quota.limit_of("alice@example.test") == 2 << 30
    assert config.quota.limit_of("ALICE@example.test") == 2 << 30
    assert config.quota.limit_of("bob@example.test") == 0
    assert config.quota.limit_of("carol@example.test") == 1 << 30
    assert parse("").quota == QuotaConfig()  # no limit by default
    assert not parse("").quota.enabled


def test_config_quota_typos_are_errors_naming_the_key():
    with pytest.raises(ConfigError) as e:
        parse('[quota]\nstorage = "1GB!"\nusers = { "alice" = "1G", "b@example.test" = "x" }\n')
    text = str(e.value)
    assert "quota.storage: must be a size" in text
    assert "quota.users: alice: 'alice' is not an address" in text
    with pytest.raises(ConfigError) as e:
        parse('[quota]\nstorages = "1G"\n')
    assert "quota.storages: unknown key" in str(e.value)


def test_usage_is_the_size_of_the_mbox_files_not_their_bytes(tmp_path):
    root = tmp_path / "mail" / "example.test" / "alice"
    (root / "Lists").mkdir(parents=True)
    (root / "INBOX").write_bytes(b"x" * 1000)
    (root / "Lists" / "tech").write_bytes(b"y" * 500)
    (root / "INBOX.lock").write_bytes(b"")  # a dotlock
    (root / ".hidden").write_bytes(b"z" * 300)
    # A 64 GiB (sparse) folder counts at once: its bytes are never read.
    with open(root / "Huge", "wb") as f:
        f.truncate(64 << 30)
    assert storage_used(tmp_path / "mail", "alice@example.test") == 1500 + (64 << 30)
    assert storage_used(tmp_path / "mail", "nobody@example.test") == 0


class QuotaCheckTests(unittest.TestCase):
    """L{Quotas} on a thread pool: the check compares usage + size with the limit."""

    def setUp(self):
        from twisted.internet import reactor

        self.pool = ThreadPool(1, 2, name="test-quota")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.mail = temp_dir(self) / "mail"
        (self.mail / "example.test" / "alice").mkdir(parents=True)
        (self.mail / "example.test" / "alice" / "INBOX").write_bytes(b"x" * 900)
        config = QuotaConfig(storage=1000, users={"bob@example.test": 0})

        def run(f, *a):
            from twisted.internet.threads import deferToThreadPool

            return deferToThreadPool(reactor, self.pool, f, *a)

        self.quotas = Quotas(config, self.mail, run)

    @defer.inlineCallbacks
    def test_check(self):
        yield self.quotas.check("alice@example.test", 100)  # 900 + 100 fits
        with self.assertRaises(QuotaExceeded) as e:
            yield self.quotas.check("alice@example.test", 101)
        self.assertEqual(e.exception.reply.line(), b"4.2.2 Mailbox full")
        self.assertEqual(e.exception.reply.code, 452)
        yield self.quotas.check("bob@example.test", 1 << 40)  # no limit
        accepted = yield self.quotas.refuse_if_full("alice@example.test", "ok")
        self.assertEqual(accepted, "ok")
        (self.mail / "example.test" / "alice" / "Sent").write_bytes(b"y" * 100)
        with self.assertRaises(QuotaExceeded):
            yield self.quotas.refuse_if_full("alice@example.test", "ok")


class RelayLocalDeliveryOverQuotaTests(unittest.TestCase):
    """The in-process relayer's local delivery (the relay process's goes the same way)."""

    timeout = 30

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.data = temp_dir(self) / "data"
        self.config = parse(f"""
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "{self.data}"
[relay]
retry_min = 1
retry_max = 1
[quota]
storage = "1K"
""")
        self.pool = ThreadPool(1, 4, name="test-quota-relay")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        PasswordFile(self.config.auth.passwd_file).add_user("alice@example.test", "secret pw")
        store = MboxMailStore(self.config.mail_dir, self.config.index_dir, reactor, self.pool)

        def run(f, *a):
            from twisted.internet.threads import deferToThreadPool

            return deferToThreadPool(reactor, self.pool, f, *a)

        self.queue = OutboundQueue(self.config.queue_dir, reactor, self.pool)
        self.relayer = build_relayer(
            self.config,
            queue=self.queue,
            reactor=reactor,
            threadpool=self.pool,
            resolver=_RefusingResolver(),
            mailboxes=LocalDelivery(store, Quotas(self.config.quota, self.config.mail_dir, run)),
            passwords=PasswordFile(self.config.auth.passwd_file, reactor, self.pool),
            scan_interval=0.05,
        )
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.inbox = self.config.mail_dir / "example.test" / "alice" / "INBOX"

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=10.0):
        deadline = self.reactor.seconds() + timeout
        while not predicate():
            if self.reactor.seconds() > deadline:
                self.fail("timed out waiting")
            yield task.deferLater(self.reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_a_user_over_quota_is_deferred_then_delivered_once_there_is_room(self):
        self.inbox.parent.mkdir(parents=True)
        self.inbox.write_bytes(b"From x@example.test Sat Jan  3 10:00:00 2026\n" + b"x" * 2000)
        yield self.relayer.start()
        self.addCleanup(self.relayer.stop)
        qid = yield self.queue.enqueue(
            "carol@remote.test", ["alice@example.test"], BytesSource(b"Subject: held\n\nhi\n")
        )

        def deferred_line():
            return [e for e in self.events if e.get("queue_id") == qid and "result" in e]

        yield self.wait_for(deferred_line)
        line = deferred_line()[0]
        self.assertEqual(line["result"], "deferred")
        self.assertIn("dsn=4.2.2, status=deferred (452 4.2.2 Mailbox full)", formatEvent(line))
        self.assertEqual(self.flushLoggedErrors(), [])  # no traceback
        env = QueueStore(self.config.queue_dir).load_envelope(qid)
        self.assertEqual([r.state for r in env.recipients], [PENDING])
        self.assertEqual(os.path.getsize(self.inbox), 2045)  # nothing added

        # mutt empties the mailbox: the next try delivers, no bounce was sent.
        self.inbox.write_bytes(b"")
        yield self.wait_for(lambda: QueueStore(self.config.queue_dir).ids() == [])
        (m,) = list(mailbox.mbox(self.inbox))
        self.assertEqual(m["Subject"], "held")
        self.assertFalse([e for e in self.events if e.get("action") == "failed"])
