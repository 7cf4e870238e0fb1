"""
Real IMAP clients against a real twistd: offlineimap (offlineimap3) syncs a
folder tree two ways (messages, flags, deletions, a new folder on either
side), and getmail6 retrieves new mail into an mbox and leaves or deletes
it on the server as configured. Both are Debian packages; CI installs them.
"""

from __future__ import annotations

import imaplib
import mailbox
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.trial import unittest

from tests.e2e import PASSWORD, MailServer

USER = "carol@example.test"

OFFLINEIMAPRC = """\
[general]
accounts = test
metadata = {base}/offlineimap-meta
ui = quiet

[Account test]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {base}/maildir
sep = /

[Repository remote]
type = IMAP
remotehost = 127.0.0.1
remoteport = {port}
remoteuser = {user}
remotepass = {password}
ssl = no
starttls = no
maxconnections = 2
"""

GETMAILRC = """\
[retriever]
type = SimpleIMAPRetriever
server = 127.0.0.1
port = {port}
username = {user}
password = {password}
mailboxes = ("INBOX",)

[destination]
type = Mboxrd
path = {mbox}
{deliver_as}

[options]
read_all = false
delete = {delete}
verbose = 0
"""


def message(subject: str) -> bytes:
    return (
        f"From: Ann <ann@example.test>\r\nTo: {USER}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.test>\r\n\r\nbody of {subject}\r\n"
    ).encode()


class _RealServer(unittest.TestCase):
    program = ""

    def setUp(self) -> None:
        if shutil.which(self.program) is None:
            raise unittest.SkipTest(f"{self.program} is not installed")
        self.base = Path(tempfile.mkdtemp(prefix=f"{self.program}-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        (self.base / "server").mkdir()
        self.server = MailServer(self.base / "server")
        self.server.start()
        self.addCleanup(self.server.stop)
        self.server.add_user(USER)

    def imap(self) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.server.ports["imap"])
        m.login(USER, PASSWORD)
        return m

    def run_client(self, *argv: str) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr + self.server.output())
        return r.stdout + r.stderr


class OfflineimapTest(_RealServer):
    program = "offlineimap"

    def sync(self) -> str:
        rc = self.base / "offlineimaprc"
        rc.write_text(
            OFFLINEIMAPRC.format(
                base=self.base, port=self.server.ports["imap"], user=USER, password=PASSWORD
            )
        )
        return self.run_client("offlineimap", "-c", str(rc), "-o", "-u", "quiet")

    def local_files(self, folder: str) -> dict[str, str]:
        """The local messages of C{folder}: file name -> its Maildir flags."""
        out = {}
        for sub in ("cur", "new"):
            d = self.base / "maildir" / folder / sub
            if d.exists():
                for name in os.listdir(d):
                    out[f"{sub}/{name}"] = name.rpartition(":2,")[2] if ":2," in name else ""
        return out

    def test_two_way_sync_of_a_folder_tree(self) -> None:
        m = self.imap()
        m.create("Lists/python")
        for i in range(3):
            m.append("INBOX", None, None, message(f"remote {i}"))
        m.append("Lists/python", "(\\Seen)", None, message("list mail"))
        m.logout()
        self.sync()
        self.assertEqual(len(self.local_files("INBOX")), 3)
        listed = self.local_files("Lists/python")
        self.assertEqual(list(listed.values()), ["S"])  # \Seen came down as S
        # Local changes: a message in a new folder, one message deleted, one
        # flagged; and a remote change: a new message.
        new = self.base / "maildir" / "Local"
        for sub in ("cur", "new", "tmp"):
            (new / sub).mkdir(parents=True)
        (new / "new" / "1.local").write_bytes(message("from local").replace(b"\r\n", b"\n"))
        inbox = self.base / "maildir" / "INBOX"
        names = sorted(self.local_files("INBOX"))
        (inbox / names[0]).unlink()
        flagged = inbox / names[1]
        base_name = flagged.name.partition(":2,")[0]
        flagged.rename(inbox / "cur" / f"{base_name}:2,F")
        m = self.imap()
        m.append("INBOX", None, None, message("remote late"))
        m.logout()
        self.sync()
        self.sync()  # a second run finds nothing to do and still succeeds
        m = self.imap()
        typ, data = m.select("Local")
        self.assertEqual((typ, data), ("OK", [b"1"]))
        typ, data = m.select("INBOX")
        self.assertEqual(data, [b"3"])  # 3 - 1 deleted + 1 late
        typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        flags = {
            part[1].decode().strip(): re.search(rb"FLAGS \(([^)]*)\)", part[0]).group(1)
            for part in data
            if isinstance(part, tuple)
        }
        self.assertEqual(
            flags,
            {
                "Subject: remote 1": b"\\Flagged",  # flagged on this side
                "Subject: remote 2": b"",
                "Subject: remote late": b"",
            },
        )
        m.logout()
        self.assertEqual(len(self.local_files("INBOX")), 3)  # the late one came down
        # What is on disk is an mbox other programs read.
        stored = mailbox.mbox(str(self.server.inbox(USER)), create=False)
        subjects = sorted(msg["Subject"] for msg in stored)
        self.assertEqual(subjects, ["remote 1", "remote 2", "remote late"])


class GetmailTest(_RealServer):
    program = "getmail"

    def retrieve(self, delete: bool) -> Path:
        mbox = self.base / "local.mbox"
        mbox.touch()
        user = ""
        if os.geteuid() == 0:
            # getmail refuses to write mail as root: it delivers as this user.
            user = "user = nobody"
            os.chmod(self.base, 0o777)
            os.chmod(mbox, 0o666)
        rcdir = self.base / "getmail"
        rcdir.mkdir(exist_ok=True)
        rc = rcdir / "getmailrc"
        rc.write_text(
            GETMAILRC.format(
                port=self.server.ports["imap"],
                user=USER,
                password=PASSWORD,
                mbox=mbox,
                delete=str(delete).lower(),
                deliver_as=user,
            )
        )
        self.run_client("getmail", "--getmaildir", str(rcdir), "--rcfile", "getmailrc")
        return mbox

    def subjects(self, path: Path) -> list[str]:
        return sorted(re.sub(r"\s+", " ", msg["Subject"]) for msg in mailbox.mbox(str(path)))

    def test_new_mail_is_retrieved_once_and_left_on_the_server(self) -> None:
        m = self.imap()
        for i in range(3):
            m.append("INBOX", None, None, message(f"mail {i}"))
        m.logout()
        mbox = self.retrieve(delete=False)
        self.assertEqual(self.subjects(mbox), ["mail 0", "mail 1", "mail 2"])
        m = self.imap()
        m.append("INBOX", None, None, message("mail 3"))
        m.logout()
        self.retrieve(delete=False)  # only the new one: getmail remembers UIDs
        self.assertEqual(self.subjects(mbox), ["mail 0", "mail 1", "mail 2", "mail 3"])
        m = self.imap()
        self.assertEqual(m.select("INBOX")[1], [b"4"])
        m.logout()

    def test_retrieved_mail_is_deleted_when_asked(self) -> None:
        m = self.imap()
        for i in range(2):
            m.append("INBOX", None, None, message(f"mail {i}"))
        m.logout()
        mbox = self.retrieve(delete=True)
        self.assertEqual(self.subjects(mbox), ["mail 0", "mail 1"])
        m = self.imap()
        self.assertEqual(m.select("INBOX")[1], [b"0"])
        m.logout()
        self.assertEqual(len(mailbox.mbox(str(self.server.inbox(USER)), create=False)), 0)
