"""
The relayer's local deliveries with the real password file and mbox store:
an address queued in another case than the user's stored spelling lands in
that user's mailbox, and an unreadable password file defers, never bounces.
"""

from __future__ import annotations

import mailbox
import shutil

from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.auth.passwd import PasswordFile
from mailsrv.config import parse
from mailsrv.localdelivery import LocalDelivery
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.queue import PENDING, OutboundQueue, QueueStore
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from tests.test_outbound_support import temp_dir


class _RefusingResolver:
    """Every remote domain is refused for good: the sender gets a bounce."""

    def resolve(self, domain):
        return defer.fail(DeliveryError(True, "5.1.2", f"no such domain {domain}"))


class LocalUsersTests(unittest.TestCase):
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
""")
        self.pool = ThreadPool(1, 4, name="test-local-users")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.passwd = self.config.auth.passwd_file
        PasswordFile(self.passwd).add_user("alice@example.test", "secret password")
        store = MboxMailStore(self.config.mail_dir, self.config.index_dir, reactor, self.pool)
        self.queue = OutboundQueue(self.config.queue_dir, reactor, self.pool)
        self.relayer = build_relayer(
            self.config,
            queue=self.queue,
            reactor=reactor,
            threadpool=self.pool,
            resolver=_RefusingResolver(),
            mailboxes=LocalDelivery(store),
            passwords=PasswordFile(self.passwd, reactor, self.pool),
            scan_interval=0.05,
        )
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def run_relayer(self):
        yield self.relayer.start()
        self.addCleanup(self.relayer.stop)

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=10.0):
        deadline = self.reactor.seconds() + timeout
        while not predicate():
            if self.reactor.seconds() > deadline:
                self.fail("timed out waiting")
            yield task.deferLater(self.reactor, 0.02, lambda: None)

    def queue_empty(self) -> bool:
        return QueueStore(self.config.queue_dir).ids() == []

    def inbox(self, local: str) -> list[mailbox.mboxMessage]:
        path = self.config.mail_dir / "example.test" / local / "INBOX"
        return list(mailbox.mbox(path)) if path.exists() else []

    def users(self) -> list[str]:
        return sorted(p.name for p in (self.config.mail_dir / "example.test").iterdir())

    @defer.inlineCallbacks
    def test_a_local_recipient_in_another_case_lands_in_the_users_mailbox(self):
        yield self.run_relayer()
        yield self.queue.enqueue(
            "bob@remote.test", ["Alice@example.test"], BytesSource(b"Subject: retried\n\nhi\n")
        )
        yield self.wait_for(self.queue_empty)
        (m,) = self.inbox("alice")
        self.assertEqual(m["Subject"], "retried")
        self.assertEqual(self.users(), ["alice"])  # no "Alice" folder beside it

    @defer.inlineCallbacks
    def test_a_bounce_to_a_sender_in_another_case_lands_in_the_users_mailbox(self):
        yield self.run_relayer()
        yield self.queue.enqueue(
            "ALICE@example.test", ["bob@gone.test"], BytesSource(b"Subject: lost\n\nhi\n")
        )
        yield self.wait_for(self.queue_empty)
        (m,) = self.inbox("alice")
        self.assertEqual(m["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(self.users(), ["alice"])

    @defer.inlineCallbacks
    def test_an_unreadable_password_file_defers_and_never_bounces(self):
        real = self.passwd.read_bytes()
        self.passwd.unlink()
        self.passwd.mkdir()  # reading it fails (root reads a file whatever its mode)
        yield self.run_relayer()
        qid = yield self.queue.enqueue(
            "carol@remote.test", ["alice@example.test"], BytesSource(b"Subject: held\n\nhi\n")
        )

        def deferred_line():
            return [e for e in self.events if e.get("queue_id") == qid and "result" in e]

        yield self.wait_for(deferred_line)
        (line,) = deferred_line()
        self.assertEqual(line["result"], "deferred")
        self.assertEqual(
            formatEvent(line).split(", ", 1)[1],
            f"relay=local, delay={line['delay']:.2f}, dsn=4.3.0, status=deferred "
            "(451 4.3.0 local user database unavailable)",
        )
        self.assertEqual(self.flushLoggedErrors(), [])  # no traceback
        env = QueueStore(self.config.queue_dir).load_envelope(qid)
        self.assertEqual([r.state for r in env.recipients], [PENDING])
        self.assertFalse((self.config.mail_dir / "example.test").exists())

        # Readable again: the next try delivers it.
        shutil.rmtree(self.passwd)
        self.passwd.write_bytes(real)
        yield self.wait_for(self.queue_empty)
        (m,) = self.inbox("alice")
        self.assertEqual(m["Subject"], "held")
        self.assertFalse([e for e in self.events if e.get("action") == "failed"])
