"""
\\Recent (RFC 3501 2.3.2) as the mbox store keeps it: the first UID no session
has been given, a meta row of the folder's index. It survives a restart, holds
between two stores on the same files (two processes), makes what another
program (mutt) appends recent, and costs no disk work when there is nothing
to give.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool
from tests.test_store_flags import mutt, needs_mutt


def message(i: int) -> bytes:
    return b"Subject: m%d\nMessage-ID: <%d@recent>\n\nbody %d\n" % (i, i, i)


class CountingPool(SyncThreadPool):
    """Runs disk work at once and counts it."""

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        self.calls += 1
        super().callInThreadWithCallback(on_result, func, *args, **kwargs)


class RecentIndexTests(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        self.index = self.root / "index" / "example.test" / "alice" / "INBOX.sqlite"

    def store(self, pool=None) -> MboxMailStore:
        """A store on the test's files: a new one is a restart, or another process."""
        return MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            pool or SyncThreadPool(),
            clock=lambda: NOW,
        )

    def deliver(self, store, *numbers):
        for i in numbers:
            self.successResultOf(store.deliver(USER, BytesSource(message(i)), "a@example.test"))

    def open(self, store, read_only=False):
        f = self.successResultOf(store.open_folder(USER, "INBOX", read_only))
        self.addCleanup(f.close)
        return f

    def claimed(self, folder):
        first, upto = self.successResultOf(folder.claim_recent())
        return [m.uid for m in folder.messages() if first <= m.uid < upto]

    def recent(self, store):
        return self.successResultOf(store.folder_status(USER, "INBOX"))["recent"]

    def recent_uid_on_disk(self):
        db = sqlite3.connect(self.index)
        try:
            return db.execute("SELECT value FROM meta WHERE key = 'recent_uid'").fetchone()[0]
        finally:
            db.close()

    def test_survives_a_restart(self):
        first = self.store()
        self.deliver(first, 1, 2)
        f = self.open(first)
        self.assertEqual(self.claimed(f), [1, 2])
        f.close()
        self.assertEqual(self.recent_uid_on_disk(), 3)
        again = self.store()
        self.assertEqual(self.recent(again), 0)
        self.assertEqual(self.claimed(self.open(again)), [])
        self.deliver(again, 3)
        self.assertEqual(self.recent(again), 1)
        self.assertEqual(self.claimed(self.open(again)), [3])

    def test_two_stores_on_the_same_files_never_give_a_message_twice(self):
        # (one process writes mail and index; the claim itself is one transaction)
        one = self.store()
        self.deliver(one, 1, 2, 3)
        a = self.open(one, read_only=True)
        self.assertEqual(self.claimed(a), [1, 2, 3])  # seen, not taken: known to be 1 here
        two = self.store()
        b = self.open(two)
        self.assertEqual(self.claimed(b), [1, 2, 3])
        c = self.open(one)
        self.assertEqual(self.claimed(c), [])
        self.assertEqual(self.recent(one), 0)

    def test_an_index_from_before_recent_holds_nothing_recent(self):
        old = self.store()
        self.deliver(old, 1, 2)
        self.successResultOf(old.folder_status(USER, "INBOX"))
        for st in list(old.states.loaded.values()):
            st.close_index()
        db = sqlite3.connect(self.index)
        db.execute("DELETE FROM meta WHERE key = 'recent_uid'")
        db.commit()
        db.close()
        new = self.store()
        self.assertEqual(self.recent(new), 0)  # what it held was seen already
        self.deliver(new, 3)
        self.assertEqual(self.claimed(self.open(new)), [3])

    def test_nothing_to_give_costs_no_disk_work(self):
        pool = CountingPool()
        store = self.store(pool)
        self.deliver(store, *range(1, 51))
        f = self.open(store)
        self.assertEqual(len(self.claimed(f)), 50)
        before = pool.calls
        for _ in range(3):
            self.assertEqual(self.claimed(f), [])
            self.assertEqual(self.claimed(self.open(store, read_only=True)), [])
        self.assertEqual(pool.calls - before, 3)  # the opens' syncs, no claim

    @needs_mutt
    def test_what_mutt_appends_is_recent(self):
        first = self.store()
        self.deliver(first, 1, 2)
        f = self.open(first)
        self.assertEqual(self.claimed(f), [1, 2])
        source = self.root / "source"
        source.write_bytes(b"From x@example.test Mon Jan  1 00:00:00 2024\n" + message(3) + b"\n")
        mutt(self.root, source, f"<copy-message>{self.inbox.resolve()}<enter><quit>")
        # The session running sees it at its next refresh, and is given it.
        self.assertEqual(self.recent(first), 1)
        self.successResultOf(f.refresh())
        self.assertEqual(self.claimed(f), [3])
        mutt(self.root, source, f"<copy-message>{self.inbox.resolve()}<enter><quit>")
        # After a restart: only mutt's second copy is recent.
        again = self.store()
        self.assertEqual(self.recent(again), 1)
        g = self.open(again)
        self.assertEqual([m.uid for m in g.messages()], [1, 2, 3, 4])
        self.assertEqual(self.claimed(g), [4])
