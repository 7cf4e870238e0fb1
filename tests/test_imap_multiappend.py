"""
MULTIAPPEND (RFC 3502) over loopback on the mbox store: several messages in
one APPEND, all stored or none, APPENDUID with a UID set (RFC 4315), with
synchronizing and LITERAL+ literals; a refusal part way reads the rest of
the command and stores nothing. And the store's all-or-none append.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial import unittest

from mailsrv.imap.commands.append import uid_set
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.names import user_dir
from mailsrv.store.quota import Quotas
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.store_contract import SyncReactor, SyncThreadPool
from tests.store_crash_worker import ManualPool, Reactor, body
from tests.test_imap_harness import USER, make_config

ONE = b"Subject: one\r\n\r\nfirst\r\n"
TWO = b"Subject: two\r\n\r\nsecond\r\n"
THREE = b"Subject: three\r\n\r\nthird\r\n"


def _tagged(lines: list[bytes]) -> bytes:
    return lines[-1].split(b" ", 1)[1].rstrip(b"\r\n")


class MultiappendTests(LoopbackIMAPCase):
    def client(self) -> RawClient:
        c = RawClient(self.port_number)
        self.addCleanup(c.close)
        c.login()
        return c

    def mbox(self, name: str = "INBOX") -> bytes:
        """The mbox file's octets (none before the first open makes the file)."""
        path = user_dir(self.config.mail_dir, USER) / name
        return path.read_bytes() if path.exists() else b""

    def status(self, c: RawClient) -> bytes:
        return c.cmd(b"S", b"STATUS INBOX (MESSAGES UIDNEXT)")[0]

    def session(self, script) -> defer.Deferred:
        def run():
            c = self.client()
            return script(c)

        return self.in_thread(run)

    @defer.inlineCallbacks
    def test_three_messages_in_one_append(self):
        def script(c):
            assert c.cmd(b"C", b"CAPABILITY")[0].count(b" MULTIAPPEND") == 1
            c.send(b'A APPEND INBOX (\\Seen) "05-Mar-2024 12:30:00 +0100" {%d}\r\n' % len(ONE))
            first = c.file.readline()
            c.send(ONE + b" {%d+}\r\n%s (\\Flagged $Label) {%d}\r\n" % (len(TWO), TWO, len(THREE)))
            second = c.file.readline()
            c.send(THREE + b"\r\n")
            out = c.read_until(b"A")
            fetched = c.cmd(b"F", b"EXAMINE INBOX") and c.cmd(
                b"F", b"UID FETCH 1:* (FLAGS INTERNALDATE BODY.PEEK[])"
            )
            return first, second, out, fetched

        first, second, out, fetched = yield self.session(script)
        self.assertEqual(first, b"+ Ready for literal data\r\n")
        self.assertEqual(second, b"+ Ready for literal data\r\n")
        m = re.match(rb"OK \[APPENDUID (\d+) 1:3\] APPEND completed", _tagged(out))
        self.assertTrue(m, out)
        text = b"".join(fetched)
        self.assertIn(b'FLAGS (\\Seen \\Recent) INTERNALDATE "05-Mar-2024 11:30:00 +0000"', text)
        self.assertIn(b"FLAGS ($Label \\Flagged \\Recent)", text)
        for message in (ONE, TWO, THREE):
            self.assertIn(b"{%d}\r\n%s" % (len(message), message), text)
        self.assertEqual(self.mbox().count(b"\nSubject: "), 3)

    @defer.inlineCallbacks
    def test_bad_flag_in_the_middle_stores_nothing(self):
        def script(c):
            line = b"A APPEND INBOX {%d+}\r\n%s (\\Bogus) {%d+}\r\n%s {%d+}\r\n%s\r\n" % (
                len(ONE),
                ONE,
                len(TWO),
                TWO,
                len(THREE),
                THREE,
            )
            c.send(line)
            out = c.read_until(b"A")
            return out, c.cmd(b"N", b"NOOP"), self.status(c)

        out, noop, status = yield self.session(script)
        # Every octet of the command was read: the LITERAL+ octets after the
        # bad flag are not taken for commands (RFC 7888 4).
        self.assertEqual(out, [b"A BAD Invalid system flag \\Bogus\r\n"])
        self.assertEqual(noop, [b"N OK NOOP completed\r\n"])
        self.assertEqual(status, b"* STATUS INBOX (MESSAGES 0 UIDNEXT 1)\r\n")
        self.assertEqual(self.mbox(), b"")

    @defer.inlineCallbacks
    def test_literal_over_the_limit_in_the_middle_stores_nothing(self):
        big = 100_001  # the harness's APPENDLIMIT is 100000

        def script(c):
            # LITERAL+: the big literal's octets are read and dropped.
            c.send(
                b"A APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s (\\Seen) {%d+}\r\n%s\r\n"
                % (len(ONE), ONE, big, b"x" * big, len(TWO), TWO)
            )
            plus = c.read_until(b"A")
            # Synchronizing: refused before the client sends it.
            c.send(b"B APPEND INBOX {%d+}\r\n%s {%d}\r\n" % (len(ONE), ONE, big))
            sync = c.read_until(b"B")
            return plus, sync, c.cmd(b"N", b"NOOP"), self.status(c)

        plus, sync, noop, status = yield self.session(script)
        self.assertEqual(plus, [b"A NO [TOOBIG] Message too big\r\n"])
        self.assertEqual(sync, [b"B NO [TOOBIG] Message too big\r\n"])
        self.assertEqual(noop, [b"N OK NOOP completed\r\n"])
        self.assertEqual(status, b"* STATUS INBOX (MESSAGES 0 UIDNEXT 1)\r\n")
        self.assertEqual(self.mbox(), b"")

    @defer.inlineCallbacks
    def test_syntax_errors_part_way(self):
        def script(c):
            out = []
            for tag, rest in (
                (b"A", b"APPEND INBOX {%d+}\r\n%sjunk" % (len(ONE), ONE)),
                (b"B", b'APPEND INBOX {%d+}\r\n%s "bad date" {1+}\r\nx' % (len(ONE), ONE)),
                (b"C", b"APPEND INBOX {%d+}\r\n%s " % (len(ONE), ONE)),
                (b"D", b"APPEND INBOX (\\Seen)"),
                (b"E", b"APPEND INBOX {%d+}\r\n%s (\\Seen) {1+}\r\nx" % (len(ONE), ONE)),
            ):
                out.append(c.cmd(tag, rest))
            return out, self.status(c)

        out, status = yield self.session(script)
        self.assertEqual(out[0], [b"A BAD Invalid arguments\r\n"])
        self.assertEqual(out[1], [b"B BAD Bad date-time\r\n"])
        self.assertEqual(out[2], [b"C BAD Missing literal\r\n"])
        self.assertEqual(out[3], [b"D BAD Invalid arguments\r\n"])
        self.assertRegex(out[4][-1], rb"^E OK \[APPENDUID \d+ 1:2\] APPEND completed\r\n$")
        self.assertEqual(status, b"* STATUS INBOX (MESSAGES 2 UIDNEXT 3)\r\n")

    @defer.inlineCallbacks
    def test_into_the_selected_mailbox_and_a_missing_one(self):
        def script(c):
            c.cmd(b"S", b"SELECT INBOX")
            out = c.cmd(
                b"A", b"APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s" % (len(ONE), ONE, len(TWO), TWO)
            )
            nope = c.cmd(
                b"B", b"APPEND Nope {%d+}\r\n%s {%d+}\r\n%s" % (len(ONE), ONE, len(TWO), TWO)
            )
            return out, nope

        out, nope = yield self.session(script)
        self.assertEqual(out[:2], [b"* 2 EXISTS\r\n", b"* 2 RECENT\r\n"])
        self.assertRegex(out[-1], rb"^A OK \[APPENDUID \d+ 1:2\] APPEND completed\r\n$")
        self.assertEqual(nope, [b"B NO [TRYCREATE] Mailbox doesn't exist\r\n"])


class QuotaTests(LoopbackIMAPCase):
    """The quota counts every message of a MULTIAPPEND (RFC 9208 4.3)."""

    def setUp(self):
        super().setUp()
        config = make_config(self.tmp, '[quota]\nstorage = "20K"\n')

        def run(f, *a, **kw):
            return threads.deferToThreadPool(self.reactor, self.pool, f, *a, **kw)

        self.factory.quota = Quotas(config.quota, self.config.mail_dir, run)

    @defer.inlineCallbacks
    def test_all_messages_count(self):
        filler = b"Subject: filler\r\n\r\n" + b"x" * 8000 + b"\r\n"
        three = b"APPEND INBOX" + b" {%d+}\r\n%s" % (len(filler), filler) * 3
        two = b"APPEND INBOX" + b" {%d+}\r\n%s" % (len(filler), filler) * 2

        def script():
            c = RawClient(self.port_number)
            try:
                c.login()
                return c.cmd(b"A", three), c.cmd(b"B", two), c.cmd(b"S", b"STATUS INBOX (MESSAGES)")
            finally:
                c.close()

        over, fits, status = yield self.in_thread(script)
        self.assertEqual(over, [b"A NO [OVERQUOTA] Quota exceeded (mailbox for user is full)\r\n"])
        self.assertRegex(fits[-1], rb"^B OK \[APPENDUID \d+ 1:2\]")
        self.assertEqual(status[0], b"* STATUS INBOX (MESSAGES 2)\r\n")


class _BreaksOnSecondRead:
    """A message source whose second read (the store's write) ends early: a failure mid-append."""

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._data = data
        self._opened = 0

    def open(self):
        self._opened += 1
        if self._opened == 1:
            return io.BytesIO(self._data)
        return io.BytesIO(self._data[: len(self._data) // 2])


class AllOrNoneInTheStore(LoopbackIMAPCase):
    """A failure while the messages are being written leaves none of them."""

    @defer.inlineCallbacks
    def test_failure_part_way_leaves_nothing(self):
        yield self.store.deliver(USER, BytesSource(b"Subject: before\n\nx\n"), "a@b.test")
        folder = yield self.store.open_folder(USER, "INBOX")
        self.addCleanup(folder.close)
        path = user_dir(self.config.mail_dir, USER) / "INBOX"
        before = path.read_bytes()
        big = b"Subject: big\n\n" + b"y" * 300 * 1024 + b"\n"  # streamed, not held whole
        items = [
            (BytesSource(ONE.replace(b"\r\n", b"\n")), frozenset(), None),
            (_BreaksOnSecondRead(big), frozenset(), None),
        ]
        with self.assertRaises(OSError):
            yield folder.append_many(items)
        self.assertEqual(path.read_bytes(), before)
        yield folder.refresh()
        self.assertEqual([i.uid for i in folder.messages()], [1])
        uids = yield folder.append_many(
            [(BytesSource(b"Subject: after\n\nz\n"), frozenset(), None)]
        )
        self.assertEqual(uids, [2])


class UidSetTests(unittest.TestCase):
    def test_uid_set(self):
        self.assertEqual(uid_set([4]), b"4")
        self.assertEqual(uid_set([2, 3, 4, 7, 9, 10]), b"2:4,7,9:10")


BATCH = 3  # messages per append_many in the kill test: ids 3k, 3k+1, 3k+2
REPO = Path(__file__).resolve().parent.parent
CRASH_USER = "crash@example.test"


def crash_worker(root: Path) -> None:
    """Append batches of BATCH big messages with append_many until killed; "ack k" once durable."""
    pool = ManualPool()
    store = MboxMailStore(root / "mail", root / "index", Reactor(), pool)
    opened: list = []
    store.open_folder(CRASH_USER, "INBOX").addCallback(opened.append)
    pool.run()
    folder = opened[0]
    k = 0
    while True:
        items = [(BytesSource(body(BATCH * k + j)), frozenset(), None) for j in range(BATCH)]
        d = folder.append_many(items)
        d.addCallback(lambda _, k=k: (sys.stdout.write(f"ack {k}\n"), sys.stdout.flush()))
        pool.run()
        k += 1


class KillDuringMultiappend(unittest.SynchronousTestCase):
    """kill -9 while batches are appended: each batch is there whole or not at all."""

    def test_batches_whole_or_absent(self):
        for seed in range(2):
            root = Path(tempfile.mkdtemp(prefix="multiappend-kill-"))
            self.addCleanup(lambda r=root: shutil.rmtree(r, True))
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.test_imap_multiappend", str(root)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            try:
                first = proc.stdout.readline()
                self.assertTrue(first.startswith(b"ack "), first)
                time.sleep(random.Random(seed).uniform(0.05, 0.5))
            finally:
                proc.send_signal(signal.SIGKILL)
                rest = proc.stdout.read()
                proc.stdout.close()
                proc.wait()
            acked = {
                int(w.split()[1]) for w in (first + rest).split(b"\n") if w.startswith(b"ack ")
            }
            store = MboxMailStore(root / "mail", root / "index", SyncReactor(), SyncThreadPool())
            folder = self.successResultOf(store.open_folder(CRASH_USER, "INBOX"))
            mids = []
            for info in folder.messages():
                with folder.open_message(info.uid) as fh:
                    data = fh.read()
                mid = int(data.split(b"\r\n", 1)[0].split(b"m", 1)[1])
                self.assertEqual(data, body(mid).replace(b"\n", b"\r\n"), f"{mid} is damaged")
                mids.append(mid)
            folder.close()
            batches = len(mids) // BATCH
            self.assertEqual(mids, list(range(batches * BATCH)), "a batch is there in part")
            self.assertLessEqual(acked, set(range(batches)))


if __name__ == "__main__":
    crash_worker(Path(sys.argv[1]))
