"""mbox-specific behaviour of MboxMailStore: the file format, the index, other programs' edits."""

from __future__ import annotations

import io
import mailbox
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import ANSWERED, SEEN, FolderError
from mailsrv.spool import BytesSource
from mailsrv.store import mboxfmt
from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool, crlf

TRICKY = (
    b"Subject: tricky\nMessage-ID: <t@x>\n\nFrom x\n>From x\n>>From x\n"
    b"From\n>From\nFrom  two spaces\n\xff\xfe\x80 8-bit \xe9\n\n\nend\n"
)


class _Base(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.store = self.new_store()
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"

    def new_store(self):
        return MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )

    def ok(self, d):
        return self.successResultOf(d)

    def deliver(self, data, sender="bob@example.test", store=None):
        return self.ok((store or self.store).deliver(USER, BytesSource(data), sender))

    def open(self, store=None, name="INBOX"):
        f = self.ok((store or self.store).open_folder(USER, name))
        self.addCleanup(f.close)
        return f

    def read(self, f, uid):
        with f.open_message(uid) as fh:
            return fh.read()


class FormatTests(_Base):
    def test_file_layout_and_from_line(self):
        self.deliver(b"Subject: a\n\nbody\n", sender="bob@example.test")
        self.deliver(b"Subject: b\n\nbody\n", sender="")
        data = self.inbox.read_bytes()
        self.assertEqual(
            data,
            b"From bob@example.test Tue Nov 14 22:13:20 2023\nSubject: a\n"
            b"X-Keywords:" + b" " * 30 + b"\n\nbody\n\n"
            b"From MAILER-DAEMON Tue Nov 14 22:13:20 2023\nSubject: b\n"
            b"X-Keywords:" + b" " * 30 + b"\n\nbody\n\n",
        )

    def test_mboxrd_round_trip(self):
        self.deliver(TRICKY)
        raw = self.inbox.read_bytes()
        self.assertIn(b"\n>From x\n>>From x\n>>>From x\n", raw)
        f = self.open()
        self.assertEqual(self.read(f, 1), crlf(TRICKY))
        self.assertEqual(f.messages()[0].size, len(crlf(TRICKY)))

    def test_python_mailbox_reads_it(self):
        self.deliver(TRICKY)
        self.deliver(b"Subject: two\n\nsecond\n", sender="")
        box = mailbox.mbox(str(self.inbox), create=False)
        msgs = list(box)
        box.close()
        self.assertEqual(len(msgs), 2)
        self.assertEqual(msgs[0].get_from(), "bob@example.test Tue Nov 14 22:13:20 2023")
        self.assertEqual(msgs[0]["Subject"], "tricky")
        self.assertEqual(msgs[1].get_payload(), "second\n")

    def test_missing_final_newline(self):
        self.deliver(b"Subject: x\n\nno newline")
        self.deliver(b"Subject: y\n\nnext\n")
        f = self.open()
        self.assertEqual(self.read(f, 1), b"Subject: x\r\n\r\nno newline\r\n")
        self.assertEqual(self.read(f, 2), b"Subject: y\r\n\r\nnext\r\n")

    def test_large_message_streams(self):
        body = b"".join(b"line %d From here\nFrom %d\n>From %d\n" % (i, i, i) for i in range(60000))
        data = b"Subject: big\n\n" + body
        self.assertGreater(len(data), mboxfmt.SMALL_MESSAGE)
        self.deliver(data)
        self.deliver(b"Subject: after\n\nok\n")
        f = self.open()
        info = f.messages()[0]
        self.assertEqual(info.size, len(crlf(data)))
        with f.open_message(1) as fh:
            self.assertNotIsInstance(fh, io.BytesIO)
            parts = []
            while True:
                chunk = fh.read(10000)
                if not chunk:
                    break
                parts.append(chunk)
        self.assertEqual(b"".join(parts), crlf(data))
        self.assertEqual(f.read_headers(1), b"Subject: big\r\n\r\n")
        self.assertEqual(self.read(f, 2), b"Subject: after\r\n\r\nok\r\n")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(
            st.lists(
                st.sampled_from(
                    [
                        b"From ",
                        b">",
                        b">From ",
                        b"From",
                        b"x",
                        b" ",
                        b"\xe9",
                        b"\x00",
                        b"\n",
                        b"Subject: s",
                        b"\n\n",
                    ]
                ),
                max_size=30,
            ).map(b"".join),
            min_size=1,
            max_size=5,
        )
    )
    def test_round_trip_property(self, bodies):
        root = Path(self.mktemp())
        store = MboxMailStore(root / "m", root / "i", SyncReactor(), SyncThreadPool())
        bodies = [b if b.endswith(b"\n") else b + b"\n" for b in bodies]
        for b in bodies:
            self.ok(store.deliver(USER, BytesSource(b), "s@x"))
        # With the index, our messages read back exactly; a store without it
        # cannot know who wrote them and reads them as mboxo (as they are).
        cold = MboxMailStore(root / "m", root / "i2", SyncReactor(), SyncThreadPool())
        as_is = [crlf(mboxfmt.quote_lines(b)) for b in bodies]
        for s, want in ((store, [crlf(b) for b in bodies]), (cold, as_is)):
            f = self.ok(s.open_folder(USER, "INBOX"))
            got = [self.read(f, i.uid) for i in f.messages()]
            self.assertEqual(got, want)
            self.assertEqual([i.size for i in f.messages()], [len(w) for w in want])
            f.close()


class ScannerTests(SynchronousTestCase):
    def scan_all(self, data: bytes, chunk: int):
        path = self.mktemp()
        with open(path, "wb") as fh:
            fh.write(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            r = mboxfmt.scan(fd, 0, len(data), chunk)
        finally:
            os.close(fd)
        return (
            list(r.from_offs),
            list(r.starts),
            list(r.ends),
            list(r.sizes),
            list(r.fps),
            r.flags,
            list(r.dates),
            r.end,
        )

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(
            st.lists(
                st.sampled_from(
                    [
                        b"From ",
                        b"\nFrom ",
                        b">",
                        b"x",
                        b"\n",
                        b"\r\n",
                        b"\n\n",
                        b"Message-ID: <a>\n",
                        b"Status: RO\n",
                    ]
                ),
                max_size=40,
            ).map(b"".join),
            max_size=6,
        ),
        st.integers(min_value=1, max_value=64),
    )
    def test_chunk_size_does_not_matter(self, parts, chunk):
        data = b"".join(b"From a@b Mon Jan  1 00:00:00 2024\n" + p + b"\n" for p in parts)
        self.assertEqual(self.scan_all(data, chunk), self.scan_all(data, 1 << 20))

    def test_foreign_layouts(self):
        # No blank lines between messages, and a CRLF mbox.
        data = b"From a Mon Jan  1 00:00:00 2024\nS: 1\n\nb\nFrom a Mon Jan  1 00:00:00 2024\nS: 2\n\nc\n"
        r = self.scan_all(data, 1 << 20)
        self.assertEqual(len(r[0]), 2)
        self.assertEqual(r[3], [len(b"S: 1\r\n\r\nb\r\n"), len(b"S: 2\r\n\r\nc\r\n")])
        data = b"From a Mon Jan  1 00:00:00 2024\r\nS: 1\r\n\r\nb\r\n\r\nFrom a Mon Jan  1 00:00:00 2024\r\nS: 2\r\n\r\nc\r\n"
        r = self.scan_all(data, 1 << 20)
        self.assertEqual(r[3], [len(b"S: 1\r\n\r\nb\r\n"), len(b"S: 2\r\n\r\nc\r\n")])
        self.assertEqual(r[6], [1704067200.0, 1704067200.0])


class IndexTests(_Base):
    def test_persists_across_restarts(self):
        for i in range(3):
            self.deliver(b"Subject: %d\n\nbody\n" % i)
        f = self.open()
        self.ok(f.set_flags({2: {SEEN, "$Work"}}))
        self.ok(f.expunge([1]))
        validity = f.uid_validity
        f.close()
        g = self.open(self.new_store())
        self.assertEqual(
            [(m.uid, m.flags) for m in g.messages()],
            [(2, frozenset({SEEN, "$Work"})), (3, frozenset())],
        )
        self.assertEqual((g.uid_validity, g.uid_next), (validity, 4))
        self.assertEqual(self.read(g, 3), b"Subject: 2\r\n\r\nbody\r\n")

    def test_deleted_index_gives_new_uidvalidity(self):
        self.deliver(b"Subject: a\n\nbody\n")
        v1 = self.open().uid_validity
        for f in (self.root / "index").rglob("*.sqlite*"):
            if f.is_file():
                f.unlink()
        g = self.open(self.new_store())
        self.assertNotEqual(g.uid_validity, v1)
        self.assertEqual(len(g.messages()), 1)

    def test_corrupt_index_is_rebuilt(self):
        self.deliver(b"Subject: a\n\nbody\n")
        v1 = self.open().uid_validity
        for f in (self.root / "index").rglob("*.sqlite"):
            f.write_bytes(b"this is not a database" * 100)
        for f in (self.root / "index").rglob("*.sqlite-*"):
            f.unlink()
        g = self.open(self.new_store())
        self.assertNotEqual(g.uid_validity, v1)
        self.assertEqual(self.read(g, 1), b"Subject: a\r\n\r\nbody\r\n")

    def test_external_append_python_mailbox(self):
        self.deliver(b"Subject: a\nMessage-ID: <a@x>\n\nbody\n")
        f = self.open()
        self.ok(f.set_flags({1: {SEEN}}))
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        box.add(b"Subject: ext\nStatus: RO\nX-Status: A\n\nFrom outside\n")
        box.flush()
        box.unlock()
        box.close()
        with open(self.inbox, "ab") as fh:  # and raw bytes, as procmail would
            fh.write(b"From raw@x Mon Jan  1 00:00:00 2024\nSubject: raw\n\n>From quoted\n\n")
        changes = self.ok(f.refresh())
        self.assertEqual([i.uid for i in changes.added], [2, 3])
        msgs = f.messages()
        self.assertEqual(
            [(m.uid, m.flags) for m in msgs],
            [(1, frozenset({SEEN})), (2, frozenset({SEEN, ANSWERED})), (3, frozenset())],
        )
        # written by another program (mboxo): ">From" is served as it is
        self.assertEqual(self.read(f, 3), b"Subject: raw\r\n\r\n>From quoted\r\n")
        self.assertEqual(msgs[2].internal_date, 1704067200.0)

    def test_external_rewrite_keeps_uids_and_flags(self):
        for i in range(5):
            self.deliver(b"Subject: %d\nMessage-ID: <%d@x>\n\nbody %d\n" % (i, i, i))
        f = self.open()
        self.ok(f.set_flags({2: {SEEN}, 4: {"$Label"}, 5: {SEEN}}))
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        keys = box.keys()
        box.remove(keys[2])  # uid 3
        box.flush()  # rewrites the file (new inode)
        box.unlock()
        box.close()
        changes = self.ok(f.refresh())
        self.assertEqual(changes.expunged, (3,))
        self.assertEqual(changes.added, ())
        self.assertEqual(
            [(m.uid, m.flags) for m in f.messages()],
            [
                (1, frozenset()),
                (2, frozenset({SEEN})),
                (4, frozenset({"$Label"})),
                (5, frozenset({SEEN})),
            ],
        )
        self.assertEqual(self.read(f, 4), b"Subject: 3\r\nMessage-ID: <3@x>\r\n\r\nbody 3\r\n")
        g = self.open(self.new_store())
        self.assertEqual([m.uid for m in g.messages()], [1, 2, 4, 5])

    def test_in_place_edit_of_headers(self):
        # mutt adds Status: headers and rewrites in place (same inode).
        for i in range(3):
            self.deliver(b"Subject: %d\nMessage-ID: <%d@x>\n\nbody %d\n" % (i, i, i))
        f = self.open()
        data = self.inbox.read_bytes().replace(b"Subject: 1\n", b"Subject: 1\nStatus: RO\n")
        with open(self.inbox, "r+b") as fh:
            fh.write(data)
        changes = self.ok(f.refresh())
        self.assertEqual(changes.expunged, ())
        self.assertEqual([m.uid for m in f.messages()], [1, 2, 3])
        self.assertEqual(self.read(f, 3), b"Subject: 2\r\nMessage-ID: <2@x>\r\n\r\nbody 2\r\n")

    def test_insert_in_middle_keeps_uids_ascending(self):
        for i in range(3):
            self.deliver(b"Subject: %d\nMessage-ID: <%d@x>\n\nbody %d\n" % (i, i, i))
        f = self.open()
        data = self.inbox.read_bytes()
        second = data.index(b"From ", 1)
        new = b"From x Mon Jan  1 00:00:00 2024\nSubject: new\n\nnew\n\n"
        self.inbox.write_bytes(data[:second] + new + data[second:])
        self.ok(f.refresh())
        uids = [m.uid for m in f.messages()]
        self.assertEqual(uids, sorted(uids))
        self.assertEqual(uids[0], 1)
        self.assertEqual(len(uids), 4)
        self.assertEqual(self.read(f, uids[1]), b"Subject: new\r\n\r\nnew\r\n")

    def test_append_after_foreign_tail(self):
        # Another program left no blank line (or no newline) at the end.
        for tail in (b"no blank\n", b"no newline"):
            self.deliver(b"Subject: a\nMessage-ID: <a@x>\n\nbody\n")
            f = self.open()
            with open(self.inbox, "ab") as fh:
                fh.write(b"From x Mon Jan  1 00:00:00 2024\nSubject: ext\n\n" + tail)
            self.ok(f.refresh())
            uids = [m.uid for m in f.messages()]
            uid = self.ok(f.append(BytesSource(b"Subject: app\n\nx\n"), {SEEN}, 1e9))
            self.ok(f.refresh())
            now = [m.uid for m in f.messages()]
            self.assertEqual(now[0], uids[0])
            if tail.endswith(b"\n"):  # the ext message did not change: no rescan
                self.assertEqual(now[:-1], uids)
            last = f.messages()[-1]
            self.assertEqual(
                (last.uid, last.flags, last.internal_date), (uid, frozenset({SEEN}), 1e9)
            )
            self.assertEqual(self.read(f, uid), b"Subject: app\r\n\r\nx\r\n")
            self.assertEqual(
                self.read(f, f.messages()[-2].uid),
                b"Subject: ext\r\n\r\n" + tail.rstrip(b"\n") + b"\r\n",
            )
            f.close()
            self.inbox.unlink()

    def test_many_folders_open_and_idle(self):
        first = self.open()
        self.deliver(b"Subject: a\n\nbody\n")
        self.ok(first.refresh())
        for i in range(40):
            self.ok(self.store.create_folder(USER, f"F{i}"))
            self.ok(self.store.folder_status(USER, f"F{i}"))
            self.ok(self.store.open_folder(USER, f"F{i}")).close()
        self.assertLessEqual(len(self.store.states.loaded), 20)
        self.ok(first.set_flags({1: {SEEN}}))
        self.assertEqual(self.open(self.new_store()).messages()[0].flags, frozenset({SEEN}))

    def test_file_removed_externally(self):
        self.deliver(b"Subject: a\n\nbody\n")
        f = self.open()
        self.inbox.unlink()
        changes = self.ok(f.refresh())
        self.assertEqual(changes.expunged, (1,))
        self.deliver(b"Subject: b\n\nbody\n")
        self.ok(f.refresh())
        self.assertEqual([m.uid for m in f.messages()], [2])

    def test_stale_read_after_external_change_raises_keyerror(self):
        self.deliver(b"Subject: a\n\nbody\n")
        f = self.open()
        self.inbox.write_bytes(b"From zz Mon Jan  1 00:00:00 2024\nSubject: other\n\nx\n\n")
        self.assertRaises(KeyError, f.open_message, 1)


class CrashTests(_Base):
    def test_partial_append_truncated_at_next_lock(self):
        self.deliver(b"Subject: a\n\nbody\n")
        before = self.inbox.read_bytes()
        ino = os.stat(self.inbox).st_ino
        journal = next((self.root / "index").rglob("INBOX.journal"), None)
        self.assertIsNone(journal)
        jpath = self.root / "index" / "example.test" / "alice" / "INBOX.journal"
        jpath.write_text(f"{ino} {len(before)} {len(before) + 500}\n")
        with open(self.inbox, "ab") as fh:
            fh.write(b"From half Mon Jan  1 00:00:00 2024\nSubject: half\n\nonly part")
        f = self.open(self.new_store())
        self.assertEqual(self.inbox.read_bytes(), before)
        self.assertEqual([m.uid for m in f.messages()], [1])
        self.assertFalse(jpath.exists())

    def test_complete_batch_kept(self):
        self.deliver(b"Subject: a\n\nbody\n")
        size = os.path.getsize(self.inbox)
        ino = os.stat(self.inbox).st_ino
        self.deliver(b"Subject: b\n\nbody\n")
        jpath = self.root / "index" / "example.test" / "alice" / "INBOX.journal"
        jpath.write_text(f"{ino} {size} {os.path.getsize(self.inbox)}\n")
        f = self.open(self.new_store())
        self.assertEqual(len(f.messages()), 2)

    def test_failing_source_leaves_file_alone(self):
        self.deliver(b"Subject: a\n\nbody\n")
        before = self.inbox.read_bytes()

        class Flaky:
            size = 2 * mboxfmt.SMALL_MESSAGE
            opened = 0

            def open(self):
                Flaky.opened += 1
                if Flaky.opened == 1:
                    return io.BytesIO(b"x\n" * (self.size // 2))
                return _Broken(b"x\n" * 1000)

        d = self.store.deliver(USER, Flaky(), "s@x")
        self.failureResultOf(d, OSError)
        self.assertEqual(self.inbox.read_bytes(), before)
        self.assertEqual([m.uid for m in self.open().messages()], [1])
        self.flushLoggedErrors()

    def test_unreadable_source_fails_alone(self):
        class Unreadable:
            size = 10

            def open(self):
                raise OSError(5, "I/O error")

        pool = _ManualPool()
        store = MboxMailStore(self.root / "m2", self.root / "i2", SyncReactor(), pool)
        ds = [
            store.deliver(USER, BytesSource(b"S: 1\n\nx\n"), ""),
            store.deliver(USER, BytesSource(b"S: 2\n\nx\n"), ""),
            store.deliver(USER, Unreadable(), ""),
            store.deliver(USER, BytesSource(b"S: 3\n\nx\n"), ""),
        ]
        pool.run()
        self.assertIsNone(self.ok(ds[0]))
        self.assertIsNone(self.ok(ds[1]))
        self.failureResultOf(ds[2], OSError)
        self.assertIsNone(self.ok(ds[3]))
        self.assertEqual(pool.batches, 2)
        d = store.open_folder(USER, "INBOX")
        pool.run()
        self.assertEqual(len(self.ok(d).messages()), 3)
        self.flushLoggedErrors()

    def test_expunge_disk_full_leaves_folder_alone(self):
        from mailsrv.store import rewrite

        for i in range(3):
            self.deliver(b"Subject: %d\n\nbody\n" % i)
        f = self.open()
        before = self.inbox.read_bytes()
        real = rewrite._write_all

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        self.patch(rewrite, "_write_all", full)  # the journal cannot be written
        self.failureResultOf(f.expunge([2]), OSError)
        self.assertEqual(self.inbox.read_bytes(), before)
        self.assertEqual([p.name for p in self.inbox.parent.iterdir()], ["INBOX"])
        self.assertEqual(list((self.root / "index").rglob("*.rewrite*")), [])
        self.assertEqual([m.uid for m in f.messages()], [1, 2, 3])
        self.assertEqual(self.read(f, 3), crlf(b"Subject: 2\n\nbody\n"))
        self.patch(rewrite, "_write_all", real)
        self.assertEqual(self.ok(f.expunge([2])), [2])
        self.assertEqual([m.uid for m in self.open(self.new_store()).messages()], [1, 3])

    def test_leftover_expunge_temp_ignored(self):
        self.deliver(b"Subject: a\n\nbody\n")
        tmp = self.inbox.with_name(".INBOX.expunge.99999")
        tmp.write_bytes(b"From half")
        self.assertEqual(self.ok(self.store.list_folders(USER)), [("INBOX", True)])
        f = self.open()
        self.ok(f.expunge([1]))
        self.assertFalse(tmp.exists())
        self.assertEqual(self.inbox.read_bytes(), b"")

    def test_folder_name_reserved(self):
        self.failureResultOf(self.store.create_folder(USER, "foo.lock"), FolderError)


class _ManualPool(SyncThreadPool):
    """Runs the queued work when told, so deliveries pile up into one batch."""

    def __init__(self):
        self.work = []
        self.batches = 0

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        self.work.append((on_result, func, args, kwargs))

    def run(self):
        while self.work:
            item = self.work.pop(0)
            if getattr(item[1], "__name__", "") == "deliver_batch":
                self.batches += 1
            super().callInThreadWithCallback(item[0], item[1], *item[2], **item[3])


class _Broken(io.BytesIO):
    def read(self, n=-1):
        if self.tell() > 0:
            raise OSError(28, "No space left on device")
        return super().read(n)
