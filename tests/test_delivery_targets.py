"""The delivery target contract (tests/delivery_target_contract.py) on the mbox store and the queue."""

from __future__ import annotations

from pathlib import Path

from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mailsrv.outbound import ipc
from mailsrv.outbound.process import ServerSide
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.outbound.target import QueueTarget
from mailsrv.routing import Mailbox, Relay
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.memory import MemoryMailStore
from mailsrv.store.target import MailboxTarget
from tests.delivery_target_contract import DeliveryTargetContract
from tests.store_contract import SyncReactor, SyncThreadPool

USERS = ["alice@example.test", "Bob.Smith@example.test"]


class MboxTargetContractTests(DeliveryTargetContract, SynchronousTestCase):
    def make_target(self, pool, clock):
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()
        store = MboxMailStore(
            self.root / "mail", self.root / "index", clock, pool, clock=clock.seconds
        )
        return MailboxTarget(store)

    def recipient(self, n):
        return Mailbox(USERS[n])

    def address(self, n):
        return USERS[n]

    def refused_recipient(self):
        return Mailbox("../escape@example.test")  # no mailbox can be named so

    def delivered(self):
        # A store of its own reads the files afresh.
        store = MboxMailStore(
            self.root / "mail", self.root / "index", SyncReactor(), SyncThreadPool()
        )
        got = []
        for user in USERS:
            folder = self.successResultOf(store.open_folder(user, "INBOX"))
            for info in folder.messages():
                with folder.open_message(info.uid) as f:
                    got.append((user, f.read().replace(b"\r\n", b"\n")))
            folder.close()
        return got

    def test_copies_get_a_return_path_and_go_to_the_folder_routed(self):
        store = self.target.store
        created = store.create_folder(USERS[0], "Lists/dev")
        self.pool.run_all()
        self.successResultOf(created)
        delivery = self.target.start("carol@remote.test")
        delivery.add_recipient(Mailbox(USERS[0], "Lists/dev"))
        delivery.body(BytesSource(b"Subject: s\n\nb\n"))
        self.commit(delivery)
        opened = store.open_folder(USERS[0], "Lists/dev")
        self.pool.run_all()
        folder = self.successResultOf(opened)
        [info] = folder.messages()
        self.assertEqual(
            folder.open_message(info.uid).read(),
            b"Return-Path: <carol@remote.test>\r\nSubject: s\r\n\r\nb\r\n",
        )
        folder.close()


class QueueTargetContractTests(DeliveryTargetContract, SynchronousTestCase):
    def make_target(self, pool, clock):
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()
        self.queue = OutboundQueue(self.root / "queue", clock, pool)
        return QueueTarget(self.queue)

    def recipient(self, n):
        return Relay(self.address(n))

    def address(self, n):
        return f"r{n}@remote.test"

    def refused_recipient(self):
        return Relay("r@remote.test\r\nRCPT TO:<x@evil.test>")  # no envelope can hold it

    def delivered(self):
        store = QueueStore(self.root / "queue")
        if not store.dir.exists():
            return []
        envelopes, bad = store.scan()
        self.assertEqual(bad, [])
        return [(r.address, store.read_message(env)) for env in envelopes for r in env.recipients]

    def test_commit_fires_with_the_queue_id(self):
        delivery = self.target.start("carol@remote.test")
        delivery.add_recipient(Relay("a@remote.test"))
        delivery.body(BytesSource(b"Subject: s\n\nb\n"))
        queue_id = self.commit(delivery)
        env = QueueStore(self.root / "queue").load_envelope(queue_id)
        self.assertEqual(
            (env.sender, [r.address for r in env.recipients]),
            ("carol@remote.test", ["a@remote.test"]),
        )


class _Client(amp.AMP):
    pass


class _RecordingStore(MemoryMailStore):
    """The in-memory store, noting whom it was asked to deliver to."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.delivered_to: list[str] = []

    def deliver(self, user, source, sender, folder="INBOX"):
        self.delivered_to.append(user)
        return super().deliver(user, source, sender, folder)


class RelayedLocalDeliveryTests(SynchronousTestCase):
    """The relay process's local deliveries go through the store's delivery target."""

    def setUp(self):
        self.root = Path(self.mktemp()).resolve()
        (self.root / "queue" / "tmp").mkdir(parents=True)
        self.store = _RecordingStore(clock=lambda: 1_700_000_000.0)
        server = ServerSide(self.store, self.root / "queue")
        self.client, _, self.pump = iosim.connectedServerAndClient(
            lambda: server, _Client, greet=False
        )

    def deliver(self, recipient: str) -> Failure | dict:
        out: list = []
        self.client.callRemote(
            ipc.DeliverLocal, recipient=recipient, sender="a@r.test", size=2, data=b"x\n"
        ).addBoth(out.append)
        self.pump.flush()
        return out[0]

    def test_a_mailbox_the_target_refuses_is_a_failed_local_delivery(self):
        result = self.deliver("../escape@example.test")
        assert isinstance(result, Failure)
        result.trap(ipc.LocalDeliveryFailed)
        self.assertIn("not a usable mailbox address", str(result.value))
        self.assertEqual(self.store.delivered_to, [])  # the store was not asked

    def test_a_local_delivery_is_stored_with_its_return_path(self):
        self.assertEqual(self.deliver("bob@example.test"), {})
        self.assertEqual(self.store.delivered_to, ["bob@example.test"])
        folder = self.successResultOf(self.store.open_folder("bob@example.test", "INBOX"))
        [info] = folder.messages()
        self.assertEqual(folder.open_message(info.uid).read(), b"Return-Path: <a@r.test>\r\nx\r\n")
