"""
Folder operations the file system refuses (a mailbox file where a directory
is needed, a folder moved into itself) answer NO with a plain text over IMAP:
no OS error text reaches the client, and the server logs the cause.
"""

from __future__ import annotations

from twisted.internet import defer

from tests.imap_loopback_support import LoopbackIMAPCase, RawClient

OS_TEXTS = (b"Errno", b"directory", b"Invalid argument", b"File exists", b"Permission")


class FolderOSErrorTest(LoopbackIMAPCase):
    def session(self, commands: list[bytes]) -> list[list[bytes]]:
        c = RawClient(self.port_number)
        try:
            c.login()
            return [c.cmd(b"T%d" % i, cmd) for i, cmd in enumerate(commands)]
        finally:
            c.cmd(b"Z", b"LOGOUT")
            c.close()

    def assert_plain_no(self, answer: list[bytes], text: bytes) -> None:
        last = answer[-1]
        self.assertRegex(last, rb"^T\d+ NO ", answer)
        self.assertIn(text, last)
        for t in OS_TEXTS:
            self.assertNotIn(t, last)

    @defer.inlineCallbacks
    def test_rename_below_a_mailbox_file(self):
        out = yield self.in_thread(
            self.session,
            [b"CREATE a", b"CREATE b", b"RENAME b a/c", b"RENAME INBOX a/c", b'LIST "" *'],
        )
        self.assertTrue(out[0][-1].startswith(b"T0 OK"), out)
        self.assertTrue(out[1][-1].startswith(b"T1 OK"), out)
        self.assert_plain_no(out[2], b"A mailbox cannot have sub-folders here")
        self.assert_plain_no(out[3], b"A mailbox cannot have sub-folders here")
        self.assertEqual(self.failures, [])

    @defer.inlineCallbacks
    def test_open_below_a_mailbox_file(self):
        out = yield self.in_thread(
            self.session,
            [b"CREATE a", b"SELECT a/c", b"STATUS a/c (MESSAGES)", b"EXAMINE a/c"],
        )
        for answer in out[1:]:
            self.assert_plain_no(answer, b"[NONEXISTENT]")
        self.assertEqual(self.failures, [])

    @defer.inlineCallbacks
    def test_below_a_dangling_symlink(self):
        """An administrator's symlink that leads nowhere, where a folder level would be."""
        yield self.in_thread(self.session, [b"CREATE b"])
        (self.config.mail_dir / "example.test" / "alice" / "l").symlink_to("nowhere")
        out = yield self.in_thread(
            self.session, [b"CREATE l/c", b"RENAME b l/c", b"SELECT l/c", b"SELECT b"]
        )
        self.assert_plain_no(out[0], b"Cannot create the folder")
        self.assert_plain_no(out[1], b"Cannot rename the folder")
        self.assert_plain_no(out[2], b"[NONEXISTENT]")
        self.assertTrue(out[3][-1].startswith(b"T3 OK"), out)
        self.assertEqual(self.failures, [])
