"""
A connection dropped in the middle of an APPEND (MULTIAPPEND, CATENATE)
leaves no spool behind: the literals read so far are closed at once, not
whenever the garbage collector gets to them.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from twisted.internet import defer

from tests.imap_loopback_support import LoopbackIMAPCase, RawClient

LINE = b"x" * 78 + b"\r\n"
BIG = b"Subject: big\r\n\r\n" + LINE * (99_000 // len(LINE))  # under the tests' literal limit
# One APPEND keeps its first literals in memory (1 MB), the later ones in files.
MANY = 12


def open_spools(spool_dir: Path) -> list[str]:
    """The files under C{spool_dir} this process holds open (spools are unlinked at once)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(spool_dir)):
            found.append(target)
    return found


class DroppedMidAppend(LoopbackIMAPCase):
    def setUp(self) -> None:
        super().setUp()
        # What is tested is that nothing waits for the collector to close a spool.
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

    def drop_after(self, data: bytes) -> None:
        c = RawClient(self.port_number)
        try:
            c.login()
            c.send(data)
        finally:
            c.close()

    @defer.inlineCallbacks
    def check_dropped(self, data: bytes):
        before = open_spools(self.config.spool_dir)
        yield self.in_thread(self.drop_after, data)
        yield self.settle()
        self.assertEqual(open_spools(self.config.spool_dir), before)
        self.assertEqual(self.failures, [])

    def test_multiappend_dropped_in_a_literal(self):
        n = len(BIG)
        whole = b"".join(b" {%d+}\r\n%s" % (n, BIG) for _ in range(MANY))
        return self.check_dropped(b"A APPEND INBOX" + whole + b" {%d+}\r\n%s" % (n, BIG[:100]))

    def test_multiappend_dropped_between_messages(self):
        n = len(BIG)
        whole = b"".join(b" {%d+}\r\n%s" % (n, BIG) for _ in range(MANY))
        return self.check_dropped(b"A APPEND INBOX" + whole + b" {%d}\r\n" % n)

    def test_catenate_dropped_in_a_part(self):
        n = len(BIG)
        whole = b"".join(b" CATENATE (TEXT {%d+}\r\n%s)" % (n, BIG) for _ in range(MANY))
        cut = b" CATENATE (TEXT {%d+}\r\nx" % n
        return self.check_dropped(b"A APPEND INBOX" + whole + cut)
