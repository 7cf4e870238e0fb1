"""
Flags that another program (mutt, Python's mailbox) writes as Status: and
X-Status: headers reach mailsrv's sessions under the same UIDs, also for
messages mailsrv had indexed already. Checked through the store, and over
IMAP from a real daemon with the real mutt flagging a message.
"""

from __future__ import annotations

import imaplib
import mailbox
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from tests.e2e import PASSWORD, MailServer
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool

MUTT = shutil.which("mutt")
SCRIPT = shutil.which("script")
needs_mutt = pytest.mark.skipif(
    MUTT is None or SCRIPT is None, reason="mutt (and script, for its terminal) not installed"
)

MUTTRC = """set mbox_type=mbox
set mark_old=yes
set move=no
set confirmappend=no
set quit=yes
set delete=no
set wait_key=no
set check_new=no
set resolve=no
"""


def mutt(tmp: Path, mbox: Path, keys: str) -> None:
    """Run the real mutt on C{mbox}, typing C{keys} (under a pseudo-terminal, via script)."""
    home = (tmp / "mutt-home").resolve()
    home.mkdir(exist_ok=True)
    rc = home / "muttrc"
    # Point every folder mutt looks at on start into its home: a missing one
    # makes it beep and drop the keys pushed so far.
    rc.write_text(
        MUTTRC
        + f"set folder={home}\nset spoolfile={mbox.resolve()}\nset mbox={home}/mbox\n"
        + f"set record={home}/sent\nset postponed={home}/postponed\n"
    )
    cmd = f"{MUTT} -n -F {rc} -f {mbox.resolve()} -e 'push \"{keys}\"'"
    env = dict(os.environ, TERM="vt100", HOME=str(home))
    subprocess.run(
        [SCRIPT, "-qec", cmd, "/dev/null"],
        env=env,
        cwd=home,
        check=True,
        timeout=60,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def message(i: int) -> bytes:
    return b"Subject: m%d\nMessage-ID: <%d@flags>\n\nbody %d\n" % (i, i, i)


class ForeignFlagTests(SynchronousTestCase):
    def setUp(self):
        # in the system's temporary directory, like the other e2e tests with mutt
        self.root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        for i in (1, 2, 3):
            self.successResultOf(self.store.deliver(USER, BytesSource(message(i)), "s@x"))
        self.folder = self.successResultOf(self.store.open_folder(USER, "INBOX"))
        self.addCleanup(self.folder.close)
        self.successResultOf(self.folder.set_flags({1: {SEEN, "$Label1"}}))

    def flags(self):
        return {m.uid: m.flags for m in self.folder.messages()}

    def contents(self):
        """uid -> (size, bytes, header block) as sessions see them."""
        out = {}
        for m in self.folder.messages():
            with self.folder.open_message(m.uid) as fh:
                data = fh.read()
            self.assertEqual(len(data), m.size)
            out[m.uid] = (m.size, data, self.folder.read_headers(m.uid))
        return out

    def check_sizes(self):
        self.contents()

    def test_python_mailbox_sets_status_headers(self):
        before = self.contents()
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        for key in box.keys():
            msg = box[key]
            if msg["Subject"] == "m2":
                msg.set_flags("RF")  # Status: R, X-Status: F
            elif msg["Subject"] == "m3":
                msg.set_flags("OAD")
            box[key] = msg
        box.flush()
        box.unlock()
        box.close()
        changes = self.successResultOf(self.folder.refresh())
        self.assertEqual(changes.expunged, ())
        self.assertEqual(changes.added, ())
        self.assertEqual(sorted(i.uid for i in changes.flags), [2, 3])
        self.assertEqual(
            self.flags(),
            {1: {SEEN, "$Label1"}, 2: {SEEN, FLAGGED}, 3: {ANSWERED, DELETED}},
        )
        self.assertIn(b"X-Status: F", self.inbox.read_bytes())
        self.assertEqual(self.contents(), before)  # Status:/X-Status: are not shown
        # a later rewrite that leaves the headers alone keeps what sessions set since
        self.successResultOf(self.folder.set_flags({2: {SEEN}}))
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        key = box.keys()[0]
        box[key] = box[key]
        box.flush()
        box.unlock()
        box.close()
        self.successResultOf(self.folder.refresh())
        self.assertEqual(self.flags()[2], {SEEN})

    @needs_mutt
    def test_mutt_flags_a_message(self):
        before = self.contents()
        mutt(self.root, self.inbox, "2<enter><set-flag>!<clear-flag>N<sync-mailbox><quit>")
        text = self.inbox.read_bytes()
        self.assertIn(b"X-Status: F", text)
        changes = self.successResultOf(self.folder.refresh())
        self.assertEqual([i.uid for i in changes.flags], [2])
        self.assertEqual(self.flags(), {1: {SEEN, "$Label1"}, 2: {SEEN, FLAGGED}, 3: set()})
        # mutt added Status:, X-Status:, Content-Length: and Lines: to every message;
        # sessions see the same bytes and sizes under the same UIDs
        self.assertIn(b"Content-Length: ", text)
        self.assertEqual(self.contents(), before)


@needs_mutt
def test_imap_sees_flags_mutt_wrote(tmp_path):
    alice = "alice@example.test"
    with MailServer(tmp_path) as srv:
        srv.add_user(alice)
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            for i in (1, 2, 3):
                s.sendmail("bob@example.test", [alice], message(i).replace(b"\n", b"\r\n"))
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        try:
            imap.login(alice, PASSWORD)
            imap.select("INBOX")
            imap.uid("STORE", "1", "+FLAGS", r"(\Seen)")
            mutt(
                tmp_path,
                srv.inbox(alice),
                "3<enter><set-flag>!<sync-mailbox><quit>",
            )
            imap.noop()
            typ, data = imap.uid("FETCH", "1:*", "(FLAGS)")
            assert typ == "OK"
        finally:
            imap.logout()
    got = {}
    for item in data:
        text = item.decode() if isinstance(item, bytes) else item[0].decode()
        uid, flags = re.search(r"UID (\d+)", text), re.search(r"FLAGS \(([^)]*)\)", text)
        if uid is None:  # the untagged FETCH the NOOP brought (imaplib keeps it here)
            continue
        got[int(uid.group(1))] = set(flags.group(1).split()) - {r"\Recent"}  # not mutt's
    assert got[1] == {r"\Seen"}
    assert got[2] == set()
    assert got[3] == {r"\Flagged"}


class HiddenFieldTests(SynchronousTestCase):
    """The mbox bookkeeping fields are left out of what sessions read, and of the sizes."""

    HEAD = (
        b"Subject: h\nStatus: RO\nX-Keywords: $a\n $b\nMessage-ID: <h@x>\n"
        b"Content-Length: 12\nLines: 1\nX-UID: 7\nX-Status: F\nX-Other: kept\n\n"
    )
    SHOWN = b"Subject: h\r\nMessage-ID: <h@x>\r\nX-Other: kept\r\n\r\n"

    def test_small_large_and_crlf_messages(self):
        root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, root, True)
        inbox = root / "mail" / "example.test" / "alice" / "INBOX"
        inbox.parent.mkdir(parents=True)
        big = b"x" * 100 + b"\n"
        bodies = [b"small\n", big * 4000]
        store = MboxMailStore(
            root / "mail", root / "index", SyncReactor(), SyncThreadPool(), clock=lambda: NOW
        )
        self.successResultOf(store.deliver(USER, BytesSource(self.HEAD + big * 4000), "s@x"))
        with open(inbox, "ab") as fh:  # as another program writes them
            for body in bodies:
                fh.write(b"From a@x Mon Jan  1 00:00:00 2024\n" + self.HEAD + body + b"\n")
            fh.write(
                b"From a@x Mon Jan  1 00:00:00 2024\n"
                + self.HEAD.replace(b"\n", b"\r\n")
                + b"crlf\r\n\r\n"
            )
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        self.addCleanup(f.close)
        want = [b"small\r\n", big.replace(b"\n", b"\r\n") * 4000, b"crlf\r\n"]
        want.insert(0, want[1])
        msgs = f.messages()
        self.assertEqual(len(msgs), 4)
        self.assertEqual(msgs[0].flags, set())  # delivered: the sender's Status: is dropped
        self.assertEqual([m.flags for m in msgs[1:]], [{SEEN, FLAGGED}] * 3)
        for m, body in zip(msgs, want, strict=True):
            with f.open_message(m.uid) as fh:
                data = fh.read()
            self.assertTrue(data == self.SHOWN + body, f"uid {m.uid}: {data[:120]!r}")
            self.assertEqual(m.size, len(data))
            self.assertEqual(f.read_headers(m.uid), self.SHOWN)


class WriteFlagsTests(SynchronousTestCase):
    """Flags sessions set reach the messages' Status:/X-Status: when the last session leaves."""

    def setUp(self):
        self.root = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, True)
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        self.store = self.new_store()
        for i in range(1, 7):
            self.successResultOf(self.store.deliver(USER, BytesSource(message(i)), "s@x"))

    def new_store(self):
        return MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )

    def open(self, store=None):
        return self.successResultOf((store or self.store).open_folder(USER, "INBOX"))

    def seen_by_sessions(self, store=None):
        f = self.open(store)
        out = {}
        for m in f.messages():
            with f.open_message(m.uid) as fh:
                data = fh.read()
            self.assertEqual(len(data), m.size)
            out[m.uid] = (m.flags, data, f.read_headers(m.uid))
        f.close()
        return out

    def file_flags(self):
        box = mailbox.mbox(str(self.inbox))
        try:
            return {m["Subject"]: m.get_flags() for m in box}
        finally:
            box.close()

    def test_written_when_the_last_session_leaves(self):
        before = self.seen_by_sessions()
        f, g = self.open(), self.open()
        flags = {1: {SEEN}, 2: {SEEN, ANSWERED, FLAGGED}, 4: {DRAFT, DELETED, "$Work"}}
        self.successResultOf(f.set_flags(flags))
        f.close()
        self.assertEqual(set(self.file_flags().values()), {""})  # g is still there
        g.close()
        self.assertEqual(
            self.file_flags(),
            {"m1": "RO", "m2": "ROAF", "m3": "", "m4": "OTD", "m5": "", "m6": ""},
        )
        after = self.seen_by_sessions(self.new_store())
        self.assertEqual(
            {u: v[1:] for u, v in after.items()}, {u: v[1:] for u, v in before.items()}
        )
        self.assertEqual({u: v[0] for u, v in after.items() if v[0]}, flags)
        # and back: shorter header blocks, the bytes after them move down
        f = self.open()
        self.successResultOf(f.set_flags({2: set(), 4: {"$Work"}, 6: {FLAGGED}}))
        f.close()
        self.assertEqual(
            self.file_flags(),
            {"m1": "RO", "m2": "O", "m3": "", "m4": "O", "m5": "", "m6": "OF"},
        )
        again = self.seen_by_sessions(self.new_store())
        self.assertEqual(
            {u: v[1:] for u, v in again.items()}, {u: v[1:] for u, v in before.items()}
        )
        self.assertEqual(list((self.root / "index").rglob("*.rewrite*")), [])

    @needs_mutt
    def test_mutt_sees_them(self):
        f = self.open()
        self.successResultOf(f.set_flags({1: {SEEN}, 3: {SEEN}, 5: {SEEN, FLAGGED}}))
        f.close()
        # mutt deletes the messages it sees as read: 1, 3 and 5
        keys = ":set delete=yes<enter><delete-pattern>~R<enter><sync-mailbox><quit>"
        mutt(self.root, self.inbox, keys)
        box = mailbox.mbox(str(self.inbox))
        self.assertEqual(sorted(m["Subject"] for m in box), ["m2", "m4", "m6"])
        box.close()
        got = self.seen_by_sessions(self.new_store())
        self.assertEqual(sorted(got), [2, 4, 6])


def _fetch(imap, what: str) -> dict[int, bytes]:
    typ, data = imap.uid("FETCH", "1:*", f"(UID {what})")
    assert typ == "OK"
    out = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
            out[uid] = item[0] + item[1]
    return out


def test_imap_flags_reach_the_file_after_logout(tmp_path):
    alice = "alice@example.test"
    with MailServer(tmp_path) as srv:
        srv.add_user(alice)
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            for i in (1, 2, 3):
                s.sendmail("bob@example.test", [alice], message(i).replace(b"\n", b"\r\n"))
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        imap.login(alice, PASSWORD)
        imap.select("INBOX")
        before = _fetch(imap, "RFC822.SIZE BODY.PEEK[]")
        imap.uid("STORE", "1", "+FLAGS", r"(\Seen)")
        imap.uid("STORE", "2", "+FLAGS", r"(\Flagged \Answered)")
        imap.logout()
        inbox = srv.inbox(alice)
        deadline = time.monotonic() + 20
        while b"X-Status" not in inbox.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        box = mailbox.mbox(str(inbox))
        written = {m["Subject"]: m.get_flags() for m in box}
        box.close()
        assert written == {"m1": "RO", "m2": "OAF", "m3": ""}
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        try:
            imap.login(alice, PASSWORD)
            imap.select("INBOX")
            after = _fetch(imap, "RFC822.SIZE BODY.PEEK[]")
        finally:
            imap.logout()
    assert after == before  # same UIDs, sizes and bytes


def _set_file_flags(inbox: Path, flags: dict[str, str]) -> None:
    """Rewrite the folder with Python's mailbox (as mutt does): Subject -> mbox flag letters."""
    box = mailbox.mbox(str(inbox))
    box.lock()
    try:
        for key in box.keys():
            msg = box[key]
            if msg["Subject"] in flags:
                msg.set_flags(flags[msg["Subject"]])
                box[key] = msg
        box.flush()
    finally:
        box.unlock()
        box.close()


class FlagMergeTests(SynchronousTestCase):
    """
    A change of Status:/X-Status: by another program is merged flag by flag
    with what sessions set since the file last said anything: what the file
    gained is added, what it lost is taken away, the rest stays; \\Deleted
    (and \\Draft) a file change only adds.
    """

    setUp = WriteFlagsTests.setUp
    new_store = WriteFlagsTests.new_store
    open = WriteFlagsTests.open
    file_flags = WriteFlagsTests.file_flags

    def test_sessions_changes_since_the_last_write_stay(self):
        f = self.open()
        self.successResultOf(f.set_flags({1: {DELETED}, 3: {SEEN, ANSWERED}}))
        f.close()  # written: m1 X-Status: D, m3 Status: RO X-Status: A
        self.assertEqual(self.file_flags()["m1"], "OD")
        g = self.open()  # stays open: what it sets is not written yet
        self.successResultOf(g.set_flags({1: set(), 2: {FLAGGED}, 3: {SEEN, ANSWERED, "$k"}}))
        # the user reads m1 and m2 in mutt, and marks m3 unread
        _set_file_flags(self.inbox, {"m1": "ROD", "m2": "RO", "m3": "OA"})
        self.successResultOf(g.refresh())
        flags = {m.uid: m.flags for m in g.messages()}
        self.assertEqual(flags[1], {SEEN})  # undeleted over IMAP: stays undeleted
        self.assertEqual(flags[2], {SEEN, FLAGGED})  # \Flagged set over IMAP stays
        self.assertEqual(flags[3], {ANSWERED, "$k"})
        g.close()

    def test_a_d_lost_in_a_rewrite_is_not_an_undelete(self):
        f = self.open()
        self.successResultOf(f.set_flags({5: {SEEN, DELETED}, 6: {DRAFT}}))
        f.close()
        self.assertEqual(self.file_flags()["m5"], "ROD")
        # mutt rewrites the folder from a view it read before X-Status: D was there
        _set_file_flags(self.inbox, {"m5": "RO", "m6": "O", "m4": "RO"})
        g = self.open()
        flags = {m.uid: m.flags for m in g.messages()}
        self.assertEqual(flags[5], {SEEN, DELETED})
        self.assertEqual(flags[6], {DRAFT})
        self.assertEqual(flags[4], {SEEN})
        g.close()

    @needs_mutt
    def test_mutt_reads_a_message_a_session_deleted(self):
        f = self.open()  # stays open: the flags are in the index only
        self.successResultOf(f.set_flags({1: {DELETED, FLAGGED}, 2: {FLAGGED}}))
        mutt(self.root, self.inbox, "<display-message><exit><sync-mailbox><quit>")
        self.assertEqual(self.file_flags()["m1"], "RO")
        self.successResultOf(f.refresh())
        flags = {m.uid: m.flags for m in f.messages()}
        self.assertEqual(flags[1], {SEEN, DELETED, FLAGGED})
        self.assertEqual(flags[2], {FLAGGED})
        f.close()


ALICE = "alice@example.test"


def test_imap_changes_survive_a_mutt_rewrite(tmp_path):
    with MailServer(tmp_path) as srv:
        srv.add_user(ALICE)
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            for i in (1, 2):
                s.sendmail("bob@example.test", [ALICE], message(i).replace(b"\n", b"\r\n"))
        inbox = srv.inbox(ALICE)
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        imap.login(ALICE, PASSWORD)
        imap.select("INBOX")
        imap.uid("STORE", "1", "+FLAGS", r"(\Deleted)")
        imap.logout()
        deadline = time.monotonic() + 20
        while b"X-Status: D" not in inbox.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        try:
            imap.login(ALICE, PASSWORD)
            imap.select("INBOX")
            # the user undeletes m1 and flags m2 over IMAP (not written: the session stays) ...
            imap.uid("STORE", "1", "-FLAGS", r"(\Deleted)")
            imap.uid("STORE", "2", "+FLAGS", r"(\Flagged)")
            # ... and reads both in mutt, which writes Status: RO and keeps X-Status: D
            _set_file_flags(inbox, {"m1": "ROD", "m2": "RO"})
            imap.noop()
            typ, data = imap.uid("FETCH", "1:*", "(FLAGS)")
            assert typ == "OK"
            typ, gone = imap.expunge()
            assert typ == "OK"
        finally:
            imap.logout()
        box = mailbox.mbox(str(inbox))
        left = sorted(m["Subject"] for m in box)
        box.close()
    got = {}
    for item in data:
        text = item.decode() if isinstance(item, bytes) else item[0].decode()
        uid, flags = re.search(r"UID (\d+)", text), re.search(r"FLAGS \(([^)]*)\)", text)
        if uid is not None:
            got[int(uid.group(1))] = set(flags.group(1).split()) - {r"\Recent"}  # not mutt's
    assert got == {1: {r"\Seen"}, 2: {r"\Seen", r"\Flagged"}}
    assert gone == [None]
    assert left == ["m1", "m2"]
