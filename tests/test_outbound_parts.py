"""
The relayer's parts one at a time, on a fake clock with a real queue
folder: the record of results, local delivery, remote delivery's refusals
and the smarthost's address, and the DSNs to the sender.
"""

from __future__ import annotations

import email

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailsrv import replies
from mailsrv.config import parse
from mailsrv.interfaces import PasswordDatabaseError
from mailsrv.outbound import dsn
from mailsrv.outbound.bounces import Bounces
from mailsrv.outbound.build import queued_router
from mailsrv.outbound.client import RemoteReply
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.local import LocalRecipients, recipient_domain
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.outbound.remote import RemoteDelivery, split_hostport
from mailsrv.outbound.results import LOG_NAMESPACE, Results
from mailsrv.routing import Mailbox, Refused
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from tests.test_outbound_support import temp_dir

MESSAGE = b"Subject: parts\nMessage-ID: <1@remote.test>\n\nbody\n"


class _Users:
    """alice is a user; the user database of broken.test cannot be read."""

    def lookup(self, address):
        if address.endswith("@broken.test"):
            raise PasswordDatabaseError("cannot read the password file")
        return "alice@example.test" if address.lower() == "alice@example.test" else None

    def has_user(self, address):
        return self.lookup(address) is not None


class _PartsCase(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.config = parse(f"""
[server]
hostname = "mail.example.test"
domains = ["example.test", "broken.test"]
data_dir = "{temp_dir(self) / "data"}"
""")
        self.queue = OutboundQueue(self.config.queue_dir, self.clock, None)
        self.results = Results(self.queue, self.clock, None)
        self.results.running = True
        self.mailboxes = MemoryMailStore(clock=self.clock.seconds)
        self.local = LocalRecipients(
            queue=self.queue, mailboxes=self.mailboxes, results=self.results
        )
        self.router = queued_router(self.config, queue=self.queue, passwords=_Users(), local=True)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def queued(self, sender, rcpts):
        qid = self.successResultOf(self.queue.enqueue(sender, rcpts, BytesSource(MESSAGE)))
        self.queue.take_recent(qid)
        return self.queue.load_envelope(qid)

    def inbox(self, user):
        folder = self.successResultOf(self.mailboxes.open_folder(user, "INBOX"))
        return [
            email.message_from_bytes(folder.open_message(i.uid).read()) for i in folder.messages()
        ]

    def lines(self):
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == LOG_NAMESPACE]


class ResultsTests(_PartsCase):
    def test_record_a_line_per_recipient_under_the_relayers_namespace(self):
        env = self.queued("x@remote.test", ["a@remote.test", "b@remote.test", "c@remote.test"])
        a, b, c = env.recipients
        self.clock.advance(2.5)
        self.results.record(env, a, RemoteReply(250, "2.0.0 ok"), "mx.remote.test", "mx")
        self.results.record(env, b, RemoteReply(550, "5.1.1 no such user"), "mx.remote.test", "mx")
        self.results.record(env, c, RemoteReply(451, "4.3.0 later"), "mx.remote.test", "mx")
        self.assertEqual([r.state for r in env.recipients], ["sent", "failed", "pending"])
        self.assertEqual([r.attempts for r in env.recipients], [1, 1, 1])
        self.assertEqual(env.last_error, "451 4.3.0 later")
        self.assertEqual(
            self.lines(),
            [
                f"{env.id}: to=<a@remote.test>, relay=mx, delay=2.50, dsn=2.0.0, "
                "status=sent (250 2.0.0 ok)",
                f"{env.id}: to=<b@remote.test>, relay=mx, delay=2.50, dsn=5.1.1, "
                "status=bounced (550 5.1.1 no such user)",
                f"{env.id}: to=<c@remote.test>, relay=mx, delay=2.50, dsn=4.3.0, "
                "status=deferred (451 4.3.0 later)",
            ],
        )

    def test_checkpoint_writes_only_a_partly_done_message(self):
        env = self.queued("x@remote.test", ["a@remote.test", "b@remote.test"])
        a, b = env.recipients
        self.successResultOf(self.results.checkpoint(env, [a]))  # nothing done: no write
        self.assertEqual(QueueStore(self.config.queue_dir).envelope_path(env.id).exists(), False)
        self.results.record(env, a, RemoteReply(250, "2.0.0 ok"), "", "mx")
        self.successResultOf(self.results.checkpoint(env, [a]))
        on_disk = self.queue.load_envelope(env.id)
        self.assertEqual([r.state for r in on_disk.recipients], ["sent", "pending"])
        self.results.record(env, b, RemoteReply(250, "2.0.0 ok"), "", "mx")
        self.successResultOf(self.results.checkpoint(env, [b]))  # all done: the round's end writes
        self.assertEqual(self.queue.load_envelope(env.id).recipients[1].state, "pending")
        self.assertTrue(self.successResultOf(self.results.remove(env)))
        self.assertEqual(QueueStore(self.config.queue_dir).ids(), [])

    def test_in_pool_runs_in_line_once_stopped(self):
        results = Results(self.queue, self.clock, threadpool=object())  # never used
        self.assertEqual(self.successResultOf(results.in_pool(lambda x: x + 1, 1)), 2)


class LocalRecipientsTests(_PartsCase):
    def test_each_kind_of_local_result(self):
        env = self.queued(
            "x@remote.test", ["Alice@example.test", "nobody@example.test", "z@broken.test"]
        )
        routed = [(r, self.router.route_queued(r.address)) for r in env.recipients]
        self.successResultOf(self.local.deliver(env, routed))
        alice, nobody, broken = env.recipients
        self.assertEqual((alice.state, alice.reply), ("sent", "250 2.0.0 delivered to mailbox"))
        self.assertEqual(
            (nobody.state, nobody.reply),
            ("failed", "550 5.1.1 User unknown in local recipient table"),
        )
        self.assertEqual(
            (broken.state, broken.reply), ("pending", "451 4.3.0 local user database unavailable")
        )
        (m,) = self.inbox("alice@example.test")  # the stored spelling names the mailbox
        self.assertEqual(m["Subject"], "parts")
        on_disk = self.queue.load_envelope(env.id)
        self.assertEqual([r.state for r in on_disk.recipients], ["sent", "failed", "pending"])

    def test_user_and_domain(self):
        route = self.router.route_queued
        self.assertEqual(route("ALICE@example.test"), Mailbox("alice@example.test"))
        self.assertEqual(route("bob@example.test"), Refused(replies.QUEUED_NO_SUCH_USER))
        self.assertEqual(recipient_domain("Bob@Example.TEST."), "example.test")
        anyone = queued_router(self.config, queue=self.queue, passwords=None, local=True)
        self.assertEqual(anyone.route_queued("Bob@example.test"), Mailbox("Bob@example.test"))


class _Resolver:
    def __init__(self, error):
        self.error = error
        self.hosts: list[tuple[str, int]] = []

    def resolve(self, domain):
        return defer.fail(self.error)

    def host_hops(self, host, port):
        self.hosts.append((host, port))
        return defer.fail(self.error)


class RemoteDeliveryTests(_PartsCase):
    def remote(self, error, config=None):
        resolver = _Resolver(error)
        remote = RemoteDelivery(
            config=config or self.config,
            queue=self.queue,
            reactor=self.clock,
            resolver=resolver,
            results=self.results,
        )
        return remote, resolver

    def test_a_failed_lookup_is_every_recipients_result(self):
        env = self.queued("x@remote.test", ["a@gone.test", "b@gone.test", "c@slow.test"])
        remote, _ = self.remote(DeliveryError(True, "5.1.2", "no such domain gone.test"))
        self.successResultOf(remote.deliver(env, "gone.test", env.recipients[:2]))
        remote, _ = self.remote(DeliveryError(False, "4.4.3", "MX lookup timed out"))
        self.successResultOf(remote.deliver(env, "slow.test", env.recipients[2:]))
        self.assertEqual([r.state for r in env.recipients], ["failed", "failed", "pending"])
        self.assertEqual([r.status for r in env.recipients], ["5.1.2", "5.1.2", "4.4.3"])
        self.assertEqual(env.recipients[0].reply, "no such domain gone.test")
        self.assertIn(f"{env.id}: to=<a@gone.test>, relay=none,", self.lines()[0])
        self.assertIn("(550 5.1.2 no such domain gone.test)", self.lines()[0])
        self.assertIn("(450 4.4.3 MX lookup timed out)", self.lines()[2])
        on_disk = self.queue.load_envelope(env.id)  # written: one is still pending
        self.assertEqual([r.state for r in on_disk.recipients], ["failed", "failed", "pending"])

    def test_nothing_is_tried_once_stopped(self):
        env = self.queued("x@remote.test", ["a@gone.test"])
        remote, _ = self.remote(DeliveryError(True, "5.1.2", "no such domain"))
        self.results.running = False
        self.successResultOf(remote.deliver(env, "gone.test", env.recipients))
        self.assertEqual(env.recipients[0].attempts, 0)

    def test_the_smarthost_is_looked_up_by_its_address(self):
        config = parse(f"""
[server]
data_dir = "{temp_dir(self) / "data"}"
[relay]
smarthost = "relay.example.net:2525"
""")
        env = self.queued("x@remote.test", ["a@remote.test"])
        remote, resolver = self.remote(DeliveryError(False, "4.4.3", "no address"), config)
        self.successResultOf(remote.deliver(env, "[smarthost]", env.recipients))
        self.assertEqual(resolver.hosts, [("relay.example.net", 2525)])
        self.assertEqual(split_hostport("[192.0.2.1]:587", 25), ("192.0.2.1", 587))
        self.assertEqual(split_hostport("[2001:db8::1]", 25), ("2001:db8::1", 25))
        self.assertEqual(split_hostport("relay.example.net", 25), ("relay.example.net", 25))


class BouncesTests(_PartsCase):
    def bounces(self, local=True):
        return Bounces(
            config=self.config,
            queue=self.queue,
            reactor=self.clock,
            results=self.results,
            local=self.local if local else None,
            router=self.router
            if local
            else queued_router(self.config, queue=self.queue, passwords=_Users(), local=False),
        )

    def test_a_local_sender_gets_the_dsn_in_the_mailbox(self):
        env = self.queued("alice@example.test", ["a@gone.test"])
        self.successResultOf(self.bounces().notify(env, env.recipients, dsn.FAILED, None))
        (m,) = self.inbox("alice@example.test")
        self.assertEqual(m["Subject"], "Undelivered Mail Returned to Sender")
        self.assertIn("Subject: parts", m.as_string())  # the original's headers
        self.assertIn("(mailbox) for <a@gone.test>", self.lines()[-1])

    def test_a_remote_sender_gets_it_through_the_queue(self):
        env = self.queued("x@remote.test", ["a@gone.test"])
        self.successResultOf(self.bounces().notify(env, env.recipients, dsn.DELAYED, 5000.0))
        dsn_id = next(i for i in QueueStore(self.config.queue_dir).ids() if i != env.id)
        report = self.queue.load_envelope(dsn_id)
        self.assertEqual(
            (report.sender, [r.address for r in report.recipients]), ("", ["x@remote.test"])
        )
        self.assertIn(f"({dsn_id}) for <a@gone.test>", self.lines()[-1])

    def test_no_dsn_for_the_null_sender_nor_an_unknown_local_one(self):
        bounce = self.queued("", ["a@gone.test"])
        self.successResultOf(self.bounces().notify(bounce, bounce.recipients, dsn.FAILED, None))
        self.assertIn("the sender is <> (a bounce is never bounced); dropped", self.lines()[-1])
        env = self.queued("nobody@example.test", ["a@gone.test"])
        self.successResultOf(self.bounces().notify(env, env.recipients, dsn.FAILED, None))
        self.assertIn(
            "DSN for unknown local sender <nobody@example.test> dropped", self.lines()[-1]
        )
        self.assertEqual(len(QueueStore(self.config.queue_dir).ids()), 2)  # no DSN queued
        self.assertEqual(self.inbox("alice@example.test"), [])

    def test_without_local_mailboxes_a_local_sender_gets_it_through_the_queue(self):
        env = self.queued("alice@example.test", ["a@gone.test"])
        self.successResultOf(
            self.bounces(local=False).notify(env, env.recipients, dsn.FAILED, None)
        )
        self.assertEqual(len(QueueStore(self.config.queue_dir).ids()), 2)
        self.assertEqual(self.inbox("alice@example.test"), [])
