"""
RFC 7162 mod-sequences as the mbox store keeps them in the folder's index:
across a restart, through the upgrade of an index from before them, through
changes other programs make to the file (flags in Status:/X-Status:, appends,
removals), afresh when the index is rebuilt; the bounded list of expunged
UIDs; and "changed since" answered from an sqlite index on the modseq column.
"""

from __future__ import annotations

import mailbox
import sqlite3
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import FLAGGED, SEEN
from mailsrv.spool import BytesSource
from mailsrv.store.index import FolderIndex, remove_index
from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool
from tests.test_store_flags import mutt, needs_mutt


def message(i: int) -> bytes:
    return b"Subject: m%d\nMessage-ID: <%d@modseq>\n\nbody %d\n" % (i, i, i)


class _StoreFiles(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        self.base = self.root / "index" / "example.test" / "alice" / "INBOX"

    def store(self) -> MboxMailStore:
        """A store on the test's files: a new one is a restart."""
        return MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )

    def deliver(self, store, *numbers):
        for i in numbers:
            self.successResultOf(store.deliver(USER, BytesSource(message(i)), "a@example.test"))

    def open(self, store):
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        self.addCleanup(f.close)
        return f

    def modseqs(self, folder):
        return {m.uid: m.modseq for m in folder.messages()}

    def edit_with_mailbox(self, change):
        """Let Python's mailbox (an mboxo writer, as mutt) rewrite the INBOX."""
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        try:
            change(box)
            box.flush()
        finally:
            box.unlock()
            box.close()


class ModseqIndexTests(_StoreFiles):
    def test_kept_across_a_restart(self):
        first = self.store()
        self.deliver(first, 1, 2, 3)
        f = self.open(first)
        self.successResultOf(f.change_flags([2], add={SEEN}))
        self.successResultOf(f.expunge([3]))
        before = (self.modseqs(f), f.highest_modseq)
        f.close()
        self.successResultOf(first.write_back(10))
        g = self.open(self.store())
        self.assertEqual((self.modseqs(g), g.highest_modseq), before)
        self.assertEqual(self.successResultOf(g.vanished_since(before[1] - 1)), [3])
        self.assertEqual(
            self.successResultOf(g.changed_since(before[0][1])), [(2, before[0][2], {SEEN})]
        )

    def test_an_index_from_before_modseqs_gets_modseq_1(self):
        first = self.store()
        self.deliver(first, 1, 2)
        f = self.open(first)
        self.successResultOf(f.change_flags([1], add={SEEN}))
        f.close()
        del first
        # the index as an older version left it: no modseq column, table or meta rows
        db = sqlite3.connect(str(self.base) + ".sqlite")
        db.execute("DROP INDEX msgs_modseq")
        db.execute("ALTER TABLE msgs DROP COLUMN modseq")
        db.execute("DROP TABLE vanished")
        db.execute("DELETE FROM meta WHERE key IN ('highest_modseq', 'vanished_floor')")
        db.commit()
        db.close()
        g = self.open(self.store())
        self.assertEqual((self.modseqs(g), g.highest_modseq), ({1: 1, 2: 1}, 1))
        self.assertEqual([m.flags for m in g.messages()], [{SEEN}, set()])
        self.assertIsNone(self.successResultOf(g.vanished_since(0)))  # not known
        self.assertEqual(self.successResultOf(g.vanished_since(1)), [])
        res = self.successResultOf(g.change_flags([2], add={FLAGGED}, unchanged_since=1))
        self.assertEqual((res.changed, res.modseqs), ({2}, {2: 2}))
        self.successResultOf(g.expunge([1]))
        self.assertEqual(self.successResultOf(g.vanished_since(1)), [1])
        self.assertEqual(g.highest_modseq, 3)

    def test_changes_by_other_programs_take_new_modseqs(self):
        store = self.store()
        self.deliver(store, 1, 2, 3, 4)
        f = self.open(store)
        before = self.modseqs(f)
        mark = f.highest_modseq

        def flag_and_drop(box):
            for key in box.keys():
                msg = box[key]
                if msg["Subject"] == "m2":
                    msg.set_flags("RF")  # mutt's Status: R, X-Status: F
                    box[key] = msg
                elif msg["Subject"] == "m3":
                    box.remove(key)

        self.edit_with_mailbox(flag_and_drop)
        changes = self.successResultOf(f.refresh())
        self.assertEqual(changes.expunged, (3,))
        top = f.highest_modseq
        self.assertEqual(top, mark + 1)  # one rescan, one modseq
        self.assertEqual(self.modseqs(f), {1: before[1], 2: top, 4: before[4]})
        self.assertEqual(
            self.successResultOf(f.changed_since(mark)), [(2, top, frozenset({SEEN, FLAGGED}))]
        )
        self.assertEqual(self.successResultOf(f.vanished_since(mark)), [3])
        # another program appends: the new message takes the next modseq
        with open(self.inbox, "ab") as out:
            out.write(b"From x@example.test Sat Jan  1 00:00:00 2022\n" + message(5) + b"\n")
        self.successResultOf(f.refresh())
        self.assertEqual(self.modseqs(f)[5], top + 1)
        self.assertEqual(f.highest_modseq, top + 1)
        # and after a restart, the same
        g = self.open(self.store())
        self.assertEqual((self.modseqs(g), g.highest_modseq), (self.modseqs(f), top + 1))

    @needs_mutt
    def test_mutt_flagging_a_message_gives_it_a_new_modseq(self):
        store = self.store()
        self.deliver(store, 1, 2, 3)
        f = self.open(store)
        before = self.modseqs(f)
        mark = f.highest_modseq
        mutt(self.root, self.inbox, "2<enter><set-flag>!<clear-flag>N<sync-mailbox><quit>")
        self.successResultOf(f.refresh())
        top = f.highest_modseq
        self.assertEqual(top, mark + 1)
        self.assertEqual(self.modseqs(f), {1: before[1], 2: top, 3: before[3]})
        self.assertEqual(
            self.successResultOf(f.changed_since(mark)), [(2, top, frozenset({SEEN, FLAGGED}))]
        )
        self.assertEqual(self.successResultOf(f.vanished_since(mark)), [])

    def test_a_rebuilt_index_starts_afresh(self):
        first = self.store()
        self.deliver(first, 1, 2)
        f = self.open(first)
        for _ in range(5):
            self.successResultOf(f.change_flags([1], add={SEEN}))
            self.successResultOf(f.change_flags([1], remove={SEEN}))
        old = (f.uid_validity, f.highest_modseq)
        f.close()
        del first
        remove_index(self.base)
        g = self.open(self.store())
        self.assertNotEqual(g.uid_validity, old[0])
        self.assertLess(g.highest_modseq, old[1])
        self.assertEqual(set(self.modseqs(g).values()), {g.highest_modseq})
        self.assertEqual(self.successResultOf(g.vanished_since(1)), [])

    def test_changed_since_reads_the_modseq_index(self):
        store = self.store()
        self.deliver(store, 1)
        self.open(store)
        db = sqlite3.connect(str(self.base) + ".sqlite")
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT uid, modseq, flags FROM msgs WHERE modseq > ?", (5,)
        ).fetchall()
        db.close()
        self.assertIn("USING INDEX msgs_modseq", " ".join(str(r[-1]) for r in plan))


class VanishedHistoryTests(SynchronousTestCase):
    """The expunged UIDs an index keeps: the newest C{vanished_limit}, and from which modseq."""

    def row(self, uid: int, modseq: int) -> tuple:
        return (uid, 0, 0, 0, 1, "", NOW, 0, uid, 1, "", modseq)

    def test_oldest_dropped_first_and_the_floor_rises(self):
        base = Path(self.mktemp())
        idx = FolderIndex(base, lambda: 7, vanished_limit=3)
        self.addCleanup(idx.close)
        ms = idx.next_modseq
        idx.add([self.row(u, ms) for u in range(1, 7)], 7, (0, 0, 0))
        self.assertEqual(idx.highest_modseq, ms)
        marks = []
        for removed in ([1, 2], [3], [4, 5]):
            marks.append(idx.highest_modseq)
            idx.rewrite(removed, [], (0, 0, 0))
        self.assertEqual(idx.highest_modseq, ms + 3)
        # five expunged, three kept: 1 and 2 (expunged at ms + 1) are forgotten
        self.assertIsNone(idx.vanished_since(marks[0]))
        self.assertEqual(idx.vanished_since(marks[1]), [3, 4, 5])
        self.assertEqual(idx.vanished_since(marks[2]), [4, 5])
        # a rewrite told again (after a crash) records nothing twice
        idx.rewrite([4, 5], [], (0, 0, 0))
        self.assertEqual(idx.highest_modseq, ms + 3)
        self.assertEqual(idx.vanished_since(marks[1]), [3, 4, 5])
        idx.close()
        again = FolderIndex(base, lambda: 8, vanished_limit=3)
        self.addCleanup(again.close)
        self.assertEqual((again.uid_validity, again.highest_modseq), (7, ms + 3))
        self.assertIsNone(again.vanished_since(marks[0]))
        self.assertEqual(again.changed_since(ms - 1), [(6, ms, frozenset())])


class PowerLossTests(_StoreFiles):
    def test_highestmodseq_never_goes_below_what_clients_were_shown(self):
        # Deliveries commit their index rows without waiting for the disk:
        # a power loss can undo the last commits (the messages themselves are
        # in the fsynced mbox). Rebuilt from the file, HIGHESTMODSEQ must not
        # fall below what a client saw (RFC 7162 3.1: it only grows).
        store = self.store()
        self.deliver(store, 1)
        f = self.open(store)
        kept = f.highest_modseq
        f.close()
        db = sqlite3.connect(str(self.base) + ".sqlite")
        meta = db.execute("SELECT key, value FROM meta").fetchall()
        db.close()
        self.deliver(store, 2, 3, 4)  # three batches, three modseqs
        f = self.open(store)
        shown = f.highest_modseq
        self.assertEqual(shown, kept + 3)
        f.close()
        del store
        # The power loss: the three commits are gone from the index.
        db = sqlite3.connect(str(self.base) + ".sqlite")
        db.execute("DELETE FROM msgs WHERE uid > 1")
        db.executemany("UPDATE meta SET value = ? WHERE key = ?", [(v, k) for k, v in meta])
        db.commit()
        db.close()
        g = self.open(self.store())
        self.assertEqual(len(g.messages()), 4)
        self.assertGreaterEqual(g.highest_modseq, shown)
        self.successResultOf(g.change_flags([1], add={SEEN}))
        self.assertGreater(g.highest_modseq, shown)


class UpgradeFailureTests(_StoreFiles):
    def test_an_index_that_cannot_be_written_now_is_not_thrown_away(self):
        first = self.store()
        self.deliver(first, 1, 2)
        f = self.open(first)
        validity = f.uid_validity
        f.close()
        del first
        # Another connection holds the database: opening it fails for now
        # ("database is locked"), as a full disk or an I/O error would.
        path = str(self.base) + ".sqlite"
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with self.assertRaises(sqlite3.OperationalError):
                FolderIndex(self.base, lambda: 999)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        g = self.open(self.store())
        self.assertEqual((g.uid_validity, [m.uid for m in g.messages()]), (validity, [1, 2]))
