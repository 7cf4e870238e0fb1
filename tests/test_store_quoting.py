"""
mboxrd or mboxo: what mailsrv appended is read mboxrd (exactly what was sent
comes back); what another program wrote (procmail, Postfix local, mutt,
Python's mailbox: all mboxo) is read as it is, so a ">From " line it wrote
keeps its '>'. Checked with the real procmail, through the store and over
POP3 from a real daemon.
"""

from __future__ import annotations

import mailbox
import poplib
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from mailsrv.spool import BytesSource
from mailsrv.store import mboxfmt
from mailsrv.store.mbox import MboxMailStore
from tests.e2e import PASSWORD, MailServer
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool, crlf

PROCMAIL = shutil.which("procmail")
needs_procmail = pytest.mark.skipif(PROCMAIL is None, reason="procmail is not installed")

BODY = (
    b"From: bob@example.test\n"
    b"Subject: quoting\n"
    b"Message-ID: <q@example.test>\n"
    b"\n"
    b"From the start of a line\n"
    b">From quoted once\n"
    b">>From quoted twice\n"
    b"\n"
    b"From again after a blank line\n"
    b"end\n"
)
# What procmail (mboxo) leaves in the file, and so what every mbox reader
# (mutt, Dovecot, mailsrv) sees: "From " lines gained a '>' that nobody can
# tell from a '>' that was sent; ">From " lines are exactly as sent.
BODY_AFTER_MBOXO = BODY.replace(b"\nFrom ", b"\n>From ")


def procmail_deliver(tmp: Path, mbox: Path, message: bytes, sender: str = "bob@example.test"):
    """Deliver C{message} into C{mbox} with the real procmail (its own locking, mboxo)."""
    rc = tmp / "procmailrc"
    rc.write_text(
        f"DEFAULT={mbox}\nORGMAIL={mbox}\nLOGFILE={tmp / 'procmail.log'}\nSHELL=/bin/sh\n"
    )
    subprocess.run([PROCMAIL, "-f", sender, "-m", str(rc)], input=message, check=True, timeout=30)


@needs_procmail
class ProcmailTests(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        self.inbox.parent.mkdir(parents=True)

    def new_store(self, index="index"):
        return MboxMailStore(
            self.root / "mail",
            self.root / index,
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )

    def read_all(self, store) -> list[tuple[int, int, bytes]]:
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        out = []
        for info in f.messages():
            with f.open_message(info.uid) as fh:
                data = fh.read()
            self.assertEqual(len(data), info.size)
            out.append((info.uid, info.size, data))
        f.close()
        return out

    def test_procmail_and_mailsrv_in_one_file(self):
        store = self.new_store()
        self.successResultOf(store.deliver(USER, BytesSource(BODY), "bob@example.test"))
        procmail_deliver(self.root, self.inbox, BODY)
        self.successResultOf(store.deliver(USER, BytesSource(BODY), "bob@example.test"))
        procmail_deliver(self.root, self.inbox, BODY)
        want = [crlf(BODY), crlf(BODY_AFTER_MBOXO), crlf(BODY), crlf(BODY_AFTER_MBOXO)]
        self.assertEqual([d for _, _, d in self.read_all(store)], want)
        # the same after a restart, and after another program rewrote the file
        self.assertEqual([d for _, _, d in self.read_all(self.new_store())], want)
        before = self.read_all(self.new_store())
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        box[box.keys()[0]] = box[box.keys()[0]]  # rewrites the file
        box.flush()
        box.unlock()
        box.close()
        after = self.read_all(self.new_store())
        self.assertEqual([(u, s) for u, s, _ in after], [(u, s) for u, s, _ in before])
        self.assertEqual([d for _, _, d in after][1:], want[1:])

    def test_procmail_message_found_by_a_cold_scan(self):
        procmail_deliver(self.root, self.inbox, BODY)
        (got,) = self.read_all(self.new_store())
        self.assertEqual(got[2], crlf(BODY_AFTER_MBOXO))
        self.assertIn(b"\r\n>From quoted once\r\n>>From quoted twice\r\n", got[2])

    def test_index_from_before_the_column_keeps_mboxrd(self):
        # written as before the header padding (an index that old has no hidden fields)
        for part in (mboxfmt.writer, mboxfmt.fields):  # the two that pad
            self.patch(part, "with_padding", lambda block, pad=None: block)
        store = self.new_store()
        self.successResultOf(store.deliver(USER, BytesSource(BODY), "bob@example.test"))
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        validity = f.uid_validity
        f.close()
        store.states.loaded.clear()  # let go of the index
        path = self.root / "index" / "example.test" / "alice" / "INBOX.sqlite"
        db = sqlite3.connect(path)
        db.execute("ALTER TABLE msgs DROP COLUMN rd")
        db.commit()
        db.close()
        store = self.new_store()
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        self.assertEqual(f.uid_validity, validity)
        with f.open_message(1) as fh:
            self.assertEqual(fh.read(), crlf(BODY))
        f.close()


@needs_procmail
def test_pop3_retr_of_procmail_and_smtp_mail(tmp_path):
    import smtplib

    alice = "alice@example.test"
    with MailServer(tmp_path) as srv:
        srv.add_user(alice)
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            s.sendmail("bob@example.test", [alice], BODY.replace(b"\n", b"\r\n"))
        procmail_deliver(tmp_path, srv.inbox(alice), BODY)
        p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
        try:
            p.user(alice)
            p.pass_(PASSWORD)
            sizes = [int(x.split()[1]) for x in p.list()[1]]
            got = []
            for i in (1, 2):
                _, lines, _ = p.retr(i)
                got.append(b"\r\n".join(lines) + b"\r\n")
        finally:
            p.quit()
    assert [len(g) for g in got] == sizes
    smtp_body = got[0].split(b"\r\n\r\n", 1)[1]
    assert smtp_body == crlf(BODY).split(b"\r\n\r\n", 1)[1]
    assert got[1] == crlf(BODY_AFTER_MBOXO)


def _same_inode_rewrite(path: Path, drop_subject: bytes) -> None:
    """What mutt's sync does: dotlock + fcntl, rewrite the same inode without one message."""
    import fcntl
    import time

    from mailsrv.store.locking import acquire_dotlock, release_dotlock

    lock = acquire_dotlock(path, time.monotonic() + 10)
    try:
        with open(path, "r+b") as fh:
            fcntl.lockf(fh, fcntl.LOCK_EX)
            data = fh.read()
            parts = data.split(b"\n\nFrom ")
            parts = [p if i == 0 else b"From " + p for i, p in enumerate(parts)]
            parts = [p if p.endswith(b"\n") else p + b"\n\n" for p in parts]
            kept = [p for p in parts if b"Subject: %s\n" % drop_subject not in p]
            fh.seek(0)
            fh.write(b"".join(kept))
            fh.truncate()
    finally:
        release_dotlock(lock)


def _msg(i: int, n: int) -> bytes:
    body = b"".join(b"message %d line %d\n" % (i, k) for k in range(n))
    return b"Subject: m%d\nMessage-ID: <%d@t>\n\n%s" % (i, i, body)


class OursAfterRewritesTests(SynchronousTestCase):
    """Which messages are ours survives another program rewriting the file in place."""

    def setUp(self):
        self.root = Path(self.mktemp())
        self.store = MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"

    def deliver(self, data: bytes) -> None:
        self.successResultOf(self.store.deliver(USER, BytesSource(data), "s@x"))

    def read_all(self) -> dict[bytes, bytes]:
        f = self.successResultOf(self.store.open_folder(USER, "INBOX"))
        out = {}
        for info in f.messages():
            with f.open_message(info.uid) as fh:
                data = fh.read()
            self.assertEqual(len(data), info.size)
            out[data.split(b"\r\n", 1)[0]] = data
        f.close()
        return out

    def test_no_mail_truncated_after_a_rewrite(self):
        self.deliver(_msg(1, 3))
        self.deliver(_msg(2, 3))
        _same_inode_rewrite(self.inbox, b"m2")  # the index no longer describes the file
        self.deliver(_msg(3, 400))  # so the delivery is not indexed at once
        _same_inode_rewrite(self.inbox, b"m1")  # the file shrinks under the old append's place
        self.deliver(_msg(4, 3))
        got = self.read_all()
        self.assertEqual(sorted(got), [b"Subject: m3", b"Subject: m4"])
        self.assertTrue(got[b"Subject: m3"] == crlf(_msg(3, 400)), "m3 was cut")

    def test_our_message_stays_mboxrd_after_a_rewrite(self):
        ours = b"Subject: m3\nMessage-ID: <3@t>\n\nhello\nFrom the start of a line\nbye\n"
        self.deliver(_msg(1, 400))
        self.deliver(_msg(2, 3))
        _same_inode_rewrite(self.inbox, b"m2")
        self.deliver(ours)  # not indexed at once
        _same_inode_rewrite(self.inbox, b"m1")  # m3 moves to where m1 was
        self.assertEqual(self.read_all(), {b"Subject: m3": crlf(ours)})
