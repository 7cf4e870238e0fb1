"""
Several IMAP sessions on one mailbox, over real loopback on the mbox store:
\\Recent (RFC 3501 2.3.2) given to the first session that sees a message,
STORE +FLAGS/-FLAGS changing the flags as they are now (not a session's stale
copy), EXISTS before the tagged OK of a COPY, MOVE or APPEND into the
selected mailbox, and keywords announced with FLAGS before a FETCH shows
them (RFC 3501 7.2.6). The expected answers are Dovecot's.
"""

from __future__ import annotations

import mailbox

from twisted.internet import defer

from mailsrv.spool import BytesSource
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER


def message(i: int) -> bytes:
    return b"From: ann@example.test\nSubject: m%d\nMessage-ID: <%d@sessions>\n\nbody %d\n" % (
        i,
        i,
        i,
    )


def untagged(lines: list[bytes]) -> list[bytes]:
    """The untagged lines of an answer, without their line ends, the tagged one last."""
    return [line.rstrip(b"\r\n") for line in lines]


class Sessions:
    """Logged-in raw clients, closed at the end of the test."""

    def __init__(self, case: LoopbackIMAPCase) -> None:
        self.case = case
        self.count = 0

    def open(self, select: bytes | None = None) -> RawClient:
        c = RawClient(self.case.port_number)
        self.case.addCleanup(c.close)
        c.login()
        if select is not None:
            out = c.cmd(b"S", select)
            assert out[-1].startswith(b"S OK"), out
        return c


class SessionCase(LoopbackIMAPCase):
    @defer.inlineCallbacks
    def deliver(self, *numbers: int):
        for i in numbers:
            yield self.store.deliver(USER, BytesSource(message(i)), "ann@example.test")

    def thread(self, f, *args):
        return self.in_thread(f, *args)

    @property
    def inbox_path(self):
        return self.config.mail_dir / "example.test" / "alice" / "INBOX"


class RecentTests(SessionCase):
    """RFC 3501 2.3.2: \\Recent belongs to the first session that sees a message."""

    @defer.inlineCallbacks
    def test_select_examine_status_and_new_mail(self):
        yield self.deliver(1, 2)
        s = Sessions(self)

        def client():
            d = s.open()
            out = {"status": untagged(d.cmd(b"D1", b"STATUS INBOX (MESSAGES RECENT UNSEEN)"))}
            a = s.open()
            ex = untagged(a.cmd(b"A1", b"EXAMINE INBOX"))
            out["examine"] = [x for x in ex if x.endswith(b"RECENT")]
            out["a_fetch"] = untagged(a.cmd(b"A2", b"FETCH 1:* FLAGS"))
            out["a_search"] = untagged(a.cmd(b"A3", b"SEARCH RECENT"))
            # EXAMINE takes \Recent away from no one
            out["status2"] = untagged(d.cmd(b"D2", b"STATUS INBOX (RECENT)"))
            b = s.open()
            sel = untagged(b.cmd(b"B1", b"SELECT INBOX"))
            out["select_b"] = [x for x in sel if x.endswith(b"RECENT")]
            out["b_fetch"] = untagged(b.cmd(b"B2", b"FETCH 1:* FLAGS"))
            out["b_new"] = untagged(b.cmd(b"B3", b"SEARCH NEW"))
            out["status3"] = untagged(d.cmd(b"D3", b"STATUS INBOX (RECENT)"))
            sel = untagged(d.cmd(b"D4", b"SELECT INBOX"))
            out["select_d"] = [x for x in sel if x.endswith(b"RECENT")]
            out["d_old"] = untagged(d.cmd(b"D5", b"SEARCH OLD"))
            return out

        out = yield self.thread(client)
        self.assertEqual(
            out["status"],
            [b"* STATUS INBOX (MESSAGES 2 RECENT 2 UNSEEN 2)", b"D1 OK STATUS completed"],
        )
        self.assertEqual(out["examine"], [b"* 2 RECENT"])
        self.assertEqual(
            out["a_fetch"],
            [
                b"* 1 FETCH (FLAGS (\\Recent))",
                b"* 2 FETCH (FLAGS (\\Recent))",
                b"A2 OK FETCH completed",
            ],
        )
        self.assertEqual(out["a_search"], [b"* SEARCH 1 2", b"A3 OK SEARCH completed"])
        self.assertEqual(out["status2"][0], b"* STATUS INBOX (RECENT 2)")
        self.assertEqual(out["select_b"], [b"* 2 RECENT"])
        self.assertEqual(out["b_fetch"][:2], out["a_fetch"][:2])
        self.assertEqual(out["b_new"][0], b"* SEARCH 1 2")
        self.assertEqual(out["status3"][0], b"* STATUS INBOX (RECENT 0)")
        self.assertEqual(out["select_d"], [b"* 0 RECENT"])
        self.assertEqual(out["d_old"][0], b"* SEARCH 1 2")

    @defer.inlineCallbacks
    def test_new_mail_is_recent_to_the_first_session_that_sees_it(self):
        yield self.deliver(1)
        s = Sessions(self)
        a, b, ro = yield self.thread(
            lambda: (
                s.open(b"SELECT INBOX"),
                s.open(b"SELECT INBOX"),
                s.open(b"EXAMINE INBOX"),
            )
        )
        yield self.deliver(2)
        out = {}

        def noops():
            # the read-only session sees it as recent but takes it from no one
            out["ro"] = untagged(ro.cmd(b"R1", b"NOOP"))
            out["b"] = untagged(b.cmd(b"B1", b"NOOP"))
            out["a"] = untagged(a.cmd(b"A1", b"NOOP"))
            out["b_fetch"] = untagged(b.cmd(b"B2", b"FETCH 2 FLAGS"))
            out["a_fetch"] = untagged(a.cmd(b"A2", b"FETCH 2 FLAGS"))
            out["ro_fetch"] = untagged(ro.cmd(b"R2", b"FETCH 2 FLAGS"))

        yield self.thread(noops)
        self.assertEqual(out["ro"], [b"* 2 EXISTS", b"* 1 RECENT", b"R1 OK NOOP completed"])
        self.assertEqual(out["b"], [b"* 2 EXISTS", b"* 1 RECENT", b"B1 OK NOOP completed"])
        self.assertEqual(out["a"], [b"* 2 EXISTS", b"A1 OK NOOP completed"])
        self.assertEqual(out["b_fetch"][0], b"* 2 FETCH (FLAGS (\\Recent))")
        self.assertEqual(out["a_fetch"][0], b"* 2 FETCH (FLAGS ())")
        self.assertEqual(out["ro_fetch"][0], b"* 2 FETCH (FLAGS (\\Recent))")

    @defer.inlineCallbacks
    def test_idle_announces_recent(self):
        s = Sessions(self)
        a = yield self.thread(s.open, b"SELECT INBOX")
        yield self.thread(a.send, b"I IDLE\r\n")
        cont = yield self.thread(a.file.readline)
        self.assertEqual(cont, b"+ idling\r\n")
        yield self.deliver(1)
        lines = yield self.thread(lambda: [a.file.readline(), a.file.readline()])
        self.assertEqual(lines, [b"* 1 EXISTS\r\n", b"* 1 RECENT\r\n"])
        yield self.thread(a.send, b"DONE\r\n")
        done = yield self.thread(a.read_until, b"I")
        self.assertEqual(done, [b"I OK IDLE terminated\r\n"])

    @defer.inlineCallbacks
    def test_mail_another_program_appends_is_recent(self):
        yield self.deliver(1, 2)
        s = Sessions(self)
        a = yield self.thread(s.open, b"SELECT INBOX")  # takes 1 and 2
        yield self.thread(a.cmd, b"L", b"LOGOUT")
        # Another program appends a message (as procmail or mutt would).
        box = mailbox.mbox(str(self.inbox_path), create=False)
        box.lock()
        try:
            box.add(mailbox.mboxMessage(message(3)))
            box.flush()
        finally:
            box.unlock()
            box.close()

        def after():
            d = s.open()
            st = untagged(d.cmd(b"D1", b"STATUS INBOX (MESSAGES RECENT)"))
            sel = untagged(d.cmd(b"D2", b"SELECT INBOX"))
            f = untagged(d.cmd(b"D3", b"FETCH 1:* FLAGS"))
            return st, [x for x in sel if x.endswith(b"RECENT")], f

        st, sel, fetched = yield self.thread(after)
        self.assertEqual(st[0], b"* STATUS INBOX (MESSAGES 3 RECENT 1)")
        self.assertEqual(sel, [b"* 1 RECENT"])
        self.assertEqual(
            fetched[:3],
            [
                b"* 1 FETCH (FLAGS ())",
                b"* 2 FETCH (FLAGS ())",
                b"* 3 FETCH (FLAGS (\\Recent))",
            ],
        )


class LostUpdateTests(SessionCase):
    """STORE +FLAGS/-FLAGS change the flags as they are now, whatever a session last saw."""

    @defer.inlineCallbacks
    def test_two_sessions_change_different_flags(self):
        yield self.deliver(1)
        s = Sessions(self)

        def client():
            a = s.open(b"SELECT INBOX")
            b = s.open(b"SELECT INBOX")
            out = {"a0": untagged(a.cmd(b"A0", b"STORE 1 FLAGS (\\Seen)"))}
            out["b0"] = untagged(b.cmd(b"B0", b"NOOP"))
            out["a1"] = untagged(a.cmd(b"A1", b"STORE 1 +FLAGS (\\Answered)"))
            out["b1"] = untagged(b.cmd(b"B1", b"STORE 1 -FLAGS (\\Seen)"))
            out["a2"] = untagged(a.cmd(b"A2", b"NOOP"))
            out["b2"] = untagged(b.cmd(b"B2", b"NOOP"))
            out["a3"] = untagged(a.cmd(b"A3", b"FETCH 1 FLAGS"))
            a.cmd(b"A4", b"LOGOUT")
            b.cmd(b"B4", b"LOGOUT")
            return out

        out = yield self.thread(client)
        self.assertEqual(
            out["a0"], [b"* 1 FETCH (FLAGS (\\Seen \\Recent))", b"A0 OK STORE completed"]
        )
        self.assertEqual(out["b0"], [b"* 1 FETCH (FLAGS (\\Seen))", b"B0 OK NOOP completed"])
        self.assertEqual(
            out["a1"],
            [b"* 1 FETCH (FLAGS (\\Answered \\Seen \\Recent))", b"A1 OK STORE completed"],
        )
        self.assertEqual(out["b1"], [b"* 1 FETCH (FLAGS (\\Answered))", b"B1 OK STORE completed"])
        self.assertEqual(
            out["a2"], [b"* 1 FETCH (FLAGS (\\Answered \\Recent))", b"A2 OK NOOP completed"]
        )
        self.assertEqual(out["b2"], [b"B2 OK NOOP completed"])
        self.assertEqual(out["a3"][0], b"* 1 FETCH (FLAGS (\\Answered \\Recent))")
        yield self.settle()
        # On disk: the index has both changes, and so has the file once the
        # last session left (Status:/X-Status:, as mutt reads them).
        f = yield self.store.open_folder(USER, "INBOX")
        self.assertEqual([i.flags for i in f.messages()], [frozenset({"\\Answered"})])
        f.close()
        yield self.store.write_back(5)
        box = mailbox.mbox(str(self.inbox_path), create=False)
        self.assertEqual([m.get_flags() for m in box], ["OA"])

    @defer.inlineCallbacks
    def test_fetch_marking_seen_keeps_another_sessions_flag(self):
        yield self.deliver(1)
        s = Sessions(self)

        def client():
            a = s.open(b"SELECT INBOX")
            b = s.open(b"SELECT INBOX")
            b.cmd(b"B0", b"STORE 1 +FLAGS.SILENT (\\Flagged)")
            return b"".join(a.cmd(b"A0", b"FETCH 1 (BODY[TEXT])"))

        out = yield self.thread(client)
        self.assertIn(b" FLAGS (\\Flagged \\Seen \\Recent))\r\nA0 OK", out)
        f = yield self.store.open_folder(USER, "INBOX")
        self.assertEqual([i.flags for i in f.messages()], [frozenset({"\\Flagged", "\\Seen"})])
        f.close()


class ExistsBeforeOkTests(SessionCase):
    """RFC 3501 6.3.11, 6.4.7; RFC 6851 4.3: the new messages are announced before the OK."""

    @defer.inlineCallbacks
    def test_copy_move_append_into_the_selected_mailbox(self):
        yield self.deliver(1, 2)
        s = Sessions(self)

        def client():
            a = s.open(b"SELECT INBOX")
            out = {"copy": untagged(a.cmd(b"A1", b"COPY 1 INBOX"))}
            out["move"] = untagged(a.cmd(b"A2", b"MOVE 2 INBOX"))
            msg = b"Subject: appended\r\n\r\nhi\r\n"
            out["append"] = untagged(
                a.cmd(b"A3", b"APPEND INBOX (\\Seen) {%d+}\r\n%s" % (len(msg), msg))
            )
            out["uid_copy"] = untagged(a.cmd(b"A4", b"UID COPY 1 inbox"))
            out["fetch"] = untagged(a.cmd(b"A5", b"FETCH 1:* (UID FLAGS)"))
            return out

        out = yield self.thread(client)
        validity = (yield self.store.folder_status(USER, "INBOX"))["uid_validity"]
        self.assertEqual(
            out["copy"],
            [
                b"* 3 EXISTS",
                b"* 3 RECENT",
                b"A1 OK [COPYUID %d 1 3] COPY completed" % validity,
            ],
        )
        self.assertEqual(
            out["move"],
            [
                b"* OK [COPYUID %d 2 4] Moved" % validity,
                b"* 2 EXPUNGE",
                b"* 3 EXISTS",
                b"* 3 RECENT",
                b"A2 OK MOVE completed",
            ],
        )
        self.assertEqual(
            out["append"],
            [b"* 4 EXISTS", b"* 4 RECENT", b"A3 OK [APPENDUID %d 5] APPEND completed" % validity],
        )
        self.assertEqual(
            out["uid_copy"],
            [b"* 5 EXISTS", b"* 5 RECENT", b"A4 OK [COPYUID %d 1 6] COPY completed" % validity],
        )
        self.assertEqual(
            out["fetch"][:5],
            [
                b"* 1 FETCH (UID 1 FLAGS (\\Recent))",
                b"* 2 FETCH (UID 3 FLAGS (\\Recent))",
                b"* 3 FETCH (UID 4 FLAGS (\\Recent))",
                b"* 4 FETCH (UID 5 FLAGS (\\Seen \\Recent))",
                b"* 5 FETCH (UID 6 FLAGS (\\Recent))",
            ],
        )


class KeywordAnnouncementTests(SessionCase):
    """RFC 3501 7.2.6: a keyword new to a session is in a FLAGS response before a FETCH shows it."""

    SYSTEM = b"\\Answered \\Deleted \\Draft \\Flagged \\Seen"

    def flags_lines(self, keywords: bytes, writeable: bool = True) -> list[bytes]:
        listed = self.SYSTEM + (b" " + keywords if keywords else b"")
        permanent = listed + b" \\*" if writeable else b""
        return [
            b"* FLAGS (%s)" % listed,
            b"* OK [PERMANENTFLAGS (%s)] Flags permitted" % permanent,
        ]

    @defer.inlineCallbacks
    def test_keywords_set_by_this_session_another_and_delivery(self):
        yield self.deliver(1, 2)
        s = Sessions(self)

        def client():
            a = s.open(b"SELECT INBOX")
            b = s.open(b"SELECT INBOX")
            ro = s.open(b"EXAMINE INBOX")
            out = {"a1": untagged(a.cmd(b"A1", b"STORE 1 +FLAGS ($Foo)"))}
            out["b1"] = untagged(b.cmd(b"B1", b"NOOP"))
            out["ro1"] = untagged(ro.cmd(b"R1", b"NOOP"))
            # known already: no new FLAGS
            out["b2"] = untagged(b.cmd(b"B2", b"STORE 2 +FLAGS ($Foo)"))
            out["a2"] = untagged(a.cmd(b"A2", b"STORE 2 +FLAGS.SILENT ($Bar)"))
            # a keyword another session set, shown by this session's own STORE
            out["b3"] = untagged(b.cmd(b"B3", b"STORE 2 +FLAGS (\\Seen)"))
            msg = b"Subject: kw\r\n\r\nhi\r\n"
            out["a3"] = untagged(
                a.cmd(b"A3", b"APPEND INBOX ($Appended) {%d+}\r\n%s" % (len(msg), msg))
            )
            out["b4"] = untagged(b.cmd(b"B4", b"NOOP"))
            return out

        out = yield self.thread(client)
        self.assertEqual(
            out["a1"],
            [
                *self.flags_lines(b"$Foo"),
                b"* 1 FETCH (FLAGS ($Foo \\Recent))",
                b"A1 OK STORE completed",
            ],
        )
        self.assertEqual(
            out["b1"],
            [*self.flags_lines(b"$Foo"), b"* 1 FETCH (FLAGS ($Foo))", b"B1 OK NOOP completed"],
        )
        self.assertEqual(
            out["ro1"],
            [
                *self.flags_lines(b"$Foo", writeable=False),
                b"* 1 FETCH (FLAGS ($Foo))",
                b"R1 OK NOOP completed",
            ],
        )
        self.assertEqual(out["b2"], [b"* 2 FETCH (FLAGS ($Foo))", b"B2 OK STORE completed"])
        self.assertEqual(out["a2"], [*self.flags_lines(b"$Bar $Foo"), b"A2 OK STORE completed"])
        self.assertEqual(
            out["b3"],
            [
                *self.flags_lines(b"$Bar $Foo"),
                b"* 2 FETCH (FLAGS ($Bar $Foo \\Seen))",
                b"B3 OK STORE completed",
            ],
        )
        self.assertEqual(
            out["a3"][:5],
            [
                *self.flags_lines(b"$Appended $Bar $Foo"),
                b"* 2 FETCH (FLAGS ($Bar $Foo \\Seen \\Recent))",
                b"* 3 EXISTS",
                b"* 3 RECENT",
            ],
        )
        self.assertEqual(
            out["b4"],
            [*self.flags_lines(b"$Appended $Bar $Foo"), b"* 3 EXISTS", b"B4 OK NOOP completed"],
        )

    @defer.inlineCallbacks
    def test_idle_hears_of_a_new_keyword_before_its_fetch(self):
        yield self.deliver(1)
        s = Sessions(self)
        a, b = yield self.thread(lambda: (s.open(b"SELECT INBOX"), s.open(b"SELECT INBOX")))
        yield self.thread(a.send, b"I IDLE\r\n")
        self.assertEqual((yield self.thread(a.file.readline)), b"+ idling\r\n")
        yield self.thread(b.cmd, b"B1", b"STORE 1 +FLAGS.SILENT ($Idle)")
        lines = yield self.thread(lambda: [a.file.readline() for _ in range(3)])
        self.assertEqual(
            untagged(lines),
            [*self.flags_lines(b"$Idle"), b"* 1 FETCH (FLAGS ($Idle \\Recent))"],
        )
        yield self.thread(a.send, b"DONE\r\n")
        self.assertEqual((yield self.thread(a.read_until, b"I")), [b"I OK IDLE terminated\r\n"])
