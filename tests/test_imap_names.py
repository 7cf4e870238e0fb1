"""
Mailbox names over a real loopback IMAP session, checked against what is on
disk: names that hold names (RFC 3501 6.3.3-6.3.5, shown as Dovecot's mbox
shows them), and names in modified UTF-7 (RFC 3501 5.1.3), where an invalid
or odd name is a NO (or no match for LIST), never a BAD, and never a file
outside the user's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer

from mailsrv.store.names import user_dir
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER
from tests.test_store_flags import MUTT, SCRIPT, mutt

MESSAGE = b"From: a@example.org\r\nSubject: kept\r\n\r\nbody\r\n"


def _tagged(lines: list[bytes]) -> bytes:
    return lines[-1].rstrip(b"\r\n")


class NamesCase(LoopbackIMAPCase):
    def session(self, commands: list[bytes]) -> list[list[bytes]]:
        """Log in and run C{commands}; each one's response lines, CRLF removed."""
        c = RawClient(self.port_number)
        try:
            c.login()
            return [
                [x.rstrip(b"\r\n") for x in c.cmd(b"T%d" % i, cmd)]
                for i, cmd in enumerate(commands)
            ]
        finally:
            c.close()

    def answers(self, commands: list[bytes]) -> defer.Deferred:
        """The tagged answer of each command (without its tag)."""
        d = self.in_thread(self.session, commands)
        return d.addCallback(lambda out: [r[-1].split(b" ", 1)[1] for r in out])

    @property
    def home(self) -> Path:
        return user_dir(self.config.mail_dir, USER)

    def on_disk(self) -> dict[str, str]:
        """The user's folder tree: relative path -> "dir" or "file"."""
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.home):
            rel = Path(dirpath).relative_to(self.home)
            for d in dirnames:
                out[str(rel / d)] = "dir"
            for f in filenames:
                out[str(rel / f)] = "file"
        return out


class HierarchyTests(NamesCase):
    @defer.inlineCallbacks
    def test_a_trailing_delimiter_makes_a_name_that_holds_names(self):
        out = yield self.in_thread(
            self.session,
            [
                b"CREATE a/",
                b"CREATE a/b",
                b'LIST "" "a*"',
                b'LIST "" "%"',
                b"SELECT a",
                b"CREATE a/",
                b"CREATE a",
                b"SUBSCRIBE a/b",
                b'LSUB "" "a*"',
                b'LSUB "" "%"',
                b"STATUS a (MESSAGES)",
                b"APPEND a {1+}\r\nx",
            ],
        )
        self.assertEqual(out[0], [b"T0 OK CREATE completed"])
        self.assertEqual(out[1], [b"T1 OK CREATE completed"])
        # As Dovecot's mbox: a directory holds names, an mbox file holds mail.
        self.assertEqual(
            out[2],
            [
                b'* LIST (\\Noselect \\HasChildren) "/" a',
                b'* LIST (\\NoInferiors) "/" a/b',
                b"T2 OK LIST completed",
            ],
        )
        self.assertIn(b'* LIST (\\Noselect \\HasChildren) "/" a', out[3])
        # As Dovecot: the name exists, and holds no mail.
        self.assertEqual(out[4], [b"T4 NO Mailbox isn't selectable"])
        self.assertEqual(out[10], [b"T10 NO Mailbox isn't selectable"])
        self.assertEqual(out[11], [b"T11 NO Mailbox isn't selectable"])
        self.assertEqual(out[5], [b"T5 NO Folder already exists"])
        self.assertEqual(out[6], [b"T6 NO Folder already exists"])
        self.assertEqual(out[8], [b'* LSUB () "/" a/b', b"T8 OK LSUB completed"])
        # RFC 3501 6.3.9: a "%" shows the unsubscribed superior as \Noselect.
        self.assertIn(b'* LSUB (\\Noselect) "/" a', out[9])
        self.assertNotIn(b'* LSUB () "/" a/b', out[9])
        self.assertEqual(self.on_disk()["a"], "dir")
        self.assertEqual(self.on_disk()["a/b"], "file")

    @defer.inlineCallbacks
    def test_copy_or_move_into_a_name_that_holds_names_is_not_trycreate(self):
        # [TRYCREATE] would send a client to CREATE a name that already exists.
        answers = yield self.answers(
            [
                b"CREATE d/",
                b"APPEND INBOX {1+}\r\nx",
                b"SELECT INBOX",
                b"COPY 1 d",
                b"MOVE 1 d",
                b"UID COPY 1 d",
                b"COPY 1 nowhere",
            ]
        )
        self.assertEqual(answers[3:6], [b"NO Mailbox isn't selectable"] * 3)
        self.assertEqual(answers[6], b"NO [TRYCREATE] Mailbox doesn't exist")

    @defer.inlineCallbacks
    def test_create_makes_the_names_above_and_delete_keeps_them(self):
        answers = yield self.answers(
            [
                b"CREATE x/y/z",
                b"DELETE x",
                b"DELETE x/y",
                b"DELETE x/y/z",
                b"DELETE x/y",
                b"CREATE e/",
                b"DELETE e",
            ]
        )
        self.assertEqual(
            answers,
            [
                b"OK CREATE completed",
                # RFC 3501 6.3.4: a \Noselect name with inferiors is not deleted.
                b"NO Mailbox has children, delete them first",
                b"NO Mailbox has children, delete them first",
                b"OK DELETE completed",
                b"OK DELETE completed",
                b"OK CREATE completed",
                b"OK DELETE completed",
            ],
        )
        out = yield self.in_thread(self.session, [b'LIST "" "x*"'])
        self.assertEqual(
            out[0], [b'* LIST (\\Noselect \\HasNoChildren) "/" x', b"T0 OK LIST completed"]
        )
        disk = self.on_disk()
        self.assertEqual(disk.get("x"), "dir")
        self.assertNotIn("x/y", disk)
        self.assertNotIn("e", disk)

    @defer.inlineCallbacks
    def test_rename_moves_the_names_below_with_their_mail(self):
        def go() -> list[bytes]:
            c = RawClient(self.port_number)
            try:
                c.login()
                out = [_tagged(c.cmd(b"C", b"CREATE a/b/c"))]
                c.send(b"A APPEND a/b/c {%d+}\r\n" % len(MESSAGE) + MESSAGE + b"\r\n")
                out.append(_tagged(c.read_until(b"A")).split(b"]")[-1])
                out.append(_tagged(c.cmd(b"S", b"SUBSCRIBE a/b/c")))
                out.append(_tagged(c.cmd(b"R", b"RENAME a z")))
                out += [x.rstrip(b"\r\n") for x in c.cmd(b"L", b'LIST "" "*"')]
                out += [x.rstrip(b"\r\n") for x in c.cmd(b"U", b'LSUB "" "z/*"')]
                c.cmd(b"E", b"EXAMINE z/b/c")
                out += [
                    x.rstrip(b"\r\n") for x in c.cmd(b"F", b"FETCH 1 BODY[HEADER.FIELDS (SUBJECT)]")
                ]
                return out
            finally:
                c.close()

        out = yield self.in_thread(go)
        self.assertEqual(
            [x for x in out if b"INBOX" not in x and b"\\Drafts" not in x][:3],
            [b"C OK CREATE completed", b" APPEND completed", b"S OK SUBSCRIBE completed"],
        )
        self.assertIn(b"R OK RENAME completed", out)
        self.assertIn(b'* LIST (\\Noselect \\HasChildren) "/" z', out)
        self.assertIn(b'* LIST (\\Noselect \\HasChildren) "/" z/b', out)
        self.assertIn(b'* LIST (\\NoInferiors) "/" z/b/c', out)
        self.assertFalse([x for x in out if x.startswith(b"* LIST") and x.endswith(b'" a')])
        self.assertIn(b'* LSUB () "/" z/b/c', out)
        self.assertIn(b"Subject: kept", b"\n".join(out))
        disk = self.on_disk()
        self.assertEqual((disk["z"], disk["z/b"], disk["z/b/c"]), ("dir", "dir", "file"))
        self.assertNotIn("a", disk)
        self.assertIn(b"Subject: kept", (self.home / "z" / "b" / "c").read_bytes())

    @defer.inlineCallbacks
    def test_mutt_reads_a_folder_below_a_name_that_holds_names(self):
        if MUTT is None or SCRIPT is None:
            self.skipTest("mutt (and script, for its terminal) not installed")

        def append() -> bytes:
            c = RawClient(self.port_number)
            try:
                c.login()
                c.cmd(b"C", b"CREATE Lists/")
                c.cmd(b"C", b"CREATE Lists/dev")
                c.send(b"A APPEND Lists/dev {%d+}\r\n" % len(MESSAGE) + MESSAGE + b"\r\n")
                return _tagged(c.read_until(b"A"))
            finally:
                c.close()

        answer = yield self.in_thread(append)
        self.assertTrue(answer.endswith(b"APPEND completed"), answer)
        # mutt flags the message and writes the file back; IMAP sees the flag.
        yield self.in_thread(
            mutt, self.tmp, self.home / "Lists" / "dev", "<flag-message><sync-mailbox><quit>"
        )
        out = yield self.in_thread(
            self.session,
            [b"EXAMINE Lists/dev", b"FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"],
        )
        fetched = b"\n".join(out[1])
        self.assertIn(b"\\Flagged", fetched)
        self.assertIn(b"Subject: kept", fetched)


class ModifiedUTF7Tests(NamesCase):
    @defer.inlineCallbacks
    def test_names_that_are_not_modified_utf7_get_no_never_bad(self):
        invalid = [b"&", b'"a&b"', b'"&Jjo"', b'"&Jjo!"', b'"&AGE-"', b'"&2D0-"']
        commands = []
        for name in invalid:
            commands += [
                b'LIST "" ' + name,
                b"SELECT " + name,
                b"CREATE " + name,
                b"STATUS " + name + b" (MESSAGES)",
                b"EXAMINE " + name,
            ]
        out = yield self.in_thread(self.session, commands)
        for i, lines in enumerate(out):
            tagged = lines[-1]
            if i % 5 == 0:
                # LIST: no mailbox has such a name.
                self.assertEqual(lines, [b"T%d OK LIST completed" % i])
            else:
                self.assertTrue(
                    tagged.startswith(b"T%d NO " % i) and b"modified UTF-7" in tagged, tagged
                )
        self.assertEqual(
            self.on_disk(), {n: "file" for n in ("Archive", "Drafts", "Junk", "Sent", "Trash")}
        )

    @defer.inlineCallbacks
    def test_valid_names_round_trip(self):
        out = yield self.in_thread(
            self.session,
            [
                b'CREATE "&AOk-t&AOk-"',
                b"CREATE &-",
                b"CREATE a&-b",
                b"CREATE &2D3cAA-",
                b'LIST "" "&AOk-*"',
                b'LIST "" "*&-*"',
                b"STATUS &AOk-t&AOk- (MESSAGES)",
                b"SELECT &-",
            ],
        )
        self.assertEqual(
            [r[-1] for r in out[:4]], [b"T%d OK CREATE completed" % i for i in range(4)]
        )
        self.assertEqual(
            out[4], [b'* LIST (\\NoInferiors) "/" &AOk-t&AOk-', b"T4 OK LIST completed"]
        )
        self.assertEqual(
            sorted(out[5][:-1]),
            [b'* LIST (\\NoInferiors) "/" &-', b'* LIST (\\NoInferiors) "/" a&-b'],
        )
        self.assertEqual(out[6][0], b"* STATUS &AOk-t&AOk- (MESSAGES 0)")
        self.assertTrue(out[7][-1].startswith(b"T7 OK [READ-WRITE]"), out[7])
        disk = self.on_disk()
        for name in ("été", "&", "a&b", "\U0001f400"):
            self.assertEqual(disk.get(name), "file", name)

    @defer.inlineCallbacks
    def test_odd_names_are_refused_with_a_clear_no(self):
        long_name = b"x" * 600
        commands = [
            b'CREATE "a%b"',
            b'CREATE "a*b"',
            b"CREATE ..",
            b'CREATE "a/../../b"',
            b'CREATE "/etc/x"',
            b'CREATE ".hidden"',
            b'CREATE "a//b"',
            b"CREATE " + long_name,
            b'CREATE "&AAo-x"',  # a line feed, encoded
            b'CREATE "caf\xc3\xa9"',  # 8-bit (UTF-8)
            b'CREATE "a\\\\b"',
            b"CREATE x",
            b'RENAME x "y%"',
        ]
        out = yield self.in_thread(self.session, commands)
        tagged = [r[-1] for r in out]
        self.assertEqual(tagged[11], b"T11 OK CREATE completed")
        refused = tagged[:11] + tagged[12:]
        for line in refused:
            self.assertRegex(line, rb"^T\d+ NO .{10,}")
        self.assertIn(b"wildcards", tagged[0])
        self.assertIn(b"wildcards", tagged[12])
        self.assertIn(b"modified UTF-7", tagged[9])
        # Nothing is made anywhere else on disk: under the mail directory there
        # is only the user's folder, holding the special folders and x.
        mail_files = {
            str(Path(d).relative_to(self.config.mail_dir) / f)
            for d, _, files in os.walk(self.config.mail_dir)
            for f in files
        }
        self.assertEqual(
            mail_files,
            {
                str(self.home.relative_to(self.config.mail_dir) / n)
                for n in ("Archive", "Drafts", "Junk", "Sent", "Trash", "x")
            },
        )
