"""
What the flag write-back costs on an mbox another program wrote (no padding:
every header block that gets a Status: grows and the bytes after it move):
about one pass over the file, with syncs per segment of the file, not per
message. Counted at the rewrite engine's os calls, not timed.
"""

from __future__ import annotations

import mailbox
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import SEEN
from mailsrv.store import rewrite
from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool

COUNT = 300


class _CountingOs:
    """C{os} for the rewrite module that counts syncs and the bytes written to the mbox."""

    def __init__(self, mbox: Path) -> None:
        self.mbox = mbox
        self.syncs = 0
        self.mbox_writes = 0
        self.mbox_bytes = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd):
        self.syncs += 1
        return os.fsync(fd)

    def fdatasync(self, fd):
        self.syncs += 1
        return os.fdatasync(fd)

    def pwrite(self, fd, data, off):
        if os.fstat(fd).st_ino == self.mbox.stat().st_ino:
            self.mbox_writes += 1
            self.mbox_bytes += len(data)
        return os.pwrite(fd, data, off)


class ForeignFlagWriteCostTests(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        self.inbox.parent.mkdir(parents=True)
        with open(self.inbox, "wb") as f:  # as another program writes it: no padding
            for i in range(1, COUNT + 1):
                f.write(b"From s@x Mon Jan  1 00:00:00 2024\n")
                f.write(b"From: s@x\nSubject: m%d\nMessage-ID: <%d@x>\n\n" % (i, i))
                f.write(b"line %d of the body\n" % i * 12 + b"\n")
        self.size = self.inbox.stat().st_size
        self.store = MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )

    def seen_on_all(self) -> _CountingOs:
        """Set \\Seen on every message and leave: the write-back grows every header block."""
        f = self.successResultOf(self.store.open_folder(USER, "INBOX"))
        self.successResultOf(f.set_flags({u: {SEEN} for u in range(1, COUNT + 1)}))
        counter = _CountingOs(self.inbox)
        self.patch(rewrite, "os", counter)
        f.close()  # the last session leaves: the flags are written into the file
        return counter

    def check_file(self) -> None:
        box = mailbox.mbox(str(self.inbox), create=False)
        try:
            self.assertEqual([m["Subject"] for m in box], [f"m{i}" for i in range(1, COUNT + 1)])
            self.assertEqual({m.get_flags() for m in box}, {"RO"})
        finally:
            box.close()
        f = self.successResultOf(self.store.open_folder(USER, "INBOX"))
        try:
            self.assertEqual({frozenset(i.flags) for i in f.messages()}, {frozenset({SEEN})})
        finally:
            f.close()

    def test_one_pass_with_a_few_syncs(self):
        counter = self.seen_on_all()
        self.check_file()
        grown = self.inbox.stat().st_size
        self.assertGreater(grown, self.size)  # every header block grew
        # the whole file fits one segment: a few syncs (journal, save file, mbox), not
        # several per message; the bytes written are about the file, once
        self.assertLessEqual(counter.syncs, 12)
        self.assertLessEqual(counter.mbox_bytes, grown)
        self.assertLessEqual(counter.mbox_writes, 4)

    def test_syncs_follow_segments_not_messages(self):
        self.patch(rewrite, "SEGMENT", 8192)
        counter = self.seen_on_all()
        self.check_file()
        segments = self.inbox.stat().st_size // 8192 + 1
        self.assertLess(segments * 4, COUNT)  # so that per message would show
        self.assertLessEqual(counter.syncs, 4 * segments + 10)
        self.assertLessEqual(counter.mbox_bytes, self.inbox.stat().st_size)
