"""
Locking an mbox on a full disk, for real (a small tmpfs, so root only).

A dotlock needs an inode but no data block: Postfix, procmail and mutt make
empty ones. So on a disk whose blocks are full the store still takes the
dotlock, and another program's dotlock waits for it. Only when no inode is
left (nobody can make a dotlock) may a reader go on with the fcntl lock
alone; a writer gets the disk-full error.
"""

from __future__ import annotations

import errno
import imaplib
import os
import poplib
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from mailsrv.store.locking import LockTimeout, MboxLock
from tests.e2e import PASSWORD, MailServer
from tests.test_full_disk import ALICE, fill, tmpfs

MBOX = b"From a@b Mon Jan  1 00:00:00 2024\nSubject: x\n\nbody\n"


def _lockfile(mbox: Path) -> bool:
    """procmail's lockfile(1), one try: whether it got C{mbox}.lock (then let go)."""
    lock = mbox.with_name(mbox.name + ".lock")
    got = subprocess.run(["lockfile", "-r0", str(lock)], capture_output=True).returncode == 0
    if got:
        lock.unlink()
    return got


def _mutt_dotlock(mbox: Path) -> bool:
    """mutt_dotlock(1), one try: whether it got C{mbox}.lock (then let go)."""
    got = subprocess.run(["mutt_dotlock", "-r", "0", str(mbox)], capture_output=True)
    if got.returncode == 0:
        subprocess.run(["mutt_dotlock", "-u", str(mbox)], check=True)
    return got.returncode == 0


PEERS = {"lockfile": _lockfile, "mutt_dotlock": _mutt_dotlock}


def fill_inodes(folder: Path) -> list[Path]:
    """Create empty files in C{folder} until the file system has no inode left."""
    made = []
    while True:
        f = folder / f"inode.{len(made)}"
        try:
            f.touch(exist_ok=False)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            return made
        made.append(f)


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_dotlock_on_a_disk_with_no_free_block(tmp_path, peer):
    if shutil.which(peer) is None:
        pytest.skip(f"{peer} is not installed")
    with tmpfs(tmp_path / "disk", size="256k") as disk:
        inbox = disk / "INBOX"
        inbox.write_bytes(MBOX)
        fill(disk)
        with MboxLock(inbox, timeout=2) as lk:
            assert lk.fd >= 0
            assert (disk / "INBOX.lock").is_file()
            assert not PEERS[peer](inbox), "another program took the dotlock as well"
        assert not (disk / "INBOX.lock").exists()
        assert PEERS[peer](inbox)  # let go: the other program gets it now
        # ... and its empty dotlock keeps the store out until it lets go.
        (disk / "INBOX.lock").touch()
        with pytest.raises(LockTimeout):
            with MboxLock(inbox, timeout=0.3):
                pass


def test_no_inode_left_reader_goes_on_with_fcntl_writer_fails(tmp_path):
    with tmpfs(tmp_path / "disk", size="1m", inodes=64) as disk:
        inbox = disk / "INBOX"
        inbox.write_bytes(MBOX)
        spare = fill_inodes(disk)
        with pytest.raises(OSError) as e:
            with MboxLock(inbox, timeout=2):
                pass
        assert e.value.errno == errno.ENOSPC
        with MboxLock(inbox, timeout=2, reader=True) as lk:
            assert os.read(lk.fd, 100) == MBOX[:100]
            assert not (disk / "INBOX.lock").exists()
        # Someone made a dotlock with the last inode: a reader waits for it too.
        spare.pop().unlink()
        (disk / "INBOX.lock").touch()
        with pytest.raises(LockTimeout):
            with MboxLock(inbox, timeout=0.3, reader=True):
                pass
        assert os.listdir(disk).count("INBOX.lock") == 1  # nothing else left behind


def test_no_inode_left_mail_is_read_and_writes_are_refused(tmp_path):
    """
    The daemon with no inode left on its data disk: mail another program
    appended is seen by IMAP SELECT/FETCH and POP3; IMAP APPEND is NO
    [OVERQUOTA] and SMTP DATA 452 4.3.1, sessions going on.
    """
    with tmpfs(tmp_path / "data", size="8m", inodes=400):
        srv = MailServer(tmp_path)
        srv.add_user(ALICE)
        srv.start()
        try:
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
                s.sendmail("bob@remote.test", [ALICE], b"Subject: m0\r\n\r\nbody 0\r\n")
            for _ in range(2):  # the first logins write their files
                m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
                m.login(ALICE, PASSWORD)
                m.select("INBOX")
                m.logout()
                p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
                p.user(ALICE)
                p.pass_(PASSWORD)
                p.quit()
            fill_inodes(srv.data)
            with open(srv.inbox(ALICE), "ab") as f:  # as procmail appends: no new inode
                f.write(b"\nFrom c@d Mon Jan  1 00:00:00 2024\nSubject: m1\n\nbody 1\n")

            m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
            m.login(ALICE, PASSWORD)
            typ, data = m.select("INBOX")
            assert (typ, data) == ("OK", [b"2"]), srv.output()
            typ, data = m.fetch("2", "(BODY.PEEK[])")
            assert typ == "OK" and b"body 1" in data[0][1]
            typ, data = m.append("INBOX", None, None, b"Subject: small\r\n\r\nhi\r\n")
            assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]"), (typ, data)
            assert m.noop()[0] == "OK"
            m.logout()
            p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
            p.user(ALICE)
            assert p.pass_(PASSWORD).startswith(b"+OK"), srv.output()
            assert p.stat()[0] == 2
            p.quit()
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
                with pytest.raises(smtplib.SMTPDataError) as e:
                    s.sendmail("bob@remote.test", [ALICE], b"Subject: m2\r\n\r\nhi\r\n")
                assert (e.value.smtp_code, e.value.smtp_error[:5]) == (452, b"4.3.1")
                assert s.noop()[0] == 250
            assert "Unhandled Error" not in srv.output()
        finally:
            srv.stop()
