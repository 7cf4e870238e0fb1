"""
Messages mailsrv stores carry a blank, padded X-Keywords: field, so that writing
their flags into Status:/X-Status: later overwrites their header block with one
of the same length: no byte after it moves and no other index row changes.
Sessions do not see the field; mutt and Python's mailbox read the flags from
the padded headers and no label from the field.
"""

from __future__ import annotations

import mailbox
import shutil
import sqlite3
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN
from mailsrv.spool import BytesSource
from mailsrv.store import mboxfmt
from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool
from tests.test_store_flags import message, mutt, needs_mutt

ALL = {SEEN, ANSWERED, FLAGGED, DRAFT, DELETED}


class PaddingTests(SynchronousTestCase):
    def setUp(self):
        self.root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, True)
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        self.index = self.root / "index" / "example.test" / "alice" / "INBOX.sqlite"
        self.store = self.new_store()

    def new_store(self):
        return MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )

    def deliver(self, n: int) -> None:
        for i in range(1, n + 1):
            self.successResultOf(self.store.deliver(USER, BytesSource(message(i)), "s@x"))

    def rows(self) -> dict[int, tuple[int, int, int]]:
        db = sqlite3.connect(self.index)
        try:
            return {
                u: (a, b, c)
                for u, a, b, c in db.execute("SELECT uid, from_off, start, stop FROM msgs")
            }
        finally:
            db.close()

    def seen_by_sessions(self, store):
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        try:
            return {m.uid: (m.flags, m.size, _read(f, m.uid)) for m in f.messages()}
        finally:
            f.close()

    def write(self, flags) -> None:
        """Set C{flags} in a session and leave: they are written into the file."""
        f = self.successResultOf(self.store.open_folder(USER, "INBOX"))
        self.successResultOf(f.set_flags(flags))
        f.close()

    def test_flag_write_moves_no_later_byte(self):
        self.deliver(1000)
        before = self.seen_by_sessions(self.store)
        rows, data = self.rows(), self.inbox.read_bytes()
        second = rows[2][0]
        self.write({1: {SEEN}})
        after_rows, after = self.rows(), self.inbox.read_bytes()
        self.assertEqual(len(after), len(data))
        self.assertTrue(after[second:] == data[second:], "bytes after message 1 changed")
        self.assertNotEqual(after[:second], data[:second])
        self.assertIn(b"\nStatus: RO\n", after[:second])
        self.assertEqual(after_rows, rows)
        # then all the flags there are, and back to none: still in place
        for flags in (ALL, set()):
            self.write({1: flags})
            self.assertEqual(self.rows(), rows)
            self.assertTrue(self.inbox.read_bytes()[second:] == data[second:])
        now = self.seen_by_sessions(self.new_store())
        self.assertEqual({u: v[1:] for u, v in now.items()}, {u: v[1:] for u, v in before.items()})

    def test_python_mailbox_reads_the_padded_headers(self):
        self.deliver(3)
        self.write({1: {SEEN}, 2: {SEEN, ANSWERED, FLAGGED}})
        box = mailbox.mbox(str(self.inbox))
        try:
            got = {m["Subject"]: (m.get_flags(), m["X-Keywords"]) for m in box}
        finally:
            box.close()
        blank = " " * mboxfmt.PADDING
        # Python strips a header value's leading blanks: the field is there, empty
        self.assertEqual({s: f for s, (f, _) in got.items()}, {"m1": "RO", "m2": "ROAF", "m3": ""})
        self.assertIn(got["m3"][1], ("", blank))

    def test_foreign_message_grows_once_then_stays_in_place(self):
        # a message another program wrote, without padding: the first write grows its
        # header (and gives it padding), the next ones keep its length
        self.inbox.parent.mkdir(parents=True)
        self.inbox.write_bytes(b"From s@x Mon Jan  1 00:00:00 2024\n" + message(1) + b"\n")
        self.deliver(2)
        self.write({1: {SEEN}})
        rows, data = self.rows(), self.inbox.read_bytes()
        self.assertIn(b"X-Keywords:", data[: rows[2][0]])
        self.write({1: ALL - {SEEN}})
        self.assertEqual(self.rows(), rows)
        self.assertTrue(self.inbox.read_bytes()[rows[2][0] :] == data[rows[2][0] :])

    @needs_mutt
    def test_mutt_reads_the_padded_headers(self):
        self.deliver(4)
        self.write({1: {SEEN}, 3: {FLAGGED}})
        # mutt deletes what it sees as new or labelled: 2 and 4 (never opened), 3 is
        # old (Status: O), 1 read; the blank X-Keywords: is no label
        keys = ":set delete=yes<enter><delete-pattern>~N | ~y .<enter><sync-mailbox><quit>"
        mutt(self.root, self.inbox, keys)
        box = mailbox.mbox(str(self.inbox))
        try:
            self.assertEqual({m["Subject"]: m.get_flags() for m in box}, {"m1": "RO", "m3": "OF"})
        finally:
            box.close()
        got = self.seen_by_sessions(self.new_store())
        self.assertEqual({u: v[0] for u, v in got.items()}, {1: {SEEN}, 3: {FLAGGED}})


def _read(f, uid: int) -> bytes:
    with f.open_message(uid) as fh:
        return fh.read()
