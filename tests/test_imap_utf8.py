"""
UTF8=ACCEPT (RFC 6855) over a real loopback IMAP session: ENABLE, mailbox
names in UTF-8 both ways for a session that enabled it and in modified UTF-7
for one that did not (the same folder on disk), SEARCH with a CHARSET
refused, and APPEND's UTF8 data extension storing the message as it is.
"""

from __future__ import annotations

from twisted.internet import defer

from mailsrv.imap import mutf7
from mailsrv.imap.responses import encode_name, list_lines
from mailsrv.store.names import user_dir
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER

CAFE = "café".encode()
TAIPEI = "日本/台北".encode()
HEADER = "From: Jörg <jörg@exämple.org>\r\nSubject: grüße\r\n\r\n".encode()
MESSAGE = HEADER + b"body\r\n"


def _untagged(lines: list[bytes]) -> list[bytes]:
    return [x.rstrip(b"\r\n") for x in lines if x.startswith(b"* ")]


def _tagged(lines: list[bytes]) -> bytes:
    return lines[-1].rstrip(b"\r\n").split(b" ", 1)[1]


class Utf8Case(LoopbackIMAPCase):
    def session(self, commands: list[bytes], enable: bool = True) -> list[list[bytes]]:
        """Log in, ENABLE UTF8=ACCEPT if C{enable}, run C{commands}; each one's lines."""
        c = RawClient(self.port_number)
        try:
            c.login()
            if enable:
                out = c.cmd(b"E", b"ENABLE UTF8=ACCEPT")
                assert out == [b"* ENABLED UTF8=ACCEPT\r\n", b"E OK ENABLE completed\r\n"], out
            return [c.cmd(b"T%d" % i, cmd) for i, cmd in enumerate(commands)]
        finally:
            c.close()

    def run_session(self, commands: list[bytes], enable: bool = True) -> defer.Deferred:
        return self.in_thread(self.session, commands, enable)

    def mbox_bytes(self, folder: str) -> bytes:
        home = user_dir(self.config.mail_dir, USER)
        for path in home.rglob("*"):
            if path.is_file() and path.name == folder:
                return path.read_bytes()
        raise AssertionError(f"no mbox {folder!r} in {sorted(home.rglob('*'))}")


class EnableTests(Utf8Case):
    @defer.inlineCallbacks
    def test_capability_and_enable_name_utf8_accept(self):
        out = yield self.run_session([b"CAPABILITY", b"ENABLE X-UNKNOWN utf8=accept"])
        caps = _untagged(out[0])[0].split()
        self.assertIn(b"UTF8=ACCEPT", caps)
        self.assertIn(b"ENABLE", caps)
        # RFC 5161 3.1: named again (as Dovecot does); an unknown name is left out.
        self.assertEqual(_untagged(out[1]), [b"* ENABLED UTF8=ACCEPT"])

    @defer.inlineCallbacks
    def test_not_enabled_once_a_mailbox_is_selected(self):
        # RFC 6855 3: "ENABLE UTF8=ACCEPT" is only valid in the authenticated state.
        out = yield self.run_session(
            [
                b"CREATE caf&AOk-",
                b"SELECT INBOX",
                b"ENABLE UTF8=ACCEPT",
                b"STATUS caf&AOk- (MESSAGES)",
            ],
            enable=False,
        )
        self.assertEqual(_untagged(out[2]), [b"* ENABLED"])
        self.assertEqual(_tagged(out[2]), b"OK ENABLE completed")
        self.assertEqual(_untagged(out[3]), [b"* STATUS caf&AOk- (MESSAGES 0)"])


class NameTests(Utf8Case):
    @defer.inlineCallbacks
    def test_a_utf8_name_is_one_folder_for_both_kinds_of_session(self):
        utf8 = yield self.run_session(
            [
                b'CREATE "%s"' % CAFE,
                b'STATUS "%s" (MESSAGES)' % CAFE,
                b'SELECT "%s"' % CAFE,
                b'APPEND "%s" {%d+}\r\n%s' % (CAFE, len(MESSAGE), MESSAGE),
                b'LIST "" "%s"' % CAFE,
                b'GETQUOTAROOT "%s"' % CAFE,
            ]
        )
        self.assertEqual([_tagged(r)[:2] for r in utf8], [b"OK"] * 6)
        self.assertEqual(_untagged(utf8[1]), [b'* STATUS "%s" (MESSAGES 0)' % CAFE])
        self.assertEqual(len(_untagged(utf8[4])), 1)  # a UTF-8 pattern matches it
        self.assertEqual(_untagged(utf8[5]), [b'* QUOTAROOT "%s"' % CAFE])
        # On disk, one folder, with the message as it was sent.
        self.assertIn(b"\nSubject: gr\xc3\xbc\xc3\x9fe\n", self.mbox_bytes("café"))
        legacy = yield self.run_session(
            [b'LIST "" "caf*"', b"STATUS caf&AOk- (MESSAGES)", b"CREATE &ZeVnLA-/&U,BTFw-"],
            enable=False,
        )
        self.assertEqual(_untagged(legacy[0]), [b'* LIST (\\NoInferiors) "/" caf&AOk-'])
        self.assertEqual(_untagged(legacy[1]), [b"* STATUS caf&AOk- (MESSAGES 1)"])
        self.assertEqual(_tagged(legacy[2]), b"OK CREATE completed")
        # A name made in modified UTF-7 is the UTF-8 session's name too.
        again = yield self.run_session([b'STATUS "%s" (MESSAGES)' % TAIPEI])
        self.assertEqual(_untagged(again[0]), [b'* STATUS "%s" (MESSAGES 0)' % TAIPEI])

    @defer.inlineCallbacks
    def test_list_lsub_and_list_status_spell_names_in_utf8_after_enable(self):
        out = yield self.run_session(
            [
                b'CREATE "%s"' % CAFE,
                b'SUBSCRIBE "%s"' % CAFE,
                b'LIST "" "*"',
                b'LSUB "" "*"',
                b'LIST "" ("%s") RETURN (STATUS (MESSAGES))' % CAFE,
            ]
        )
        self.assertIn(b'* LIST (\\NoInferiors) "/" "%s"' % CAFE, _untagged(out[2]))
        self.assertIn(b'* LSUB () "/" "%s"' % CAFE, _untagged(out[3]))
        self.assertEqual(
            _untagged(out[4]),
            [b'* LIST (\\NoInferiors) "/" "%s"' % CAFE, b'* STATUS "%s" (MESSAGES 0)' % CAFE],
        )

    @defer.inlineCallbacks
    def test_every_command_that_names_a_mailbox_takes_a_utf8_name(self):
        u1, u2 = "ü1".encode(), "ü2".encode()
        out = yield self.run_session(
            [
                b"APPEND INBOX {%d+}\r\n%s" % (len(MESSAGE), MESSAGE),
                b'CREATE "%s"' % u1,
                b"SELECT INBOX",
                b'COPY 1 "%s"' % u1,
                b'MOVE 1 "%s"' % u1,
                b'RENAME "%s" "%s"' % (u1, u2),
                b'SUBSCRIBE "%s"' % u2,
                b'LSUB "" "\xc3\xbc*"',
                b'EXAMINE "%s"' % u2,
                b'STATUS "%s" (MESSAGES)' % u2,
                b'UNSUBSCRIBE "%s"' % u2,
                b'DELETE "%s"' % u2,
                b'STATUS "%s" (MESSAGES)' % u2,
            ]
        )
        self.assertEqual([_tagged(r)[:2] for r in out[:-1]], [b"OK"] * 12)
        self.assertEqual(len(_untagged(out[7])), 1)
        self.assertEqual(_untagged(out[9]), [b'* STATUS "%s" (MESSAGES 2)' % u2])
        self.assertEqual(_tagged(out[12]), b"NO [NONEXISTENT] Mailbox doesn't exist")

    @defer.inlineCallbacks
    def test_an_ampersand_is_itself_in_a_utf8_name(self):
        out = yield self.run_session([b"CREATE a&b", b'CREATE "&AOk-"', b"STATUS a&b (MESSAGES)"])
        self.assertEqual([_tagged(r)[:2] for r in out], [b"OK"] * 3)
        self.assertEqual(_untagged(out[2]), [b"* STATUS a&b (MESSAGES 0)"])
        legacy = yield self.run_session([b'LIST "" "*"'], enable=False)
        names = {line.rsplit(b" ", 1)[1] for line in _untagged(legacy[0])}
        self.assertLessEqual({b"&-AOk-", b"INBOX", b"a&-b"}, names)
        self.assertNotIn(b"a&b", names)

    @defer.inlineCallbacks
    def test_octets_that_are_not_utf8_are_a_bad(self):
        # RFC 6855 3: "MUST reject, with a BAD response" octets that are not UTF-8.
        out = yield self.run_session(
            [b'CREATE "caf\xc3("', b"CREATE {2+}\r\n\xe9x", b'SELECT "\xed\xa0\x80"']
        )
        self.assertEqual([_tagged(r)[:3] for r in out], [b"BAD"] * 3)
        # Without ENABLE, 8-bit octets are no modified UTF-7 name: a NO, as before.
        legacy = yield self.run_session([b'CREATE "%s"' % CAFE], enable=False)
        self.assertEqual(_tagged(legacy[0])[:2], b"NO")

    def test_names_spelled_by_the_session(self):
        self.assertEqual(encode_name("café"), b"caf&AOk-")
        self.assertEqual(encode_name("café", True), b'"caf\xc3\xa9"')
        self.assertEqual(encode_name('a "b"\\', True), b'"a \\"b\\"\\\\"')
        self.assertEqual(encode_name("a\r\nb", True), b"{4}\r\na\r\nb")
        self.assertEqual(encode_name("nil", True), b'"nil"')

        class Box:
            def getFlags(self):
                return ["\\HasNoChildren"]

        lines = list(list_lines(b"LIST", [("日本", Box())], None, lambda n: encode_name(n, True)))
        self.assertEqual(lines, ['LIST (\\HasNoChildren) "/" "日本"'.encode()])

    def test_modified_utf7_encoding_round_trips(self):
        for name in ["a&b", "café", "😀x", "~peter/mail/日本語/台北", "&", "plain"]:
            self.assertEqual(mutf7.decode(mutf7.encode(name)), name)
        # RFC 3501 5.1.3's example.
        self.assertEqual(
            mutf7.encode("~peter/mail/日本語/台北"), b"~peter/mail/&ZeVnLIqe-/&U,BTFw-"
        )
        self.assertEqual(mutf7.from_utf8(b"a&b"), b"a&-b")
        with self.assertRaises(mutf7.InvalidName):
            mutf7.from_utf8(b"\xc0\xaf")  # an overlong form (RFC 3629 3)


class SearchTests(Utf8Case):
    @defer.inlineCallbacks
    def test_search_with_a_charset_is_a_bad_after_enable(self):
        append = b"APPEND INBOX {%d+}\r\n%s" % (len(MESSAGE), MESSAGE)
        out = yield self.run_session(
            [
                append,
                b"SELECT INBOX",
                b"SEARCH CHARSET UTF-8 ALL",
                b'SEARCH SUBJECT "gr\xc3\xbc"',
            ]
        )
        self.assertEqual(_tagged(out[2])[:3], b"BAD")
        self.assertEqual(_untagged(out[3]), [b"* SEARCH 1"])
        legacy = yield self.run_session(
            [b"SELECT INBOX", b"SEARCH CHARSET UTF-8 ALL"], enable=False
        )
        self.assertEqual(_untagged(legacy[1]), [b"* SEARCH 1"])


class AppendTests(Utf8Case):
    @defer.inlineCallbacks
    def test_utf8_append_data_is_stored_as_it_is(self):
        out = yield self.run_session(
            [
                b"APPEND INBOX UTF8 (~{%d+}\r\n%s)" % (len(MESSAGE), MESSAGE),
                b"APPEND INBOX (\\Seen) utf8 (~{%d+}\r\n%s)" % (len(MESSAGE), MESSAGE),
                b"APPEND INBOX {%d+}\r\n%s" % (len(MESSAGE), MESSAGE),
                b"SELECT INBOX",
                b"FETCH 1:3 (FLAGS BODY.PEEK[HEADER])",
                b"APPEND INBOX UTF8 (~{1+}\r\nx",
                b"NOOP",
            ]
        )
        self.assertEqual(
            _tagged(out[0]), b"OK [APPENDUID %s 1] APPEND completed" % (_tagged(out[0]).split()[2])
        )
        self.assertEqual(_tagged(out[1])[:2], b"OK")
        self.assertEqual(_tagged(out[2])[:2], b"OK")
        fetched = b"".join(out[4])
        self.assertEqual(fetched.count(HEADER), 3)
        self.assertIn(b"* 2 FETCH (FLAGS (\\Seen \\Recent) BODY[HEADER]", fetched)
        self.assertEqual(_tagged(out[5])[:3], b"BAD")  # no ")" after the data
        self.assertEqual(_tagged(out[6]), b"OK NOOP completed")
        self.assertEqual(self.mbox_bytes("INBOX").count(b"\nSubject: gr\xc3\xbc\xc3\x9fe\n"), 3)

    def legacy_appends(self) -> list[list[bytes]]:
        c = RawClient(self.port_number)
        try:
            c.login()
            # RFC 6855 4: without ENABLE, a UTF8 data item is a NO; asked for
            # with a synchronizing literal, it is refused before the octets.
            c.send(b"A1 APPEND INBOX UTF8 (~{%d}\r\n" % len(MESSAGE))
            first = c.read_until(b"A1")
            plus = b"A2 APPEND INBOX UTF8 (~{%d+}\r\n%s)\r\n" % (len(MESSAGE), MESSAGE)
            c.send(plus)
            second = c.read_until(b"A2")
            return [first, second, c.cmd(b"A3", b"STATUS INBOX (MESSAGES)")]
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_utf8_append_data_without_enable_is_a_no(self):
        first, second, status = yield self.in_thread(self.legacy_appends)
        self.assertEqual(first, [b"A1 NO UTF8 APPEND data needs ENABLE UTF8=ACCEPT\r\n"])
        self.assertEqual(second, [b"A2 NO UTF8 APPEND data needs ENABLE UTF8=ACCEPT\r\n"])
        self.assertEqual(_untagged(status), [b"* STATUS INBOX (MESSAGES 0)"])
