"""
LIST-EXTENDED (RFC 5258, with RFC 6154's SPECIAL-USE selection) and
LIST-STATUS (RFC 5819) over a real loopback IMAP session: selection and
return options, several patterns, \\Subscribed, \\NonExistent, CHILDINFO,
the STATUS after each selectable name read from the folders' index (not
their mail), the errors RFC 5258 asks for; and the answers compared with a
private Dovecot's, where one can run here.
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.mail import imap4
from twisted.trial import unittest

from mailsrv.imap import listext
from mailsrv.imap.listmatch import ListPattern
from mailsrv.store import mboxfmt
from mailsrv.store.names import folder_path
from tests import dovecot_peer
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER

MESSAGE = b"From a@example.org Thu Jan  1 00:00:00 2026\nSubject: x\n\nbody\n\n"

# A folder tree with subscriptions: names that exist and names that do not.
TREE = [
    b"CREATE Fruit/",
    b"CREATE Fruit/Apple",
    b"CREATE Fruit/Kiwi/",
    b"CREATE Fruit/Kiwi/Gold",
    b"CREATE Tofu",
    b"CREATE Gone",
    b"CREATE A/B/C",
    b"SUBSCRIBE Fruit/Kiwi/Gold",
    b"SUBSCRIBE Tofu",
    b"SUBSCRIBE Gone",
    b"SUBSCRIBE A/B/C",
    b"DELETE Gone",
    b"DELETE A/B/C",
    b"DELETE A/B",
    b"DELETE A",
]


def _session(port: int, login: bytes, commands: list[bytes]) -> list[list[bytes]]:
    """Each command's response lines (CRLF removed), from one fresh session."""
    c = RawClient(port)
    try:
        out = c.cmd(b"L", login)
        assert out[-1].startswith(b"L OK"), out
        return [
            [x.rstrip(b"\r\n") for x in c.cmd(b"T%d" % i, cmd)] for i, cmd in enumerate(commands)
        ]
    finally:
        c.close()


class ParserTests(unittest.TestCase):
    """The option lists of RFC 5258 6, read without a session."""

    def test_selection_options(self):
        self.assertEqual(listext.parse_selection(b'"" "*"'), (None, b'"" "*"'))
        self.assertEqual(listext.parse_selection(b'() "" "*"'), (frozenset(), b'"" "*"'))
        self.assertEqual(
            listext.parse_selection(b'(subscribed RecursiveMatch) "" "*"'),
            (frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}), b'"" "*"'),
        )
        for bad in (
            b"(RECURSIVEMATCH) x",
            b"(REMOTE RECURSIVEMATCH) x",
            b"(FOO) x",
            b"((A)) x",
            b"(A",
        ):
            self.assertRaises(imap4.IllegalClientResponse, listext.parse_selection, bad)

    def test_return_options(self):
        self.assertIsNone(listext.parse_return(b""))
        self.assertEqual(listext.parse_return(b" RETURN ()"), (frozenset(), ()))
        self.assertEqual(
            listext.parse_return(b" return (children STATUS (UNSEEN MESSAGES unseen) subscribed)"),
            (frozenset({"CHILDREN", "STATUS", "SUBSCRIBED"}), ("MESSAGES", "UNSEEN")),
        )
        # A second STATUS replaces the first, as in Dovecot.
        self.assertEqual(
            listext.parse_return(b"RETURN (STATUS (MESSAGES) STATUS (RECENT))")[1], ("RECENT",)
        )
        for bad in (
            b"RETURN",
            b"RETURN (FOO)",
            b"RETURN (STATUS ())",
            b"RETURN (STATUS (X-UNKNOWN))",
            b"RETURN (STATUS MESSAGES)",
            b"RETURN (CHILDREN",
            b"RETURN () x",
            b"FOO",
        ):
            self.assertRaises(imap4.IllegalClientResponse, listext.parse_return, bad)

    def test_childinfo_for_a_deep_subscription(self):
        request = listext.ListRequest(
            ref=b"",
            patterns=(b"%",),
            extended=True,
            selection=frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}),
        )
        folders = [("INBOX", True), ("a", False), ("a/b", False), ("a/b/c", True), ("d", True)]
        entries = listext.select_entries(
            request, [ListPattern("%")], folders, {"a/b/c", "d", "x/y"}, {}, nested=False
        )
        self.assertEqual(
            [(e.name, e.flags, e.childinfo) for e in entries],
            [
                ("a", ("\\Noselect",), ("SUBSCRIBED",)),
                ("d", ("\\Subscribed", "\\NoInferiors"), ()),
                ("x", ("\\NonExistent",), ("SUBSCRIBED",)),
            ],
        )
        self.assertEqual(listext.childinfo_data(entries[0]), b' (CHILDINFO ("SUBSCRIBED"))')
        self.assertFalse(entries[2].selectable)


class ListExtendedCase(LoopbackIMAPCase):
    login = b'LOGIN %s "secret"' % USER.encode()

    def session(self, commands: list[bytes]) -> defer.Deferred:
        return self.in_thread(_session, self.port_number, self.login, commands)

    @defer.inlineCallbacks
    def answer(self, command: bytes, setup: list[bytes] = TREE) -> defer.Deferred:
        """The response to C{command} after C{setup}; the tag of its last line is T."""
        out = yield self.session([*setup, command])
        for cmd, lines in zip(setup, out, strict=False):
            self.assertIn(b" OK ", lines[-1], cmd)
        return [line.replace(b"T%d " % len(setup), b"T ", 1) for line in out[-1]]


class SelectionTests(ListExtendedCase):
    @defer.inlineCallbacks
    def test_subscribed_lists_subscriptions_existing_or_not(self):
        out = yield self.answer(b'LIST (SUBSCRIBED) "" "*" RETURN (CHILDREN)')
        self.assertEqual(
            out,
            [
                b'* LIST (\\Subscribed \\NonExistent \\HasNoChildren) "/" A/B/C',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Archive',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Drafts',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Fruit/Kiwi/Gold',
                b'* LIST (\\Subscribed \\NonExistent \\HasNoChildren) "/" Gone',
                b'* LIST (\\Subscribed \\NoInferiors) "/" INBOX',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Junk',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Sent',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Tofu',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Trash',
                b"T OK LIST completed",
            ],
        )

    @defer.inlineCallbacks
    def test_recursivematch_gives_childinfo(self):
        out = yield self.answer(b'LIST (SUBSCRIBED RECURSIVEMATCH) "" ("%" "Fruit/%")')
        self.assertEqual(
            [x for x in out if b"CHILDINFO" in x or b"Fruit" in x or b"A" in x.split()[-1:]],
            [
                b'* LIST (\\NonExistent) "/" A (CHILDINFO ("SUBSCRIBED"))',
                b'* LIST (\\Noselect) "/" Fruit (CHILDINFO ("SUBSCRIBED"))',
                b'* LIST (\\Noselect) "/" Fruit/Kiwi (CHILDINFO ("SUBSCRIBED"))',
            ],
        )
        self.assertIn(b'* LIST (\\Subscribed \\NonExistent) "/" Gone', out)
        self.assertIn(b'* LIST (\\Subscribed \\NoInferiors) "/" INBOX', out)
        self.assertNotIn(b"Fruit/Apple", b"".join(out))  # not subscribed, no descendants

    @defer.inlineCallbacks
    def test_recursivematch_lists_no_parent_whose_descendants_are_listed(self):
        out = yield self.answer(b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "Fruit*"')
        self.assertEqual(
            out,
            [b'* LIST (\\Subscribed \\NoInferiors) "/" Fruit/Kiwi/Gold', b"T OK LIST completed"],
        )

    @defer.inlineCallbacks
    def test_special_use_selection(self):
        out = yield self.answer(b'LIST (SPECIAL-USE) "" "*"', [])
        self.assertEqual(
            out,
            [
                b'* LIST (\\NoInferiors \\Archive) "/" Archive',
                b'* LIST (\\NoInferiors \\Drafts) "/" Drafts',
                b'* LIST (\\NoInferiors \\Junk) "/" Junk',
                b'* LIST (\\NoInferiors \\Sent) "/" Sent',
                b'* LIST (\\NoInferiors \\Trash) "/" Trash',
                b"T OK LIST completed",
            ],
        )

    @defer.inlineCallbacks
    def test_remote_changes_nothing(self):
        out = yield self.session([*TREE, b'LIST (REMOTE) "" "%"', b'LIST () "" "%" RETURN ()'])
        self.assertEqual(out[-2][:-1], out[-1][:-1])
        self.assertIn(b'* LIST (\\Noselect) "/" Fruit', out[-1])


class ReturnTests(ListExtendedCase):
    @defer.inlineCallbacks
    def test_return_subscribed_and_children(self):
        out = yield self.answer(b'LIST "" ("Fruit*" "Tofu" "INBOX") RETURN (SUBSCRIBED CHILDREN)')
        self.assertEqual(
            out,
            [
                b'* LIST (\\Noselect \\HasChildren) "/" Fruit',
                b'* LIST (\\NoInferiors) "/" Fruit/Apple',
                b'* LIST (\\Noselect \\HasChildren) "/" Fruit/Kiwi',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Fruit/Kiwi/Gold',
                b'* LIST (\\Subscribed \\NoInferiors) "/" INBOX',
                b'* LIST (\\Subscribed \\NoInferiors) "/" Tofu',
                b"T OK LIST completed",
            ],
        )

    @defer.inlineCallbacks
    def test_extended_form_shows_children_and_special_use_only_when_asked(self):
        out = yield self.session(
            [
                b'LIST "" ("INBOX" "Sent")',
                b'LIST "" ("INBOX" "Sent") RETURN (SPECIAL-USE CHILDREN)',
                b'LIST "" "%" RETURN (SUBSCRIBED)',
            ]
        )
        self.assertEqual(
            out[0],
            [
                b'* LIST (\\NoInferiors) "/" INBOX',
                b'* LIST (\\NoInferiors) "/" Sent',
                b"T0 OK LIST completed",
            ],
        )
        self.assertEqual(
            out[1],
            [
                b'* LIST (\\NoInferiors) "/" INBOX',
                b'* LIST (\\NoInferiors \\Sent) "/" Sent',
                b"T1 OK LIST completed",
            ],
        )
        self.assertIn(b'* LIST (\\Subscribed \\NoInferiors) "/" Sent', out[2])

    @defer.inlineCallbacks
    def test_patterns_as_literals(self):
        c = yield self.in_thread(RawClient, self.port_number)
        self.addCleanup(c.close)

        def run():
            c.cmd(b"L", self.login)
            c.cmd(b"C", b"CREATE Tofu")
            c.send(b'T1 LIST "" ("INBOX" {4+}\r\nTof* "Nope")\r\n')
            one = c.read_until(b"T1")
            c.send(b'T2 LIST "" ({4}\r\n')
            cont = c.file.readline()
            c.send(b"Tof*) RETURN (CHILDREN)\r\n")
            return one, cont, c.read_until(b"T2")

        one, cont, two = yield self.in_thread(run)
        self.assertEqual(
            one,
            [
                b'* LIST (\\NoInferiors) "/" INBOX\r\n',
                b'* LIST (\\NoInferiors) "/" Tofu\r\n',
                b"T1 OK LIST completed\r\n",
            ],
        )
        self.assertTrue(cont.startswith(b"+ "), cont)
        self.assertEqual(two, [b'* LIST (\\NoInferiors) "/" Tofu\r\n', b"T2 OK LIST completed\r\n"])

    @defer.inlineCallbacks
    def test_plain_list_and_lsub_unchanged(self):
        out = yield self.session([*TREE, b'LIST "" "Fruit*"', b'LSUB "" "*"', b'LIST "" ""'])
        self.assertEqual(
            out[-3],
            [
                b'* LIST (\\Noselect \\HasChildren) "/" Fruit',
                b'* LIST (\\NoInferiors) "/" Fruit/Apple',
                b'* LIST (\\Noselect \\HasChildren) "/" Fruit/Kiwi',
                b'* LIST (\\NoInferiors) "/" Fruit/Kiwi/Gold',
                b"T%d OK LIST completed" % len(TREE),
            ],
        )
        self.assertIn(b'* LSUB () "/" Gone', out[-2])
        self.assertEqual(out[-1][0], b'* LIST (\\Noselect) "/" ""')

    @defer.inlineCallbacks
    def test_bad_requests(self):
        commands = [
            b'LIST (RECURSIVEMATCH) "" "%"',
            b'LIST (REMOTE RECURSIVEMATCH) "" "%"',
            b'LIST (FOO) "" "%"',
            b'LIST ((SUBSCRIBED)) "" "%"',
            b'LIST (SUBSCRIBED "" "%"',
            b'LIST "" "%" RETURN (FOO)',
            b'LIST "" "%" RETURN (STATUS ())',
            b'LIST "" "%" RETURN (STATUS (FOO))',
            b'LIST "" "%" RETURN (STATUS MESSAGES)',
            b'LIST "" "%" RETURN (CHILDREN',
            b'LIST "" "%" RETURN',
            b'LIST "" "%" FOO',
            b'LIST "" ("%" "Fruit/%"',
        ]
        for first in range(0, len(commands), 3):  # a session that errs on is dropped
            some = commands[first : first + 3]
            out = yield self.session([*some, b'LIST "" INBOX'])
            for i, (cmd, lines) in enumerate(zip(some, out, strict=False)):
                self.assertEqual(len(lines), 1, cmd)
                self.assertTrue(lines[0].startswith(b"T%d BAD " % i), (cmd, lines))
            self.assertEqual(out[-1][-1], b"T%d OK LIST completed" % len(some))

    @defer.inlineCallbacks
    def test_capabilities(self):
        out = yield self.session([b"CAPABILITY"])
        caps = out[0][0].split()
        self.assertIn(b"LIST-EXTENDED", caps)
        self.assertIn(b"LIST-STATUS", caps)


class ListStatusTests(ListExtendedCase):
    def put(self, name: str, count: int) -> None:
        """Mail delivered by another program: C{count} messages appended to the file."""
        path = folder_path(self.config.mail_dir, USER, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(MESSAGE * count)

    @defer.inlineCallbacks
    def test_status_after_each_selectable_name(self):
        yield self.session([b"CREATE Tofu"])
        self.put("INBOX", 2)
        self.put("Tofu", 3)
        out = yield self.answer(
            b'LIST (SUBSCRIBED) "" ("INBOX" "Tofu" "Fruit" "Gone") '
            b"RETURN (STATUS (UNSEEN MESSAGES UIDNEXT) CHILDREN)",
            [
                b"CREATE Fruit/",
                b"CREATE Fruit/Apple",
                b"SUBSCRIBE Fruit",
                b"SUBSCRIBE Gone",
                b"SUBSCRIBE Tofu",
            ],
        )
        self.assertEqual(
            out,
            [
                b'* LIST (\\Subscribed \\Noselect \\HasChildren) "/" Fruit',
                b'* LIST (\\Subscribed \\NonExistent \\HasNoChildren) "/" Gone',
                b'* LIST (\\Subscribed \\NoInferiors) "/" INBOX',
                b"* STATUS INBOX (MESSAGES 2 UIDNEXT 3 UNSEEN 2)",
                b'* LIST (\\Subscribed \\NoInferiors) "/" Tofu',
                b"* STATUS Tofu (MESSAGES 3 UIDNEXT 4 UNSEEN 3)",
                b"T OK LIST completed",
            ],
        )

    @defer.inlineCallbacks
    def test_status_of_every_item_equals_status_command(self):
        self.put("INBOX", 2)
        out = yield self.session(
            [
                b'LIST "" "INBOX" RETURN (STATUS (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN))',
                b"STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)",
            ]
        )
        self.assertEqual(out[0][1], out[1][0])
        self.assertIn(b"MESSAGES 2 RECENT 2 UIDNEXT 3 UIDVALIDITY ", out[0][1])

    @defer.inlineCallbacks
    def test_two_hundred_folders_answered_from_the_index(self):
        """
        LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN)) over 200 folders whose
        index is up to date reads none of their mail; a folder another
        program appended to since is the only one read again.
        """
        names = ["INBOX"] + ["box%03d" % i for i in range(199)]
        for i, name in enumerate(names):
            self.put(name, 1 + i % 3)
        scans: list[int] = []
        real_scan = mboxfmt.scan

        def counted(fd, start, end, *a, **kw):
            scans.append(end - start)
            return real_scan(fd, start, end, *a, **kw)

        self.patch(mboxfmt, "scan", counted)
        command = b'LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN))'
        first = yield self.session([command])  # indexes every folder once
        self.assertEqual(len([n for n in scans if n]), 200)  # and the empty special folders
        del scans[:]
        self.put("box100", 2)
        started = time.perf_counter()
        second = yield self.session([command])
        took = time.perf_counter() - started
        self.assertEqual(len(scans), 1, "only the folder that changed is read")
        self.assertEqual(scans[0], 2 * len(MESSAGE))
        status = [x for x in second[0] if x.startswith(b"* STATUS")]
        self.assertEqual(len(status), 205)  # with the five special folders
        self.assertIn(b"* STATUS box100 (MESSAGES 5 UNSEEN 5)", status)
        self.assertIn(b"* STATUS box101 (MESSAGES 1 UNSEEN 1)", status)
        self.assertEqual(
            [x for x in first[0] if b"box101" in x], [x for x in second[0] if b"box101" in x]
        )
        print(f"LIST-STATUS over 200 folders, index up to date: {took * 1000:.0f} ms")


def _strip_unmarked(lines: list[bytes]) -> list[bytes]:
    # Dovecot's mbox marks a folder \UnMarked when it happens to have looked
    # at the file (RFC 3501 7.2.2 makes \Marked and \Unmarked optional):
    # left out of the comparison, as we do not mark folders.
    return [x.replace(b" \\UnMarked", b"").replace(b"\\UnMarked ", b"") for x in lines]


# Commands whose answers must equal Dovecot's (as sets of lines: Dovecot's
# mbox lists in directory order, ours in name order; each STATUS line is
# checked to follow its LIST line).
DOVECOT_COMMANDS = [
    b'LIST () "" "*" RETURN ()',
    b'LIST (SUBSCRIBED) "" "*"',
    b'LIST (SUBSCRIBED) "" "*" RETURN (CHILDREN)',
    b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"',
    b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)',
    b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "*"',
    b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "Fruit/%"',
    b'LIST (SUBSCRIBED RECURSIVEMATCH) "" ("%" "Fruit/Kiwi/*")',
    b'LIST "" "*" RETURN (SUBSCRIBED)',
    b'LIST "" "*" RETURN (SUBSCRIBED CHILDREN)',
    b'LIST "" "*" RETURN (CHILDREN)',
    b'LIST (REMOTE) "" "%"',
    b'LIST "" ("INBOX" "Fruit/%")',
    b'LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN UIDNEXT))',
    b'LIST (SUBSCRIBED) "" "*" RETURN (STATUS (MESSAGES UNSEEN))',
    b'LIST "" "%" RETURN (STATUS (MESSAGES) STATUS (UNSEEN))',
    b'LIST "" "" RETURN (CHILDREN)',
    b'LIST "" ()',
]
DOVECOT_BAD = [
    b'LIST (RECURSIVEMATCH) "" "%"',
    b'LIST (REMOTE RECURSIVEMATCH) "" "%"',
    b'LIST (FOO) "" "%"',
    b'LIST "" "%" RETURN (FOO)',
    b'LIST "" "*" RETURN (STATUS ())',
    b'LIST "" "*" RETURN (STATUS (FOO))',
]


def _inbox_holds_no_folders(lines: list[bytes]) -> list[bytes]:
    # Here INBOX holds no folders (CREATE INBOX/x is refused): it is
    # \NoInferiors, which implies \HasNoChildren (RFC 3348 3); Dovecot's
    # INBOX may hold some. Its INBOX line is brought to that form.
    out = []
    for x in lines:
        if x.startswith(b"* LIST (") and x.endswith(b' "/" INBOX'):
            flags = x[len(b"* LIST (") : x.index(b")")].split()
            kept = [f for f in flags if f not in (b"\\HasNoChildren", b"\\NoInferiors")]
            x = b"* LIST (" + b" ".join([*kept, b"\\NoInferiors"]) + b') "/" INBOX'
        out.append(x)
    return out


def _pairs(lines: list[bytes]) -> list[bytes]:
    """Each LIST line joined with the STATUS line after it, if any."""
    out: list[bytes] = []
    for line in lines:
        if line.startswith(b"* STATUS") and out:
            out[-1] += b" | " + line
        else:
            out.append(line)
    return out


class ListLikeDovecotTest(ListExtendedCase):
    """The same answers as Dovecot's mbox on the same folders and subscriptions."""

    timeout = 120
    login = b'LOGIN %s "secret"' % USER.encode()

    def setUp(self) -> None:
        reason = dovecot_peer.available()
        if reason:
            raise unittest.SkipTest(reason)
        super().setUp()
        self.dovecot = dovecot_peer.Dovecot()
        self.addCleanup(self.dovecot.stop)
        self.dovecot.start(MESSAGE)
        path = folder_path(self.config.mail_dir, USER, "INBOX")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(MESSAGE)

    @defer.inlineCallbacks
    def test_same_answers_as_dovecot(self):
        # Our special folders, made at login, made in Dovecot too.
        setup = [
            *TREE,
            *(b"CREATE " + n for n in (b"Archive", b"Drafts", b"Junk", b"Sent", b"Trash")),
        ]
        setup += [
            b"SUBSCRIBE " + n for n in (b"INBOX", b"Archive", b"Drafts", b"Junk", b"Sent", b"Trash")
        ]
        commands = [*setup, *DOVECOT_COMMANDS, *DOVECOT_BAD]
        ours = yield self.session(commands)
        theirs = yield self.in_thread(
            _session,
            self.dovecot.port,
            b"LOGIN %s %s" % (dovecot_peer.USER.encode(), dovecot_peer.PASSWORD.encode()),
            commands,
        )
        diffs = []
        for cmd, o, t in zip(commands, ours, theirs, strict=True):
            if cmd in DOVECOT_BAD:
                if o[-1].split()[1] != b"BAD" or t[-1].split()[1] != b"BAD":
                    diffs.append((cmd, o, t))
                continue
            if cmd in setup:
                continue
            mine = _pairs(o[:-1])
            dove = _pairs(_inbox_holds_no_folders(_strip_unmarked(t[:-1])))
            # UIDVALIDITY differs between two servers; none is asked for here.
            if sorted(mine) != sorted(dove) or o[-1].split()[1] != t[-1].split()[1]:
                diffs.append((cmd, mine, dove))
        for cmd, o, t in diffs:
            print(cmd, "\n  ours:   ", o, "\n  dovecot:", t)
        self.assertEqual(diffs, [])
