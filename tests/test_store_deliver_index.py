"""deliver() keeps the folder's index current: the first open of a folder filled by SMTP reads no mail."""

from __future__ import annotations

import mailbox
import shutil
import sqlite3
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import SEEN
from mailsrv.spool import BytesSource
from mailsrv.store import mboxfmt
from mailsrv.store.index import FolderIndex
from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool, crlf
from tests.test_store_mbox import TRICKY, _ManualPool


def _scanned(index_dir: Path) -> list[tuple]:
    """
    The rows a cold scan of the same file must agree with: all but the size
    and the quoting, which only the index that saw the deliveries knows
    (a cold scan reads every message as another program's, mboxo).
    """
    return [r[:4] + r[5:9] for r in _rows(index_dir)]


def _rows(index_dir: Path) -> list[tuple]:
    """The message rows of alice's INBOX index, read with plain sqlite."""
    db = sqlite3.connect(index_dir / "example.test" / "alice" / "INBOX.sqlite")
    try:
        return db.execute("SELECT * FROM msgs ORDER BY uid").fetchall()
    finally:
        db.close()


def _no_scan(*args, **kwargs):
    raise AssertionError("the mbox was scanned")


class DeliverIndexesTests(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        self.store = self.new_store()

    def new_store(self, index: str = "index", pool=None) -> MboxMailStore:
        return MboxMailStore(
            self.root / "mail",
            self.root / index,
            SyncReactor(),
            pool or SyncThreadPool(),
            clock=lambda: NOW,
        )

    def ok(self, d):
        return self.successResultOf(d)

    def deliver(self, data: bytes, store=None) -> None:
        self.ok((store or self.store).deliver(USER, BytesSource(data), "bob@example.test"))

    def open(self, store=None):
        f = self.ok((store or self.store).open_folder(USER, "INBOX"))
        self.addCleanup(f.close)
        return f

    def crash(self, store: MboxMailStore) -> None:
        """Drop a store without letting it finish anything (close its index connections)."""
        for st in store.states.loaded.values():
            if st.index is not None:
                st.index.close()
                st.index = None

    def test_first_open_after_delivery_reads_no_mail(self):
        bodies = [b"Subject: %d\nMessage-ID: <%d@x>\n\nbody %d\n" % (i, i, i) for i in range(5)]
        bodies.append(TRICKY)
        pool = _ManualPool()
        store = self.new_store(pool=pool)
        ds = [store.deliver(USER, BytesSource(b), "bob@example.test") for b in bodies[:3]]
        pool.run()
        ds += [store.deliver(USER, BytesSource(b), "bob@example.test") for b in bodies[3:]]
        pool.run()
        for d in ds:
            self.assertIsNone(self.ok(d))
        self.assertLess(pool.batches, len(bodies))  # some batches held several messages
        self.assertEqual([r[0] for r in _rows(self.root / "index")], [1, 2, 3, 4, 5, 6])
        self.patch(mboxfmt, "scan", _no_scan)
        f = self.open(self.new_store())
        self.assertEqual([m.uid for m in f.messages()], [1, 2, 3, 4, 5, 6])
        self.assertEqual(f.uid_next, 7)
        with f.open_message(6) as fh:
            self.assertEqual(fh.read(), crlf(TRICKY))
        self.assertEqual(f.messages()[5].size, len(crlf(TRICKY)))

    def test_rows_equal_a_full_scan(self):
        # What deliveries wrote into the index is exactly what a cold scan finds.
        self.deliver(b"Subject: a\nStatus: RO\n\nbody\n")
        for i in range(4):
            self.deliver(b"Subject: %d\n\n" % i + b"line\n" * (i * 3000))
        self.deliver(TRICKY)
        self.deliver(b"no header block at all")
        fresh = self.open(self.new_store("index2"))
        self.assertEqual(len(fresh.messages()), 7)
        self.assertEqual(_scanned(self.root / "index"), _scanned(self.root / "index2"))
        # ours: mboxrd (1); everything found from now on hides mbox bookkeeping fields (2)
        self.assertEqual({r[9] for r in _rows(self.root / "index")}, {3})
        self.assertEqual({r[9] for r in _rows(self.root / "index2")}, {2})

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        hst.lists(
            hst.lists(
                hst.lists(
                    hst.sampled_from(
                        [
                            b"From ",
                            b">From ",
                            b"x",
                            b"\n",
                            b"\r\n",
                            b"\r",
                            b"\n\n",
                            b"Message-ID: <a>\n",
                            b"Status: RO\n",
                            b"X-Status: AF\n",
                            b"\xe9",
                        ]
                    ),
                    max_size=30,
                ).map(b"".join),
                min_size=1,
                max_size=4,
            ),
            min_size=1,
            max_size=4,
        )
    )
    def test_rows_equal_a_full_scan_property(self, batches):
        root = Path(self.mktemp())
        pool = _ManualPool()
        store = MboxMailStore(root / "mail", root / "index", SyncReactor(), pool, clock=lambda: NOW)
        ds = []
        for batch in batches:
            ds += [store.deliver(USER, BytesSource(b), "s@x") for b in batch]
            pool.run()
        for d in ds:
            self.assertIsNone(self.ok(d))
        cold = MboxMailStore(root / "mail", root / "index2", SyncReactor(), SyncThreadPool())
        f = self.ok(cold.open_folder(USER, "INBOX"))
        f.close()
        self.assertEqual(len(f.messages()), sum(map(len, batches)))
        self.assertEqual(_scanned(root / "index"), _scanned(root / "index2"))
        self.assertEqual({r[9] for r in _rows(root / "index")}, {3})

    def test_open_session_sees_deliveries_at_refresh(self):
        self.deliver(b"Subject: a\n\nbody\n")
        f = self.open()
        g = self.open()
        self.ok(g.set_flags({1: {SEEN}}))
        calls = []
        f.add_listener(lambda: calls.append(1))
        self.deliver(b"Subject: b\n\nbody\n")
        self.deliver(b"Subject: c\n\nbody\n")
        self.assertEqual(len(calls), 2)
        self.assertEqual(f.uid_next, 4)
        self.assertEqual([m.uid for m in f.messages()], [1])  # the view moves at refresh only
        self.patch(mboxfmt, "scan", _no_scan)
        changes = self.ok(f.refresh())
        self.assertEqual([m.uid for m in changes.added], [2, 3])
        self.assertEqual(
            [(m.uid, m.flags) for m in f.messages()],
            [(1, frozenset({SEEN})), (2, frozenset()), (3, frozenset())],
        )
        with f.open_message(3) as fh:
            self.assertEqual(fh.read(), b"Subject: c\r\n\r\nbody\r\n")
        self.assertEqual(len(calls), 2)  # the refresh found nothing it had to announce again

    def test_first_delivery_to_an_opened_empty_inbox(self):
        f = self.open()  # no file yet
        self.deliver(b"Subject: a\n\nbody\n")
        changes = self.ok(f.refresh())
        self.assertEqual([m.uid for m in changes.added], [1])
        with f.open_message(1) as fh:
            self.assertEqual(fh.read(), b"Subject: a\r\n\r\nbody\r\n")

    def test_external_append_between_deliveries(self):
        self.deliver(b"Subject: a\nMessage-ID: <a@x>\n\nbody\n")
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        box.add(b"Subject: ext\nMessage-ID: <e@x>\n\nFrom outside\n")
        box.flush()
        box.unlock()
        box.close()
        self.deliver(b"Subject: b\nMessage-ID: <b@x>\n\nbody\n")
        self.assertEqual([r[0] for r in _rows(self.root / "index")], [1, 2, 3])
        self.patch(mboxfmt, "scan", _no_scan)
        f = self.open(self.new_store())
        with f.open_message(2) as fh:  # Python's mailbox writes mboxo: read as it is
            self.assertEqual(
                fh.read(), b"Subject: ext\r\nMessage-ID: <e@x>\r\n\r\n>From outside\r\n"
            )
        with f.open_message(3) as fh:
            self.assertEqual(fh.read(), b"Subject: b\r\nMessage-ID: <b@x>\r\n\r\nbody\r\n")

    def test_external_rewrite_then_delivery(self):
        for i in range(3):
            self.deliver(b"Subject: %d\nMessage-ID: <%d@x>\n\nbody %d\n" % (i, i, i))
        f = self.open()
        self.ok(f.set_flags({3: {SEEN}}))
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        box.remove(box.keys()[1])  # uid 2; mailbox rewrites the file
        box.flush()
        box.unlock()
        box.close()
        self.deliver(b"Subject: new\nMessage-ID: <n@x>\n\nbody\n")
        changes = self.ok(f.refresh())
        self.assertEqual(changes.expunged, (2,))
        self.assertEqual(
            [(m.uid, m.flags) for m in f.messages()],
            [(1, frozenset()), (3, frozenset({SEEN})), (4, frozenset())],
        )
        g = self.open(self.new_store())
        self.assertEqual([m.uid for m in g.messages()], [1, 3, 4])

    def test_lost_index_commit_is_recovered_by_the_tail_scan(self):
        # deliver() commits its rows without waiting for the disk; a power loss may
        # lose that commit (not the fsynced mail). Simulate it: put back the index
        # as it was before the deliveries, then open with a new process's store.
        self.deliver(b"Subject: a\nMessage-ID: <a@x>\n\nbody\n")
        f = self.open()
        self.ok(f.set_flags({1: {SEEN}}))
        validity = f.uid_validity
        f.close()
        base = self.root / "index" / "example.test" / "alice" / "INBOX.sqlite"
        saved = self.root / "saved.sqlite"
        src = sqlite3.connect(base)
        dst = sqlite3.connect(saved)
        src.backup(dst)
        src.close()
        dst.close()
        self.deliver(b"Subject: b\nMessage-ID: <b@x>\n\nbody b\n")
        self.deliver(b"Subject: c\nMessage-ID: <c@x>\n\nbody c\n")
        self.assertEqual(len(_rows(self.root / "index")), 3)
        self.crash(self.store)
        for suffix in ("-wal", "-shm"):
            Path(str(base) + suffix).unlink(missing_ok=True)
        shutil.copyfile(saved, base)
        self.assertEqual(len(_rows(self.root / "index")), 1)
        g = self.open(self.new_store())
        self.assertEqual((g.uid_validity, g.uid_next), (validity, 4))
        self.assertEqual(
            [(m.uid, m.flags) for m in g.messages()],
            [(1, frozenset({SEEN})), (2, frozenset()), (3, frozenset())],
        )
        with g.open_message(3) as fh:
            self.assertEqual(fh.read(), b"Subject: c\r\nMessage-ID: <c@x>\r\n\r\nbody c\r\n")

    def test_index_failure_does_not_fail_the_delivery(self):
        self.deliver(b"Subject: a\n\nbody\n")

        def broken(*args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        self.patch(FolderIndex, "add", broken)
        self.deliver(b"Subject: b\n\nbody\n")
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertEqual(len(_rows(self.root / "index")), 1)
        self.patch(FolderIndex, "add", _real_add)
        f = self.open(self.new_store())
        self.assertEqual([m.uid for m in f.messages()], [1, 2])

    def test_uids_not_reused_after_expunge(self):
        for i in range(3):
            self.deliver(b"Subject: %d\n\nbody\n" % i)
        f = self.open()
        self.assertEqual(self.ok(f.expunge([3])), [3])
        self.deliver(b"Subject: 4\n\nbody\n")
        self.ok(f.refresh())
        self.assertEqual([m.uid for m in f.messages()], [1, 2, 4])
        f.close()
        self.deliver(b"Subject: 5\n\nbody\n")
        g = self.open(self.new_store())
        self.assertEqual([m.uid for m in g.messages()], [1, 2, 4, 5])


_real_add = FolderIndex.add
