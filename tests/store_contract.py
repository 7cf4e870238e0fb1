"""
The store contract: one suite of tests run against every L{IMailStore}
(the in-memory twin and the mbox store), so the two cannot drift apart.

Disk work runs synchronously here (L{SyncReactor}, L{SyncThreadPool}), so the
Deferreds have fired by the time a call returns.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailsrv.interfaces import (
    ANSWERED,
    DELETED,
    FLAGGED,
    SEEN,
    FolderError,
    IFolder,
    IMailStore,
    NotSelectable,
)
from mailsrv.spool import BytesSource

USER = "alice@example.test"
NOW = 1_700_000_000.0

MSG1 = b"From: bob@example.test\nSubject: one\nMessage-ID: <1@x>\n\nHello\nFrom the start\n>From quoted\n"
MSG2 = b"From: carol@example.test\nSubject: two\n\nSecond body\n"
MSG3 = b"Subject: three\n\n\xe9t\xe9 8-bit\n\n"


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class SyncThreadPool:
    """Runs 'threaded' work at once, in the calling thread."""

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        try:
            result = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class SyncReactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class StoreContract:
    """Mixin for a SynchronousTestCase; subclasses define make_store()."""

    def make_store(self):
        raise NotImplementedError

    def setUp(self):
        self.store = self.make_store()

    # helpers
    def ok(self, d):
        return self.successResultOf(d)

    def deliver(self, data, user=USER, folder="INBOX", sender="bob@example.test"):
        return self.ok(self.store.deliver(user, BytesSource(data), sender, folder))

    def open(self, name="INBOX", user=USER, read_only=False):
        f = self.ok(self.store.open_folder(user, name, read_only))
        self.addCleanup(f.close)
        return f

    def fails(self, d, exc=FolderError):
        return self.failureResultOf(d, exc)

    # tests
    def test_interfaces(self):
        verifyObject(IMailStore, self.store)
        verifyObject(IFolder, self.open())

    def test_empty_inbox(self):
        f = self.open()
        self.assertEqual(f.messages(), [])
        self.assertEqual(f.uid_next, 1)
        self.assertEqual(f.name, "INBOX")
        self.assertEqual(f.user, USER)
        self.assertIsInstance(f.uid_validity, int)
        self.assertGreater(f.uid_validity, 0)

    def test_deliver_and_read(self):
        for m in (MSG1, MSG2, MSG3):
            self.assertIsNone(self.deliver(m))
        f = self.open("inbox")
        msgs = f.messages()
        self.assertEqual([m.uid for m in msgs], [1, 2, 3])
        self.assertEqual(f.uid_next, 4)
        for info, data in zip(msgs, (MSG1, MSG2, MSG3), strict=True):
            self.assertEqual(info.size, len(crlf(data)))
            self.assertEqual(info.flags, frozenset())
            self.assertAlmostEqual(info.internal_date, NOW, delta=1)
            with f.open_message(info.uid) as fh:
                self.assertEqual(fh.read(), crlf(data))
        self.assertEqual(
            f.read_headers(1),
            b"From: bob@example.test\r\nSubject: one\r\nMessage-ID: <1@x>\r\n\r\n",
        )
        self.assertEqual(f.read_headers(3), b"Subject: three\r\n\r\n")
        self.assertRaises(KeyError, f.open_message, 99)

    def test_crlf_source(self):
        self.deliver(b"Subject: crlf\r\n\r\nline\r\n")
        f = self.open()
        with f.open_message(1) as fh:
            self.assertEqual(fh.read(), b"Subject: crlf\r\n\r\nline\r\n")
        self.assertEqual(f.messages()[0].size, len(b"Subject: crlf\r\n\r\nline\r\n"))

    def test_view_changes_only_on_refresh(self):
        f = self.open()
        self.deliver(MSG1)
        self.assertEqual(f.messages(), [])
        changes = self.ok(f.refresh())
        self.assertEqual([i.uid for i in changes.added], [1])
        self.assertEqual(changes.expunged, ())
        self.assertEqual([m.uid for m in f.messages()], [1])
        self.assertFalse(self.ok(f.refresh()))

    def test_flags(self):
        self.deliver(MSG1)
        self.deliver(MSG2)
        a = self.open()
        b = self.open()
        self.assertIsNone(self.ok(a.set_flags({1: {SEEN, "$Label1"}})))
        self.assertEqual(a.messages()[0].flags, frozenset({SEEN, "$Label1"}))
        self.assertEqual(b.messages()[0].flags, frozenset())
        self.assertFalse(self.ok(a.refresh()))
        changes = self.ok(b.refresh())
        self.assertEqual(
            [(i.uid, i.flags) for i in changes.flags], [(1, frozenset({SEEN, "$Label1"}))]
        )
        self.assertEqual(b.messages()[0].flags, frozenset({SEEN, "$Label1"}))
        self.ok(a.set_flags({1: set(), 2: {DELETED}}))
        c = self.open()
        self.assertEqual([m.flags for m in c.messages()], [frozenset(), frozenset({DELETED})])
        status = self.ok(self.store.folder_status(USER, "INBOX"))
        self.assertEqual(status["unseen"], 2)

    def test_change_flags_on_the_flags_as_they_are_now(self):
        self.deliver(MSG1)
        self.deliver(MSG2)
        a = self.open()
        b = self.open()
        self.ok(a.set_flags({1: {SEEN}}))
        # b has not caught up: its view still says 1 has no flags; no change is lost
        now = self.ok(b.change_flags([1, 2, 99], add={ANSWERED}))
        self.assertEqual(now, {1: frozenset({SEEN, ANSWERED}), 2: frozenset({ANSWERED})})
        self.assertEqual(
            [m.flags for m in b.messages()],
            [frozenset({SEEN, ANSWERED}), frozenset({ANSWERED})],
        )
        self.assertEqual(self.ok(a.change_flags([1], remove={SEEN})), {1: frozenset({ANSWERED})})
        changes = self.ok(b.refresh())
        self.assertEqual([(i.uid, i.flags) for i in changes.flags], [(1, frozenset({ANSWERED}))])
        self.assertEqual(
            [m.flags for m in self.open().messages()],
            [frozenset({ANSWERED}), frozenset({ANSWERED})],
        )
        # Nothing changes: no one is told.
        calls = []
        cb = lambda: calls.append(1)  # noqa: E731
        b.add_listener(cb)
        self.assertEqual(
            self.ok(a.change_flags([2], add={ANSWERED}, remove={SEEN})),
            {2: frozenset({ANSWERED})},
        )
        self.assertEqual(calls, [])
        b.remove_listener(cb)
        self.fails(self.open(read_only=True).change_flags([1], add={SEEN}))

    def claimed(self, folder):
        """The UIDs of C{folder}'s view that L{IFolder.claim_recent} gives it."""
        first, upto = self.ok(folder.claim_recent())
        return [m.uid for m in folder.messages() if first <= m.uid < upto]

    def recent(self, name="INBOX"):
        return self.ok(self.store.folder_status(USER, name))["recent"]

    def test_recent_goes_to_the_first_session(self):
        self.deliver(MSG1)
        self.deliver(MSG2)
        self.assertEqual(self.recent(), 2)
        ro = self.open(read_only=True)
        self.assertEqual(self.claimed(ro), [1, 2])
        self.assertEqual(self.recent(), 2)  # RFC 3501 6.3.2: EXAMINE takes nothing
        a = self.open()
        b = self.open()
        self.assertEqual(self.claimed(a), [1, 2])
        self.assertEqual(self.claimed(b), [])
        self.assertEqual(self.claimed(a), [])
        self.assertEqual(self.recent(), 0)
        self.deliver(MSG3)
        self.assertEqual(self.recent(), 1)
        # A session is given only what its view shows.
        self.assertEqual(self.claimed(a), [])
        self.ok(ro.refresh())
        self.assertEqual(self.claimed(ro), [3])
        self.ok(b.refresh())
        self.assertEqual(self.claimed(b), [3])
        self.ok(a.refresh())
        self.assertEqual(self.claimed(a), [])
        self.assertEqual(self.claimed(ro), [])
        self.assertEqual(self.recent(), 0)
        # An expunge gives nothing back; an append is recent.
        self.ok(a.expunge([3]))
        self.ok(a.append(BytesSource(MSG1)))
        self.assertEqual(self.recent(), 1)
        self.ok(a.refresh())
        self.assertEqual(self.claimed(a), [4])
        self.ok(self.store.create_folder(USER, "Empty"))
        self.assertEqual(self.claimed(self.open("Empty")), [])
        self.assertEqual(self.recent("Empty"), 0)

    def test_expunge(self):
        for m in (MSG1, MSG2, MSG3):
            self.deliver(m)
        a = self.open()
        b = self.open()
        removed = self.ok(a.expunge([3, 1, 42]))
        self.assertEqual(removed, [1, 3])
        self.assertEqual([m.uid for m in a.messages()], [2])
        self.assertEqual([m.uid for m in b.messages()], [1, 2, 3])
        changes = self.ok(b.refresh())
        self.assertEqual(changes.expunged, (1, 3))
        self.assertRaises(KeyError, b.open_message, 1)
        with b.open_message(2) as fh:
            self.assertEqual(fh.read(), crlf(MSG2))
        self.assertEqual(self.ok(a.expunge([])), [])
        # A UID is never reused.
        self.ok(a.expunge([2]))
        self.deliver(MSG1)
        self.ok(a.refresh())
        self.assertEqual([m.uid for m in a.messages()], [4])
        self.assertEqual(a.uid_next, 5)

    def test_expunge_keeps_flags(self):
        for m in (MSG1, MSG2, MSG3):
            self.deliver(m)
        f = self.open()
        self.ok(f.set_flags({2: {SEEN}, 3: {"$Junk"}}))
        self.ok(f.expunge([1]))
        g = self.open()
        self.assertEqual(
            [(m.uid, m.flags) for m in g.messages()],
            [(2, frozenset({SEEN})), (3, frozenset({"$Junk"}))],
        )
        with g.open_message(3) as fh:
            self.assertEqual(fh.read(), crlf(MSG3))

    def test_append(self):
        self.ok(self.store.create_folder(USER, "Sent"))
        f = self.open("Sent")
        uid = self.ok(f.append(BytesSource(MSG2), {SEEN, "$Sent"}, 1_600_000_000.0))
        self.assertEqual(uid, 1)
        uid2 = self.ok(f.append(BytesSource(MSG1)))
        self.assertEqual(uid2, 2)
        changes = self.ok(f.refresh())
        self.assertEqual([i.uid for i in changes.added], [1, 2])
        info = f.messages()[0]
        self.assertEqual(info.flags, frozenset({SEEN, "$Sent"}))
        self.assertAlmostEqual(info.internal_date, 1_600_000_000.0, delta=1)
        self.assertEqual(info.size, len(crlf(MSG2)))
        with f.open_message(2) as fh:
            self.assertEqual(fh.read(), crlf(MSG1))

    def test_append_after_a_delivery_the_view_has_not_seen(self):
        # The first scan of a folder, then a delivery the session has not
        # refreshed for: the appended message keeps its flags.
        f = self.open()
        self.deliver(MSG1)
        self.assertEqual(self.ok(f.append(BytesSource(MSG2), {SEEN})), 2)
        self.assertEqual(
            [(i.uid, i.flags) for i in self.open().messages()],
            [(1, frozenset()), (2, frozenset({SEEN}))],
        )

    def test_append_many(self):
        f = self.open()
        self.deliver(MSG1)
        uids = self.ok(
            f.append_many(
                [
                    (BytesSource(MSG2), {SEEN}, 1_600_000_000.0),
                    (BytesSource(MSG3), frozenset(), None),
                    (BytesSource(MSG1), {"$Label"}, None),
                ]
            )
        )
        self.assertEqual(uids, [2, 3, 4])
        self.ok(f.refresh())
        self.assertEqual(
            [(i.uid, i.flags) for i in f.messages()],
            [(1, frozenset()), (2, frozenset({SEEN})), (3, frozenset()), (4, {"$Label"})],
        )
        self.assertAlmostEqual(f.messages()[1].internal_date, 1_600_000_000.0, delta=1)
        for uid, msg in ((2, MSG2), (3, MSG3), (4, MSG1)):
            with f.open_message(uid) as fh:
                self.assertEqual(fh.read(), crlf(msg))

    def test_read_only(self):
        self.deliver(MSG1)
        f = self.open(read_only=True)
        self.assertTrue(f.read_only)
        self.fails(f.set_flags({1: {SEEN}}))
        self.fails(f.expunge([1]))

    def test_listeners(self):
        f = self.open()
        calls = []
        cb = lambda: calls.append(1)  # noqa: E731
        f.add_listener(cb)
        self.deliver(MSG1)
        self.assertEqual(len(calls), 1)
        self.ok(f.refresh())
        self.ok(f.set_flags({1: {SEEN}}))
        self.assertEqual(len(calls), 2)
        self.ok(f.expunge([1]))
        self.assertEqual(len(calls), 3)
        f.remove_listener(cb)
        self.deliver(MSG1)
        self.assertEqual(len(calls), 3)

    def test_folders(self):
        self.assertEqual(self.ok(self.store.list_folders(USER)), [("INBOX", True)])
        self.ok(self.store.create_folder(USER, "Archive/2024"))
        self.ok(self.store.create_folder(USER, "Sent"))
        self.assertEqual(
            self.ok(self.store.list_folders(USER)),
            [("Archive", False), ("Archive/2024", True), ("INBOX", True), ("Sent", True)],
        )
        self.fails(self.store.create_folder(USER, "Sent"))
        self.fails(self.store.create_folder(USER, "inbox"))
        self.fails(self.store.create_folder(USER, "INBOX/sub"))
        for bad in ("../x", "/abs", "a//b", ".hidden", "a\x00b", ""):
            self.fails(self.store.create_folder(USER, bad))
        self.fails(self.store.open_folder(USER, "Nope"))
        self.fails(self.store.folder_status(USER, "Nope"))
        self.failureResultOf(self.store.deliver(USER, BytesSource(MSG1), "", "Nope"))
        self.deliver(MSG1, folder="Sent")
        self.assertEqual(self.ok(self.store.folder_status(USER, "Sent"))["messages"], 1)
        self.ok(self.store.delete_folder(USER, "Sent"))
        self.fails(self.store.delete_folder(USER, "Sent"))
        self.fails(self.store.delete_folder(USER, "INBOX"))
        self.fails(self.store.open_folder(USER, "Sent"))
        self.ok(self.store.delete_folder(USER, "Archive/2024"))
        # RFC 3501 6.3.4: the name above stays, holding no folder, until deleted.
        self.assertEqual(
            self.ok(self.store.list_folders(USER)), [("Archive", False), ("INBOX", True)]
        )
        self.ok(self.store.delete_folder(USER, "Archive"))
        self.assertEqual(self.ok(self.store.list_folders(USER)), [("INBOX", True)])
        # A re-created folder gets a new UIDVALIDITY.
        self.ok(self.store.create_folder(USER, "Sent"))
        self.assertEqual(self.ok(self.store.folder_status(USER, "Sent"))["messages"], 0)

    def test_folders_that_hold_folders(self):
        """RFC 3501 6.3.3: a name created with a trailing delimiter holds names, not mail."""
        self.assertIsInstance(self.store.mail_folders_hold_folders, bool)
        self.ok(self.store.create_folder(USER, "Box/"))
        self.assertEqual(self.ok(self.store.list_folders(USER)), [("Box", False), ("INBOX", True)])
        self.fails(self.store.open_folder(USER, "Box"), NotSelectable)
        self.fails(self.store.folder_status(USER, "Box"), NotSelectable)
        for again in ("Box", "Box/", "INBOX/", "a//", "/"):
            self.fails(self.store.create_folder(USER, again))
        self.ok(self.store.create_folder(USER, "Box/In"))
        self.deliver(MSG1, folder="Box/In")
        self.ok(self.store.create_folder(USER, "P/Q/"))
        self.assertEqual(
            self.ok(self.store.list_folders(USER)),
            [("Box", False), ("Box/In", True), ("INBOX", True), ("P", False), ("P/Q", False)],
        )
        # RFC 3501 6.3.4: a name with inferiors that holds no mail is not deleted.
        self.fails(self.store.delete_folder(USER, "Box"))
        self.fails(self.store.delete_folder(USER, "P"))
        self.ok(self.store.rename_folder(USER, "Box", "Crate"))
        self.ok(self.store.rename_folder(USER, "P/Q", "R"))
        self.assertEqual(
            self.ok(self.store.list_folders(USER)),
            [("Crate", False), ("Crate/In", True), ("INBOX", True), ("P", False), ("R", False)],
        )
        self.assertEqual(self.ok(self.store.folder_status(USER, "Crate/In"))["messages"], 1)
        self.ok(self.store.delete_folder(USER, "Crate/In"))
        for name in ("Crate", "P", "R"):
            self.ok(self.store.delete_folder(USER, name))
        self.assertEqual(self.ok(self.store.list_folders(USER)), [("INBOX", True)])

    def test_recreated_folder_new_validity(self):
        self.ok(self.store.create_folder(USER, "X"))
        v1 = self.ok(self.store.folder_status(USER, "X"))["uid_validity"]
        self.ok(self.store.delete_folder(USER, "X"))
        self.ok(self.store.create_folder(USER, "X"))
        v2 = self.ok(self.store.folder_status(USER, "X"))["uid_validity"]
        self.assertNotEqual(v1, v2)

    def test_rename(self):
        self.ok(self.store.create_folder(USER, "A/B"))
        self.deliver(MSG1, folder="A/B")
        st = self.ok(self.store.folder_status(USER, "A/B"))
        self.ok(self.store.rename_folder(USER, "A", "C"))
        self.assertEqual(
            self.ok(self.store.list_folders(USER)), [("C", False), ("C/B", True), ("INBOX", True)]
        )
        st2 = self.ok(self.store.folder_status(USER, "C/B"))
        self.assertEqual(st2, st)
        f = self.open("C/B")
        with f.open_message(1) as fh:
            self.assertEqual(fh.read(), crlf(MSG1))
        self.fails(self.store.rename_folder(USER, "Nope", "Z"))
        self.ok(self.store.create_folder(USER, "D"))
        self.fails(self.store.rename_folder(USER, "D", "C/B"))
        # A failed rename leaves open sessions working.
        self.ok(f.set_flags({1: {SEEN}}))
        self.fails(self.store.rename_folder(USER, "C/B", "D"))
        self.ok(f.set_flags({1: {DELETED}}))
        self.assertEqual(self.open("C/B").messages()[0].flags, frozenset({DELETED}))

    def test_rename_inbox(self):
        self.deliver(MSG1)
        self.deliver(MSG2)
        f = self.open()
        self.ok(f.set_flags({2: {SEEN}}))
        self.ok(self.store.rename_folder(USER, "INBOX", "Old"))
        g = self.open("Old")
        self.assertEqual(
            [(m.size, m.flags) for m in g.messages()],
            [(len(crlf(MSG1)), frozenset()), (len(crlf(MSG2)), frozenset({SEEN}))],
        )
        with g.open_message(g.messages()[1].uid) as fh:
            self.assertEqual(fh.read(), crlf(MSG2))
        changes = self.ok(f.refresh())
        self.assertEqual(changes.expunged, (1, 2))
        self.assertEqual(self.ok(self.store.folder_status(USER, "INBOX"))["messages"], 0)
        self.deliver(MSG3)
        self.ok(f.refresh())
        self.assertEqual([m.uid for m in f.messages()], [3])

    def test_status(self):
        self.deliver(MSG1)
        self.deliver(MSG2)
        f = self.open()
        self.ok(f.set_flags({1: {SEEN}}))
        status = self.ok(self.store.folder_status(USER, "INBOX"))
        self.assertEqual(
            status,
            {
                "messages": 2,
                "uid_next": 3,
                "uid_validity": f.uid_validity,
                "unseen": 1,
                "recent": 2,
                "highest_modseq": f.highest_modseq,
                "deleted": 0,
                "size": sum(m.size for m in f.messages()),
            },
        )

    def test_users_apart(self):
        self.deliver(MSG1, user="bob@Example.TEST")
        self.assertEqual(len(self.open(user="bob@example.test").messages()), 1)
        self.assertEqual(self.open().messages(), [])
        self.fails(self.store.open_folder("not-an-address", "INBOX"), Exception)

    # RFC 7162 mod-sequences (CONDSTORE/QRESYNC)

    def modseqs(self, folder):
        return {m.uid: m.modseq for m in folder.messages()}

    def test_modseq_grows_with_every_change(self):
        f = self.open()
        start = f.highest_modseq
        self.assertGreaterEqual(start, 1)
        self.deliver(MSG1)
        self.deliver(MSG2)
        self.ok(f.refresh())
        ms = self.modseqs(f)
        self.assertTrue(start < ms[1] < ms[2] == f.highest_modseq)
        # RFC 7162 3.1: a flag change takes a new modseq, one for all messages it changes
        res = self.ok(f.change_flags([1, 2, 99], add={SEEN}))
        self.assertEqual(res, {1: frozenset({SEEN}), 2: frozenset({SEEN})})
        self.assertEqual(res.changed, {1, 2})
        self.assertEqual(res.failed, frozenset())
        top = f.highest_modseq
        self.assertGreater(top, ms[2])
        self.assertEqual(res.modseqs, {1: top, 2: top})
        self.assertEqual(self.modseqs(f), {1: top, 2: top})
        # no change, no new modseq
        res = self.ok(f.change_flags([1], add={SEEN}))
        self.assertEqual((res.changed, res.modseqs, f.highest_modseq), (frozenset(), {1: top}, top))
        # another session sees the modseqs at refresh, and in a new view
        g = self.open()
        self.assertEqual((self.modseqs(g), g.highest_modseq), ({1: top, 2: top}, top))
        self.ok(g.set_flags({2: {SEEN, "$Junk"}}))
        changes = self.ok(f.refresh())
        self.assertEqual([(i.uid, i.modseq) for i in changes.flags], [(2, top + 1)])
        self.assertEqual(f.highest_modseq, top + 1)
        # an expunge takes one too; a new message another
        self.ok(f.expunge([1]))
        self.assertEqual(f.highest_modseq, top + 2)
        self.ok(f.append(BytesSource(MSG3)))
        self.ok(f.refresh())
        self.assertEqual(self.modseqs(f), {2: top + 1, 3: top + 3})
        self.assertEqual(f.highest_modseq, top + 3)

    def test_changed_since(self):
        for m in (MSG1, MSG2, MSG3):
            self.deliver(m)
        f = self.open()
        mark = f.highest_modseq
        self.assertEqual(self.ok(f.changed_since(mark)), [])
        self.ok(f.change_flags([3, 2], add={"$A"}))
        self.ok(f.change_flags([2], add={SEEN}))
        self.deliver(MSG1)  # not in f's view yet: listed all the same
        got = self.ok(f.changed_since(mark))
        self.assertEqual(
            got,
            [
                (2, mark + 2, frozenset({"$A", SEEN})),
                (3, mark + 1, frozenset({"$A"})),
                (4, mark + 3, frozenset()),
            ],
        )
        self.assertEqual(self.ok(f.changed_since(mark + 2)), [got[2]])
        self.assertEqual([u for u, _, _ in self.ok(f.changed_since(0))], [1, 2, 3, 4])

    def test_unchanged_since(self):
        for m in (MSG1, MSG2, MSG3):
            self.deliver(m)
        a = self.open()
        b = self.open()
        seen = b.highest_modseq  # what a CONDSTORE client of b knows
        self.ok(a.change_flags([1], add={FLAGGED}))
        # RFC 7162 3.2: 1 changed after `seen`: left alone; 2 and 3 change
        res = self.ok(b.change_flags([1, 2, 3, 9], add={DELETED}, unchanged_since=seen))
        self.assertEqual(res.failed, {1})
        self.assertEqual(res.changed, {2, 3})
        self.assertEqual(
            res,
            {1: frozenset({FLAGGED}), 2: frozenset({DELETED}), 3: frozenset({DELETED})},
        )
        top = b.highest_modseq
        self.assertEqual(res.modseqs, {1: seen + 1, 2: top, 3: top})
        self.assertEqual(
            [(m.uid, m.flags) for m in self.open().messages()],
            [(1, frozenset({FLAGGED})), (2, frozenset({DELETED})), (3, frozenset({DELETED}))],
        )
        # UNCHANGEDSINCE 0 fails for every message (modseqs are at least 1)
        res = self.ok(b.change_flags([2, 3], remove={DELETED}, unchanged_since=0))
        self.assertEqual((res.failed, res.changed, b.highest_modseq), ({2, 3}, frozenset(), top))
        # a passing test that changes nothing changes no modseq
        res = self.ok(b.change_flags([2], add={DELETED}, unchanged_since=top))
        self.assertEqual(
            (res.failed, res.changed, res.modseqs), (frozenset(), frozenset(), {2: top})
        )
        self.fails(self.open(read_only=True).change_flags([1], add={SEEN}, unchanged_since=top))

    def test_replace_under_unchanged_since(self):
        for m in (MSG1, MSG2):
            self.deliver(m)
        a = self.open()
        b = self.open()
        self.ok(a.change_flags([1, 2], add={FLAGGED, "$Work"}))
        # b has not seen a's change: the replacement is of the flags as they are now
        res = self.ok(b.change_flags([1, 2], add={SEEN}, unchanged_since=1 << 62, replace=True))
        self.assertEqual(res, {1: frozenset({SEEN}), 2: frozenset({SEEN})})
        self.assertEqual([m.flags for m in self.open().messages()], [frozenset({SEEN})] * 2)

    def test_vanished_since(self):
        for m in (MSG1, MSG2, MSG3, MSG1):
            self.deliver(m)
        f = self.open()
        mark = f.highest_modseq
        self.assertEqual(self.ok(f.vanished_since(mark)), [])
        self.ok(f.expunge([3, 1]))
        middle = f.highest_modseq
        self.ok(f.change_flags([2], add={SEEN}))
        self.ok(f.expunge([4]))
        self.assertEqual(self.ok(f.vanished_since(mark)), [1, 3, 4])
        self.assertEqual(self.ok(f.vanished_since(middle)), [4])
        self.assertEqual(self.ok(f.vanished_since(f.highest_modseq)), [])
        self.assertEqual(self.ok(f.changed_since(mark)), [(2, middle + 1, frozenset({SEEN}))])
