"""
SEARCH FROM/TO/CC/BCC over a real loopback IMAP session (RFC 3501 6.4.4):
they match the parsed addresses and the display names, case-insensitively,
with encoded words (RFC 2047) decoded. The expected answers are Dovecot's
(2.3, mbox) for the same messages and the same commands.
"""

from __future__ import annotations

from twisted.internet import defer

from mailsrv.imap.addrtext import address_text
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient

MESSAGES = [
    b'From: "Joe Q. Public" <user-from (comment)@ (comment) domain.org>\r\n'
    b"To: Some One <to@example.com>, other@example.net\r\n"
    b"Cc: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <jm@example.de>\r\n"
    b"Bcc: (hidden) bcc-user@Example.COM (Bcc Person)\r\n"
    b"Subject: one\r\n\r\nbody\r\n",
    b"From: =?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>\r\n"
    b"To: undisclosed-recipients:;\r\n"
    b'Cc: Group: a@b.c, "D E" <d@e.f>;\r\n'
    b"Subject: two\r\n\r\nbody\r\n",
    b"From:    user-from@domain.org\r\nTo: <to@example.com>\r\nSubject: three\r\n\r\nbody\r\n",
    b"From: Mary Smith <mary@x.test>\r\nTo: John Doe <jdoe@machine.example>\r\n"
    b"Subject: four\r\n\r\nbody\r\n",
]

# (search program, the messages Dovecot 2.3.19 finds)
DOVECOT = [
    (b"FROM user-from@domain.org", b"1 3"),
    (b"FROM USER-FROM@DOMAIN.ORG", b"1 3"),
    (b'FROM "<user-from@domain.org>"', b"1 3"),
    (b"FROM comment", b""),
    (b'FROM "Joe Q"', b"1"),
    (b"FROM public", b"1"),
    (b'FROM "\\"Joe Q. Public\\" <user-from@domain.org>"', b"1"),
    (b'FROM "Public <user"', b""),
    (b'FROM " "', b"1 2 4"),
    (b'FROM "mary smith"', b"4"),
    (b'FROM "Mary  Smith"', b""),
    (b'FROM "\\"Mary Smith\\" <mary"', b"4"),
    (b'FROM "mary@x.test>"', b"4"),
    (b"FROM pirard@vm1", b"2"),
    (b'CHARSET UTF-8 FROM "Andr\xc3\xa9 Pirard <PIRARD@"', b"2"),
    (b"TO some", b"1"),
    (b"TO other@example.net", b"1"),
    (b'TO "one <to"', b""),
    (b'TO ", "', b"1"),
    (b'TO "com, other"', b""),
    (b"TO undisclosed", b"2"),
    (b'TO "undisclosed-recipients:;"', b"2"),
    (b'CHARSET UTF-8 CC "J\xc3\xbcrgen"', b"1"),
    (b'CHARSET UTF-8 CC "J\xc3\x9cRGEN"', b"1"),
    (b'CHARSET UTF-8 CC "JURGEN"', b""),
    (b'CHARSET UTF-8 CC "J\xc3\xbcrgen M\xc3\xbcller <jm"', b"1"),
    (b'CC "=?UTF-8?Q"', b""),
    (b"CC jm@", b"1"),
    (b"CC group", b"2"),
    (b'CC "group: "', b"2"),
    (b'CC "D E"', b"2"),
    (b"CC d@e.f", b"2"),
    (b'CC "f>;"', b"2"),
    (b"BCC hidden", b""),
    (b'BCC "bcc person"', b"1"),
    (b'BCC "\\"Bcc Person\\" <bcc"', b"1"),
    (b"BCC bcc-user@example.com", b"1"),
]


class AddressSearchTests(LoopbackIMAPCase):
    def searches(self) -> list[bytes]:
        c = RawClient(self.port_number)
        try:
            c.login()
            for m in MESSAGES:
                c.send(b"A APPEND INBOX {%d+}\r\n" % len(m) + m + b"\r\n")
                assert c.read_until(b"A")[-1].startswith(b"A OK")
            c.cmd(b"S", b"SELECT INBOX")
            out = []
            for program, _ in DOVECOT:
                lines = c.cmd(b"Q", b"SEARCH " + program)
                assert lines[-1].startswith(b"Q OK"), (program, lines)
                out.append(lines[0].rstrip(b"\r\n")[len(b"* SEARCH ") :])
            return out
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_address_keys_find_what_dovecot_finds(self):
        got = yield self.in_thread(self.searches)
        self.assertEqual(
            list(zip([p for p, _ in DOVECOT], got, strict=True)),
            [(p, want) for p, want in DOVECOT],
        )


def test_the_plain_form_of_odd_address_fields():
    assert address_text('"Joe Q. Public" <user-from (comment)@ (comment) domain.org>') == (
        '"Joe Q. Public" <user-from@domain.org>'
    )
    assert address_text("<@a.test,@b.test:joe@c.test>") == "<@a.test,@b.test:joe@c.test>"
    assert address_text("Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>") == (
        "Pete <pete@silly.test>"
    )
    assert address_text("x@y (=?UTF-8?Q?=C3=A9?=)") == "é <x@y>"
    assert address_text('"quo\\"ted" <q@x>') == '"quo\\"ted" <q@x>'
    # Broken fields give what can be read, never an error.
    for broken in ("", ",,,", '"open', "(open", "Joe <", "<<>>", "a:b:c;;", "@@@"):
        assert isinstance(address_text(broken), str)
