"""
NOTIFY (RFC 5465) over real loopback: one client asks for notifications,
another client (or an SMTP delivery through the store) makes the changes,
and the first reads the unsolicited responses without sending a command.
Where the RFC leaves a choice the answers are Dovecot's (see
mailsrv/imap/notify.py and mailsrv/imap/commands/notify.py).
"""

from __future__ import annotations

import re
import time

from twisted.internet import defer, threads
from twisted.trial import unittest

from mailsrv.imap.commands import notify as notify_commands
from mailsrv.spool import BytesSource
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import PASSWORD, USER

MSG = b"From: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
EVENTS = b"(MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange)"
BADEVENT = (
    b"NO [BADEVENT (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange)]"
    b" Unsupported NOTIFY events\r\n"
)


def append(c: RawClient, tag: bytes, folder: bytes, data: bytes = MSG) -> list[bytes]:
    c.send(tag + b" APPEND " + folder + b" {%d+}\r\n" % len(data) + data + b"\r\n")
    return c.read_until(tag)


def status_values(line: bytes) -> dict[bytes, int]:
    inner = re.search(rb"\((.*)\)", line)
    assert inner is not None, line
    parts = inner.group(1).split()
    return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts), 2)}


class NotifyCase(LoopbackIMAPCase):
    """Two clients of one user: C{a} listens, C{b} changes things."""

    def clients(self, script) -> defer.Deferred:
        """Run C{script(a, b)} in a thread with both clients logged in; fires with its result."""
        port = self.port_number

        def go():
            a, b = RawClient(port), RawClient(port)
            try:
                a.login()
                b.login()
                return script(a, b)
            finally:
                a.close()
                b.close()

        return self.in_thread(go)

    def deliver(self, folder: str = "INBOX", data: bytes = MSG) -> None:
        """An SMTP delivery through the store, from the client thread."""
        from twisted.internet import reactor

        threads.blockingCallFromThread(
            reactor, self.store.deliver, USER, BytesSource(data), "bob@example.test", folder
        )


class NotifyCommandTest(NotifyCase):
    """The command: its syntax, its refusals, NOTIFY NONE."""

    @defer.inlineCallbacks
    def test_capability(self):
        got = yield self.clients(lambda a, b: a.cmd(b"C", b"CAPABILITY"))
        assert b"NOTIFY" in got[0].split(), got

    @defer.inlineCallbacks
    def test_unsupported_events_are_a_no_listing_the_supported(self):
        def script(a, b):
            return [
                a.cmd(b"N1", b"NOTIFY SET (personal (MessageNew MessageExpunge AnnotationChange))"),
                a.cmd(b"N2", b"NOTIFY SET (personal (MailboxMetadataChange))"),
                a.cmd(b"N3", b"NOTIFY SET (inboxes (ServerMetadataChange MailboxName))"),
                a.cmd(b"N4", b"NOTIFY SET (personal (SomethingNew))"),
            ]

        got = yield self.clients(script)
        for tag, answer in zip((b"N1", b"N2", b"N3", b"N4"), got, strict=True):
            assert answer == [tag + b" " + BADEVENT], answer

    @defer.inlineCallbacks
    def test_rule_breaking_arguments_are_bad(self):
        bad = [
            b"NOTIFY",
            b"NOTIFY FOO",
            b"NOTIFY SET",
            b"NOTIFY SET STATUS",
            b"NOTIFY NONE (personal (MailboxName))",
            b"NOTIFY SET (personal (MessageNew))",  # RFC 5465 5: with MessageExpunge
            b"NOTIFY SET (personal (MessageExpunge))",
            b"NOTIFY SET (personal (FlagChange))",  # RFC 5465 5: with both
            b"NOTIFY SET (selected (MailboxName))",  # RFC 5465 6.1: message events only
            b"NOTIFY SET (selected (MessageNew MessageExpunge)) (selected-delayed NONE)",
            b"NOTIFY SET (personal (MessageNew (UID) MessageExpunge))",  # RFC 5465 5.2
            b"NOTIFY SET (selected (MessageNew (NOSUCHATT) MessageExpunge))",
            b"NOTIFY SET (subtree (MessageNew MessageExpunge))",
            b"NOTIFY SET (mailboxes () (MessageNew MessageExpunge))",
            b"NOTIFY SET (elsewhere (MailboxName))",
            b"NOTIFY SET (personal ())",
            b"NOTIFY SET (personal (MailboxName)",
            b"NOTIFY SET personal",
        ]

        def script(a, b):
            out = []
            for i, line in enumerate(bad):
                out.append(a.cmd(b"N%d" % i, line))
                a.cmd(b"K%d" % i, b"NOOP")  # not too many BADs in a row
            return out

        got = yield self.clients(script)
        for i, (line, answer) in enumerate(zip(bad, got, strict=True)):
            assert len(answer) == 1 and answer[0].startswith(b"N%d BAD " % i), (line, answer)

    @defer.inlineCallbacks
    def test_accepted_forms(self):
        good = [
            b"NOTIFY NONE",
            b"NOTIFY SET (inboxes NONE)",
            b"NOTIFY SET (selected-delayed (MessageNew MessageExpunge FlagChange))",
            b"notify set (SELECTED (messagenew (UID BODY.PEEK[HEADER.FIELDS (FROM TO)])"
            b" messageexpunge)) (Personal (mailboxname))",
            b'NOTIFY SET (subtree ("Lists" INBOX) (MessageNew MessageExpunge))',
            b"NOTIFY SET (mailboxes Lists (MessageNew MessageExpunge)) (subscribed (MailboxName))",
        ]

        def script(a, b):
            return [a.cmd(b"N%d" % i, line) for i, line in enumerate(good)]

        got = yield self.clients(script)
        for i, (line, answer) in enumerate(zip(good, got, strict=True)):
            assert answer == [b"N%d OK NOTIFY completed\r\n" % i], (line, answer)

    @defer.inlineCallbacks
    def test_notify_none_stops_the_notifications(self):
        def script(a, b):
            a.cmd(b"N1", b"NOTIFY SET (personal (MailboxName))")
            b.cmd(b"B1", b"CREATE One")
            first = a.file.readline()
            a.cmd(b"N2", b"NOTIFY NONE")
            b.cmd(b"B2", b"CREATE Two")
            b.cmd(b"B3", b"CREATE Three")
            return first, a.cmd(b"N3", b"NOOP")

        first, noop = yield self.clients(script)
        assert first == b'* LIST (\\NoInferiors) "/" One\r\n', first
        assert noop == [b"N3 OK NOOP completed\r\n"], noop
        assert self.factory.store.states.user_feed.listening(USER) is False


class NotifyDisconnectTest(NotifyCase):
    """A session that goes leaves no listener behind."""

    @defer.inlineCallbacks
    def test_listeners_go_with_the_connection(self):
        def script(a, b):
            for c in (a, b):
                c.cmd(b"N", b"NOTIFY SET (personal (MailboxName SubscriptionChange))")

        yield self.clients(script)
        yield self.settle()
        assert not self.store.states.user_feed.listening(USER)
        assert all(p._notify is None and p._notify_subscribed_to is None for p in self.protocols)


class NotifyOtherMailboxesTest(NotifyCase):
    """STATUS and LIST for mailboxes other than the selected one, as they change."""

    @defer.inlineCallbacks
    def test_status_at_set_then_status_as_mail_comes(self):
        def script(a, b):
            b.cmd(b"B1", b"CREATE Lists")
            append(b, b"B2", b"Lists")
            set_answer = a.cmd(
                b"N1", b"NOTIFY SET STATUS (mailboxes Lists (MessageNew MessageExpunge))"
            )
            self.deliver("Lists")
            pushed = [a.file.readline()]
            b.cmd(b"B3", b"SELECT Lists")
            b.cmd(b"B4", b"STORE 1 +FLAGS (\\Deleted)")
            b.cmd(b"B5", b"EXPUNGE")
            pushed.append(a.file.readline())
            status = b.cmd(b"B6", b"STATUS INBOX (UIDVALIDITY)")
            lists = a.cmd(b"A1", b"STATUS Lists (UIDVALIDITY)")
            return set_answer, pushed, lists, status

        set_answer, pushed, lists, _ = yield self.clients(script)
        validity = status_values(lists[0])[b"UIDVALIDITY"]
        assert set_answer == [
            b"* STATUS Lists (MESSAGES 1 UIDNEXT 2 UIDVALIDITY %d UNSEEN 1)\r\n" % validity,
            b"N1 OK NOTIFY completed\r\n",
        ], set_answer
        # What changed since the STATUS told: new mail, then an expunge.
        assert pushed == [
            b"* STATUS Lists (MESSAGES 2 UIDNEXT 3 UNSEEN 2)\r\n",
            b"* STATUS Lists (MESSAGES 1 UIDNEXT 3 UNSEEN 1)\r\n",
        ], pushed

    @defer.inlineCallbacks
    def test_first_change_tells_all_four_and_flags_tell_unseen(self):
        def script(a, b):
            a.cmd(b"N1", b"NOTIFY SET (personal (MessageNew MessageExpunge FlagChange))")
            self.deliver()
            first = a.file.readline()
            b.cmd(b"B1", b"SELECT INBOX")
            b.cmd(b"B2", b"STORE 1 +FLAGS (\\Seen)")
            seen = a.file.readline()
            b.cmd(b"B3", b"STORE 1 +FLAGS (\\Flagged)")  # UNSEEN as before: nothing to tell
            b.cmd(b"B4", b"STORE 1 -FLAGS (\\Seen)")
            unseen = a.file.readline()
            return first, seen, unseen

        first, seen, unseen = yield self.clients(script)
        assert re.fullmatch(
            rb"\* STATUS INBOX \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1\)\r\n", first
        ), first
        assert seen == b"* STATUS INBOX (UNSEEN 0)\r\n", seen
        assert unseen == b"* STATUS INBOX (UNSEEN 1)\r\n", unseen

    @defer.inlineCallbacks
    def test_condstore_sessions_are_told_highestmodseq(self):
        # RFC 5465 5.1-5.3: after ENABLE CONDSTORE each STATUS carries HIGHESTMODSEQ,
        # and a flag change that leaves UNSEEN as it was is told by it alone.
        def script(a, b):
            a.cmd(b"E1", b"ENABLE CONDSTORE")
            a.cmd(b"N1", b"NOTIFY SET (personal (MessageNew MessageExpunge FlagChange))")
            self.deliver()
            first = a.file.readline()
            b.cmd(b"B1", b"SELECT INBOX")
            b.cmd(b"B2", b"STORE 1 +FLAGS (\\Flagged)")
            flagged = a.file.readline()
            return first, flagged

        first, flagged = yield self.clients(script)
        m = re.fullmatch(
            rb"\* STATUS INBOX \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1"
            rb" HIGHESTMODSEQ (\d+)\)\r\n",
            first,
        )
        assert m, first
        m2 = re.fullmatch(rb"\* STATUS INBOX \(HIGHESTMODSEQ (\d+)\)\r\n", flagged)
        assert m2, flagged
        assert int(m2.group(1)) > int(m.group(1))

    @defer.inlineCallbacks
    def test_nothing_new_is_not_told(self):
        def script(a, b):
            self.deliver()
            a.cmd(
                b"N1",
                b"NOTIFY SET STATUS (personal (MessageNew MessageExpunge FlagChange MailboxName))",
            )
            b.cmd(b"B1", b"SELECT INBOX")
            b.cmd(b"B2", b"STORE 1 +FLAGS (\\Seen)")
            seen = a.file.readline()
            b.cmd(b"B3", b"LOGOUT")  # the flags are written into the file now
            c = RawClient(self.port_number)
            c.login()
            c.cmd(b"C1", b"CREATE Marker")
            c.close()
            return seen, a.file.readline()

        seen, marker = yield self.clients(script)
        assert seen == b"* STATUS INBOX (UNSEEN 0)\r\n", seen
        assert marker == b'* LIST (\\NoInferiors) "/" Marker\r\n', marker

    @defer.inlineCallbacks
    def test_only_the_filtered_mailboxes_and_not_the_selected_one(self):
        def script(a, b):
            for i, name in enumerate((b"Lists/", b"Lists/a", b"Listsx", b"Work")):
                b.cmd(b"B%d" % i, b"CREATE " + name)
            a.cmd(b"S", b"SELECT INBOX")
            a.cmd(b"N1", b"NOTIFY SET (subtree Lists (MessageNew MessageExpunge)) (personal NONE)")
            # Not told: the selected mailbox (its EXISTS waits for NOOP), other names.
            for folder in ("INBOX", "Listsx", "Work", "Lists/a"):
                self.deliver(folder)
            return a.file.readline(), a.cmd(b"A1", b"NOOP")

        first, noop = yield self.clients(script)
        assert first.startswith(b"* STATUS Lists/a (MESSAGES 1 UIDNEXT 2 UIDVALIDITY "), first
        assert noop == [b"* 1 EXISTS\r\n", b"* 1 RECENT\r\n", b"A1 OK NOOP completed\r\n"], noop

    @defer.inlineCallbacks
    def test_mailbox_name_create_rename_delete(self):
        def script(a, b):
            a.cmd(b"N1", b"NOTIFY SET (personal (MailboxName))")
            got = []
            for i, (command, lines) in enumerate(
                [
                    (b"CREATE Work", 1),
                    (b"RENAME Work Play", 1),
                    (b"CREATE Dir/", 1),
                    (b"CREATE Dir/x", 1),
                    (b"RENAME Dir Top", 2),
                    (b"DELETE Play", 1),
                ]
            ):
                b.cmd(b"B%d" % i, command)
                got += [a.file.readline() for _ in range(lines)]
            return got

        got = yield self.clients(script)
        assert got == [
            b'* LIST (\\NoInferiors) "/" Work\r\n',
            b'* LIST (\\NoInferiors) "/" Play ("OLDNAME" (Work))\r\n',
            b'* LIST (\\Noselect \\HasNoChildren) "/" Dir\r\n',
            b'* LIST (\\NoInferiors) "/" Dir/x\r\n',
            b'* LIST (\\Noselect \\HasChildren) "/" Top ("OLDNAME" (Dir))\r\n',
            b'* LIST (\\NoInferiors) "/" Top/x ("OLDNAME" (Dir/x))\r\n',
            b'* LIST (\\NonExistent) "/" Play\r\n',
        ], got

    @defer.inlineCallbacks
    def test_a_renamed_tree_is_listed_from_one_listing(self):
        listings = []
        list_folders = self.store.list_folders

        def counted(user):
            listings.append(user)
            return list_folders(user)

        self.patch(self.store, "list_folders", counted)

        def script(a, b):
            b.cmd(b"B0", b"CREATE Dir/")
            for i in range(30):
                b.cmd(b"B%d" % (i + 1), b"CREATE Dir/x%02d" % i)
            a.cmd(b"N1", b"NOTIFY SET (personal (MailboxName))")
            del listings[:]
            b.cmd(b"B99", b"RENAME Dir Top")
            return [a.file.readline() for _ in range(31)]

        got = yield self.clients(script)
        assert got[0] == b'* LIST (\\Noselect \\HasChildren) "/" Top ("OLDNAME" (Dir))\r\n', got
        assert got[-1] == b'* LIST (\\NoInferiors) "/" Top/x29 ("OLDNAME" (Dir/x29))\r\n', got
        assert len(listings) <= 2, listings

    @defer.inlineCallbacks
    def test_subscription_change(self):
        def script(a, b):
            b.cmd(b"B0", b"CREATE Work")
            a.cmd(b"N1", b"NOTIFY SET (personal (SubscriptionChange))")
            b.cmd(b"B1", b"SUBSCRIBE Work")
            b.cmd(b"B2", b"UNSUBSCRIBE Work")
            b.cmd(b"B3", b"SUBSCRIBE Gone")
            return [a.file.readline() for _ in range(3)], a.cmd(b"A1", b'LSUB "" Gone')

        got, lsub = yield self.clients(script)
        assert got == [
            b'* LIST (\\Subscribed \\NoInferiors) "/" Work\r\n',
            b'* LIST (\\NoInferiors) "/" Work\r\n',
            b'* LIST (\\Subscribed \\NonExistent) "/" Gone\r\n',
        ], got
        assert lsub[0] == b'* LSUB () "/" Gone\r\n', lsub

    @defer.inlineCallbacks
    def test_subscribed_filter_follows_the_subscriptions(self):
        def script(a, b):
            b.cmd(b"B0", b"CREATE Work")
            b.cmd(b"B1", b"CREATE Play")
            a.cmd(b"N1", b"NOTIFY SET (subscribed (MessageNew MessageExpunge))")
            self.deliver("Work")  # not subscribed: nothing
            b.cmd(b"B2", b"SUBSCRIBE Play")  # RFC 5465 6.4: the list is read again
            self.deliver("Play")
            return a.file.readline()

        got = yield self.clients(script)
        assert got.startswith(b"* STATUS Play (MESSAGES 1 UIDNEXT 2 "), got


class NotifySelectedTest(NotifyCase):
    """The selected mailbox with SELECTED: EXISTS, FETCH and EXPUNGE pushed at once."""

    @defer.inlineCallbacks
    def test_new_flags_and_expunge_pushed(self):
        def script(a, b):
            a.cmd(b"S", b"SELECT INBOX")
            a.cmd(
                b"N1",
                b"NOTIFY SET (selected (MessageNew (UID FLAGS) MessageExpunge FlagChange))",
            )
            append(b, b"B1", b"INBOX")
            new = [a.file.readline() for _ in range(3)]
            b.cmd(b"B2", b"SELECT INBOX")
            b.cmd(b"B3", b"STORE 1 +FLAGS (\\Answered)")
            flags = a.file.readline()
            b.cmd(b"B4", b"STORE 1 +FLAGS (\\Deleted)")
            a.file.readline()
            b.cmd(b"B5", b"EXPUNGE")
            gone = [a.file.readline() for _ in range(2)]
            return new, flags, gone, a.cmd(b"A1", b"NOOP")

        new, flags, gone, noop = yield self.clients(script)
        assert new == [
            b"* 1 EXISTS\r\n",
            b"* 1 RECENT\r\n",
            b"* 1 FETCH (UID 1 FLAGS (\\Recent))\r\n",
        ]
        assert flags == b"* 1 FETCH (FLAGS (\\Answered \\Recent))\r\n", flags
        assert gone == [b"* 1 EXPUNGE\r\n", b"* 0 EXISTS\r\n"], gone
        assert noop == [b"A1 OK NOOP completed\r\n"], noop

    @defer.inlineCallbacks
    def test_set_catches_up_like_noop(self):
        def script(a, b):
            a.cmd(b"S", b"SELECT INBOX")
            self.deliver()
            return a.cmd(b"N1", b"NOTIFY SET (selected (MessageNew MessageExpunge))")

        got = yield self.clients(script)
        assert got == [b"* 1 EXISTS\r\n", b"* 1 RECENT\r\n", b"N1 OK NOTIFY completed\r\n"], got

    @defer.inlineCallbacks
    def test_selected_delayed_waits_for_a_command(self):
        def script(a, b):
            a.cmd(b"S", b"SELECT INBOX")
            a.cmd(
                b"N1",
                b"NOTIFY SET (selected-delayed (MessageNew MessageExpunge)) (personal (MailboxName))",
            )
            self.deliver()
            b.cmd(b"B1", b"CREATE Marker")
            # The LIST comes by itself; the EXISTS waited for a command.
            return a.file.readline(), a.cmd(b"A1", b"NOOP")

        marker, noop = yield self.clients(script)
        assert marker == b'* LIST (\\NoInferiors) "/" Marker\r\n', marker
        assert noop == [b"* 1 EXISTS\r\n", b"* 1 RECENT\r\n", b"A1 OK NOOP completed\r\n"], noop


class NotifyTimingTest(NotifyCase):
    """Never inside another command's response; a cap on what waits (RFC 5465 5.8)."""

    @defer.inlineCallbacks
    def test_held_back_until_the_command_is_answered(self):
        def script(a, b):
            a.cmd(b"N1", b"NOTIFY SET (personal (MailboxName))")
            a.send(b"A1 APPEND INBOX {%d}\r\n" % len(MSG))
            cont = a.file.readline()  # a command under way, waiting for its literal
            b.cmd(b"B1", b"CREATE During")
            b.cmd(b"B2", b"NOOP")
            a.send(MSG + b"\r\n")
            return cont, a.read_until(b"A1"), a.file.readline()

        cont, answer, after = yield self.clients(script)
        assert cont.startswith(b"+ "), cont
        assert len(answer) == 1 and answer[0].startswith(b"A1 OK [APPENDUID "), answer
        assert after == b'* LIST (\\NoInferiors) "/" During\r\n', after

    @defer.inlineCallbacks
    def test_overflow_turns_notify_off(self):
        self.patch(notify_commands, "MAX_QUEUED", 3)

        def script(a, b):
            a.cmd(b"N1", b"NOTIFY SET (personal (MailboxName))")
            a.send(b"A1 APPEND INBOX {%d}\r\n" % len(MSG))
            a.file.readline()
            for i in range(5):
                b.cmd(b"B%d" % i, b"CREATE Box%d" % i)
            a.send(MSG + b"\r\n")
            answer = a.read_until(b"A1")
            overflow = a.file.readline()
            b.cmd(b"B9", b"CREATE After")
            return answer, overflow, a.cmd(b"A2", b"NOOP")

        answer, overflow, noop = yield self.clients(script)
        assert len(answer) == 1, answer
        assert overflow == b"* OK [NOTIFICATIONOVERFLOW] Too many notifications\r\n", overflow
        # RFC 5465 5.8: as after NOTIFY NONE.
        assert noop == [b"A2 OK NOOP completed\r\n"], noop


MBOX = b"From a@b Thu Jan  1 00:00:00 2024\nSubject: x\n\nhi\n"


def _dovecot_script(port: int, login: bytes) -> dict[str, object]:
    """The same NOTIFY session against a server: what it answers and pushes."""
    a, b = RawClient(port, timeout=30), RawClient(port, timeout=30)
    try:
        for c in (a, b):
            assert c.cmd(b"L", login)[-1].split()[1] == b"OK"
        b.cmd(b"B1", b"CREATE foo")
        b.cmd(b"B2", b"CREATE bar")
        out: dict[str, object] = {}
        refusals = [
            b"NOTIFY FOO",
            b"NOTIFY SET (selected (MessageNew MessageExpunge)) (selected-delayed NONE)",
            b"NOTIFY SET (mailboxes foo (MessageNew (UID) MessageExpunge))",
            b"NOTIFY SET (personal (MessageNew MessageExpunge AnnotationChange))",
        ]
        out["refusals"] = [a.cmd(b"R", r)[-1].split()[1] for r in refusals]
        answer = a.cmd(b"N1", b"NOTIFY SET STATUS (personal (MessageNew MessageExpunge))")
        # Our test configuration adds special folders (Sent, Trash, ...): left out.
        out["status"] = sorted(
            re.sub(rb"UIDVALIDITY \d+", b"UIDVALIDITY v", ln)
            for ln in answer[:-1]
            if ln.split()[2] in (b"INBOX", b"foo", b"bar")
        )
        a.cmd(b"S", b"SELECT INBOX")
        a.cmd(b"N2", b"NOTIFY SET (selected (MessageNew (UID FLAGS) MessageExpunge))")
        # Dovecot watches the selected mailbox from one second after a command ends
        # (imap-notify.c, IMAP_NOTIFY_WATCH_ADD_DELAY_MSECS); a change before is told later.
        # Real time against a real peer, with a margin for a loaded machine.
        time.sleep(3)
        append(b, b"B3", b"INBOX")
        pushed: list[bytes] = []
        while len(pushed) < 3:
            line = a.file.readline()
            if not line.startswith(b"* STATUS"):
                pushed.append(line)
        out["pushed"] = pushed
        return out
    finally:
        a.close()
        b.close()


class NotifyLikeDovecotTest(NotifyCase):
    """Where RFC 5465 leaves a choice, the answers are Dovecot's, byte for byte."""

    timeout = 120

    def setUp(self) -> None:
        from tests import dovecot_peer

        reason = dovecot_peer.available()
        if reason:
            raise unittest.SkipTest(reason)
        super().setUp()
        from mailsrv.store.names import folder_path

        path = folder_path(self.config.mail_dir, USER, "INBOX")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(MBOX)
        self.dovecot = dovecot_peer.Dovecot()
        self.addCleanup(self.dovecot.stop)
        self.dovecot.start(MBOX)
        self.dovecot_login = b"LOGIN %s %s" % (
            dovecot_peer.USER.encode(),
            dovecot_peer.PASSWORD.encode(),
        )

    @defer.inlineCallbacks
    def test_same_answers_as_dovecot(self):
        ours = yield self.in_thread(
            _dovecot_script, self.port_number, b'LOGIN %s "%s"' % (USER.encode(), PASSWORD)
        )
        theirs = yield self.in_thread(_dovecot_script, self.dovecot.port, self.dovecot_login)
        assert ours == theirs, (ours, theirs)
        assert len(theirs["status"]) == 3, theirs
        assert theirs["pushed"] == [
            b"* 2 EXISTS\r\n",
            b"* 2 RECENT\r\n",
            b"* 2 FETCH (UID 2 FLAGS (\\Recent))\r\n",
        ], theirs


def test_e2e_smtp_delivery_and_pop3_expunge_are_pushed(tmp_path):
    """The real daemon: SMTP mail and a POP3 DELE reach an IMAP client that asked NOTIFY."""
    import poplib
    import smtplib

    from tests.e2e import PASSWORD as E2E_PASSWORD
    from tests.e2e import MailServer

    alice = "alice@example.test"
    with MailServer(tmp_path) as srv:
        srv.add_user(alice)
        c = RawClient(srv.ports["imap"], timeout=30)
        try:
            assert (
                c.cmd(b"L", b'LOGIN %s "%s"' % (alice.encode(), E2E_PASSWORD.encode()))[-1][:4]
                == b"L OK"
            )
            assert c.cmd(b"N", b"NOTIFY SET (inboxes (MessageNew MessageExpunge))") == [
                b"N OK NOTIFY completed\r\n"
            ]
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
                s.sendmail("bob@remote.test", [alice], MSG)
            delivered = c.file.readline()
            p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
            p.user(alice)
            p.pass_(E2E_PASSWORD)
            p.dele(1)
            p.quit()
            expunged = c.file.readline()
        finally:
            c.close()
    assert re.fullmatch(
        rb"\* STATUS INBOX \(MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1\)\r\n", delivered
    ), delivered
    assert expunged == b"* STATUS INBOX (MESSAGES 0 UIDNEXT 2 UNSEEN 0)\r\n", expunged
