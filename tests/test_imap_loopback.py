"""
End-to-end IMAP: Python's imaplib (in a thread) against the server on the
trial reactor over real loopback, on the mbox store; and, when installed,
mbsync against a real twistd.
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

from twisted.internet import defer, threads
from twisted.trial import unittest

from mailsrv.imap.server import IMAPServerFactory
from mailsrv.spool import BytesSource
from tests.imap_loopback_support import LoopbackIMAPCase
from tests.test_imap_harness import PASSWORD, USER

MESSAGE = (
    b"From: Ann <ann@example.test>\nTo: alice@example.test\nSubject: loopback %d\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\n\nFrom the start of a line\nbody %d\n"
)


class ImaplibLoopbackTest(LoopbackIMAPCase):
    """imaplib against the server on 127.0.0.1, mbox store on disk."""

    with_tls = True

    @defer.inlineCallbacks
    def _deliver(self, n: int) -> defer.Deferred:
        for i in range(n):
            yield self.store.deliver(USER, BytesSource(MESSAGE % (i, i)), "ann@example.test")

    @defer.inlineCallbacks
    def test_imaplib_session(self):
        yield self._deliver(3)
        port = self.port.getHost().port

        def client() -> dict:
            seen: dict = {}
            m = imaplib.IMAP4("127.0.0.1", port)
            try:
                m.login(USER, PASSWORD.decode())
                typ, data = m.select("INBOX")
                assert typ == "OK" and data == [b"3"], data
                typ, data = m.uid("FETCH", "1:*", "(FLAGS RFC822.SIZE ENVELOPE)")
                assert typ == "OK" and len([d for d in data if isinstance(d, bytes)]) == 3, data
                typ, data = m.uid("FETCH", "2", "(RFC822.SIZE BODY.PEEK[])")
                size = int(re.search(rb"RFC822.SIZE (\d+)", data[0][0]).group(1))
                body = data[0][1]
                assert len(body) == size, (len(body), size)
                assert body == (MESSAGE % (1, 1)).replace(b"\n", b"\r\n")
                typ, data = m.search(None, "SUBJECT", '"loopback 2"')
                assert data == [b"3"], data
                m.store("1", "+FLAGS", "(\\Seen \\Flagged)")
                typ, data = m.append("Sent", "(\\Seen)", None, b"Subject: sent\r\n\r\nhi\r\n")
                assert typ == "OK" and b"APPENDUID" in data[0], data
                typ, data = m.uid("COPY", "1:2", "Archive")
                assert typ == "OK", data
                typ, data = m.uid("MOVE", "3", "Trash")
                assert typ == "OK", data
                m.create("Projects/2024")
                typ, data = m.list()
                seen["list"] = data
                m.store("1", "+FLAGS", "(\\Deleted)")
                typ, data = m.expunge()
                seen["expunge"] = data
                typ, data = m.status("Archive", "(MESSAGES UIDNEXT)")
                seen["status"] = data
                m.close()
            finally:
                m.logout()
            return seen

        seen = yield threads.deferToThread(client)
        yield self.settle()
        names = b"\n".join(seen["list"])
        for name in (b"INBOX", b"Sent", b"Trash", b"Archive", b"Projects/2024"):
            self.assertIn(b'"/" ' + name, names)
        self.assertEqual(seen["expunge"], [b"3", b"1"])  # MOVE's EXPUNGE, then ours
        self.assertEqual(seen["status"], [b"Archive (MESSAGES 2 UIDNEXT 3)"])
        # What is on disk is valid mbox, readable by Python's mailbox module.
        base = self.config.mail_dir / "example.test" / "alice"
        inbox = mailbox.mbox(str(base / "INBOX"), create=False)
        self.assertEqual([m["Subject"] for m in inbox], ["loopback 1"])
        archive = mailbox.mbox(str(base / "Archive"), create=False)
        subjects = [m["Subject"] for m in archive]
        self.assertEqual(subjects, ["loopback 0", "loopback 1"])
        self.assertIn(b"From the start of a line", archive.get_bytes(0))
        trash = mailbox.mbox(str(base / "Trash"), create=False)
        self.assertEqual([m["Subject"] for m in trash], ["loopback 2"])

    @defer.inlineCallbacks
    def test_idle_sees_delivery_and_big_fetch_streams(self):
        big = b"Subject: big\n\n" + (b"x" * 75 + b"\n") * 40000  # ~3 MB
        yield self.store.deliver(USER, BytesSource(big), "ann@example.test")
        port = self.port.getHost().port
        delivered = defer.Deferred()

        def client() -> list:
            m = imaplib.IMAP4("127.0.0.1", port)
            try:
                m.login(USER, PASSWORD.decode())
                m.select("INBOX")
                typ, data = m.fetch("1", "(BODY.PEEK[] BODYSTRUCTURE)")
                assert len(data[0][1]) == len(big.replace(b"\n", b"\r\n")), len(data[0][1])
                assert (
                    b'("TEXT" "PLAIN" NIL NIL NIL "7BIT"' in data[1]
                    or b"40000" in data[0][0] + data[1]
                )
                tag = m._new_tag()
                m.send(tag + b" IDLE\r\n")
                assert m.readline().startswith(b"+")
                self.reactor.callFromThread(delivered.callback, None)
                line = m.readline()
                m.send(b"DONE\r\n")
                rest = m.readline()
                return [line, rest]
            finally:
                m.logout()

        d = threads.deferToThread(client)
        yield delivered
        yield self._deliver(1)
        line, rest = yield d
        yield self.settle()
        self.assertEqual(line, b"* 2 EXISTS\r\n")
        # Both are recent to the session: the first since its SELECT (RFC 3501 2.3.2).
        self.assertTrue(rest.startswith(b"* 2 RECENT") or b"OK IDLE" in rest, rest)

    @defer.inlineCallbacks
    def test_two_sessions_see_each_others_changes(self):
        yield self._deliver(3)
        port = self.port.getHost().port

        def client() -> list:
            a = imaplib.IMAP4("127.0.0.1", port)
            b = imaplib.IMAP4("127.0.0.1", port)
            try:
                for m in (a, b):
                    m.login(USER, PASSWORD.decode())
                    m.select("INBOX")
                a.store("2", "+FLAGS", "(\\Flagged)")
                a.store("3", "+FLAGS", "(\\Deleted)")
                a.expunge()
                a.append("INBOX", None, None, b"Subject: new\r\n\r\nx\r\n")
                b.noop()
                out = [b.response("FETCH"), b.response("EXPUNGE"), b.response("EXISTS")]
                out.append(b.fetch("1:*", "(FLAGS)")[1])
                return out
            finally:
                a.logout()
                b.logout()

        fetch, expunge, exists, flags = yield threads.deferToThread(client)
        yield self.settle()
        self.assertIn(b"2 (FLAGS (\\Flagged))", fetch[1])
        self.assertEqual(expunge[1], [b"3"])
        self.assertEqual(exists[1][-1], b"3")
        self.assertEqual(len(flags), 3)

    @defer.inlineCallbacks
    def test_starttls_and_implicit_tls(self):
        import ssl

        from twisted.protocols.tls import TLSMemoryBIOFactory

        implicit = IMAPServerFactory(
            config=self.config,
            store=self.store,
            portal=self.factory.portal,
            reactor=self.reactor,
            run=self.factory.run,
            tls=self.tls,
            implicit_tls=True,
        )
        build = implicit.buildProtocol

        def tracked(addr):
            p = build(addr)
            self.protocols.append(p)
            return p

        implicit.buildProtocol = tracked
        tls_port = self.reactor.listenTCP(
            0, TLSMemoryBIOFactory(self.tls, False, implicit), interface="127.0.0.1"
        )
        self.addCleanup(tls_port.stopListening)
        port = self.port.getHost().port
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

        def client() -> tuple:
            m = imaplib.IMAP4("127.0.0.1", port)
            before = m.capabilities
            m.starttls(ssl_context=ctx)
            after = m.capability()[1][0]
            m.login(USER, PASSWORD.decode())
            m.logout()
            s = imaplib.IMAP4_SSL("127.0.0.1", tls_port.getHost().port, ssl_context=ctx)
            caps = s.capabilities
            s.login(USER, PASSWORD.decode())
            s.logout()
            return before, after, caps

        before, after, caps = yield threads.deferToThread(client)
        yield self.settle()
        self.assertIn("STARTTLS", before)
        self.assertNotIn(b"STARTTLS", after)
        self.assertIn(b"AUTH=PLAIN", after)
        self.assertNotIn("STARTTLS", caps)


MBSYNCRC = """\
IMAPAccount test
Host 127.0.0.1
Port {port}
User {user}
Pass "{password}"
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account test

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
"""


class MbsyncTest(unittest.TestCase):
    """mbsync (isync) two-way sync of a folder tree against a real twistd."""

    def setUp(self) -> None:
        if shutil.which("mbsync") is None:
            raise unittest.SkipTest("mbsync is not installed")

    def test_two_way_sync(self):
        from tests.e2e import PASSWORD as E2E_PASSWORD
        from tests.e2e import MailServer

        base = Path(tempfile.mkdtemp(prefix="mbsync-"))
        self.addCleanup(shutil.rmtree, base, True)
        server = MailServer(base)
        server.start()
        self.addCleanup(server.stop)
        user = "carol@example.test"
        server.add_user(user)
        local = base / "maildir"
        local.mkdir()
        rc = base / "mbsyncrc"
        rc.write_text(
            MBSYNCRC.format(
                port=server.ports["imap"], user=user, password=E2E_PASSWORD, local=local
            )
        )
        m = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
        m.login(user, E2E_PASSWORD)
        m.create("Lists/python")
        for i in range(3):
            m.append("INBOX", None, None, b"Subject: remote %d\r\n\r\nbody\r\n" % i)
        m.append("Lists/python", "(\\Seen)", None, b"Subject: list mail\r\n\r\nbody\r\n")
        m.logout()

        def sync() -> str:
            r = subprocess.run(
                ["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120
            )
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr + server.output())
            return r.stdout

        sync()
        self.assertEqual(
            len(os.listdir(local / "INBOX" / "cur")) + len(os.listdir(local / "INBOX" / "new")), 3
        )
        self.assertTrue((local / "Lists" / "python").exists())
        self.assertTrue((local / "Sent").exists())
        # local changes: a new message in a new folder, one message deleted
        newdir = local / "Local"
        for sub in ("cur", "new", "tmp"):
            (newdir / sub).mkdir(parents=True)
        (newdir / "new" / "1.local").write_bytes(b"Subject: from local\n\nlocal body\n")
        victim = sorted(os.listdir(local / "INBOX" / "cur") + os.listdir(local / "INBOX" / "new"))[
            0
        ]
        for sub in ("cur", "new"):
            if (local / "INBOX" / sub / victim).exists():
                (local / "INBOX" / sub / victim).unlink()
        sync()
        sync()  # a second run finds nothing to do and must still succeed
        m = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
        m.login(user, E2E_PASSWORD)
        typ, data = m.select("Local")
        self.assertEqual(data, [b"1"])
        typ, data = m.select("INBOX")
        self.assertEqual(data, [b"2"])
        m.logout()
        inbox = mailbox.mbox(str(server.inbox(user)), create=False)
        self.assertEqual(len(inbox), 2)
