"""
CATENATE (RFC 4469) over loopback on the mbox store: messages built from
TEXT literals and sections of stored messages (HEADER, TEXT, 1, 1.MIME, the
whole message, PARTIAL, HEADER.FIELDS), [BADURL] and [TOOBIG] with nothing
stored, CATENATE inside MULTIAPPEND, a big message streamed; and the same
APPENDs against Dovecot, whose stored messages must match ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from twisted.internet import defer
from twisted.trial import unittest

from mailsrv.spool import BytesSource
from tests import dovecot_peer
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER

MULTI = (
    b"From: ann@example.test\nSubject: parts\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="B1"\n\n'
    b"preamble\n--B1\nContent-Type: text/plain; charset=utf-8\n\nfirst part\n"
    b"--B1\nContent-Type: message/rfc822\n\nSubject: inner\nFrom: d@example.test\n\ninner body\n"
    b"--B1--\n"
)
NEW_HEADER = b"From: me@example.test\r\nSubject: forward\r\n\r\n"

# The URLs of one CATENATE, relative to INBOX selected (RFC 5092 7.1).
URLS = [
    b'URL "/INBOX;UIDVALIDITY={v}/;UID=1/;SECTION=HEADER"',
    b"TEXT {%d+}\r\n%s" % (len(NEW_HEADER), NEW_HEADER),
    b'URL ";UID=1/;SECTION=1"',
    b'URL "/INBOX/;UID=1/;SECTION=1.MIME"',
    b'URL "/inbox/;UID=1/;SECTION=TEXT"',
    b'URL "/INBOX/;UID=1/;SECTION=2.HEADER"',
    b'URL "/INBOX/;UID=1/;PARTIAL=6.17"',
    b'URL "/INBOX/;UID=1/;SECTION=HEADER.FIELDS%20(SUBJECT)"',
    b'URL "/INBOX/;UID=1"',
]
FETCHED = [
    b"BODY.PEEK[HEADER]",
    None,
    b"BODY.PEEK[1]",
    b"BODY.PEEK[1.MIME]",
    b"BODY.PEEK[TEXT]",
    b"BODY.PEEK[2.HEADER]",
    b"BODY.PEEK[]<6.17>",
    b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]",
    b"BODY.PEEK[]",
]
# What the CATENATE of URLS stores: the octets FETCH serves for each section.
EXPECTED = (
    b"From: ann@example.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="B1"\r\n\r\n'  # HEADER
    + NEW_HEADER  # TEXT
    + b"first part"  # 1
    + b"Content-Type: text/plain; charset=utf-8\r\n\r\n"  # 1.MIME
    + b"preamble\r\n--B1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nfirst part\r\n"
    b"--B1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nFrom: d@example.test\r\n"
    b"\r\ninner body\r\n--B1--\r\n"  # TEXT
    b"Subject: inner\r\nFrom: d@example.test\r\n\r\n"  # 2.HEADER
    b"ann@example.test\r"  # PARTIAL=6.17
    b"Subject: parts\r\n\r\n"  # HEADER.FIELDS (SUBJECT)
    b"From: ann@example.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"  # the whole message
    b'Content-Type: multipart/mixed; boundary="B1"\r\n\r\n'
    b"preamble\r\n--B1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nfirst part\r\n"
    b"--B1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nFrom: d@example.test\r\n"
    b"\r\ninner body\r\n--B1--\r\n"
)


# Bad URLs whose answers are Dovecot's, byte for byte (but its timing).
SAME_AS_DOVECOT = [
    b"/INBOX;UIDVALIDITY=1/;UID=1",
    b"/INBOX/;UID=99",
    b"/Nope/;UID=1",
    b"imap://alice@127.0.0.1/INBOX/;UID=1",
    b"INBOX/;UID=1",
]
BAD_URL_ANSWERS = [
    b"A NO [BADURL /INBOX;UIDVALIDITY=1/;UID=1] Invalid UIDVALIDITY.\r\n",
    b"A NO [BADURL /INBOX/;UID=99] Message not found.\r\n",
    b"A NO [BADURL /Nope/;UID=1] Mailbox doesn't exist: Nope.\r\n",
    b"A NO [BADURL imap://alice@127.0.0.1/INBOX/;UID=1] Invalid IMAP URL: Relative URL required.\r\n",
    b"A NO [BADURL INBOX/;UID=1] Mailbox doesn't exist: INBOX/INBOX.\r\n",
]


def _untimed(lines: list[bytes]) -> bytes:
    """Dovecot's tagged answer without its timing, `` (0.001 + 0.000 secs)``."""
    return re.sub(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)", b"", lines[-1])


def catenate_command(validity: int) -> bytes:
    return (
        b"APPEND Drafts CATENATE ("
        + b" ".join(u.replace(b"{v}", b"%d" % validity) for u in URLS)
        + b")"
    )


def _tagged(lines: list[bytes]) -> bytes:
    return lines[-1].split(b" ", 1)[1].rstrip(b"\r\n")


def _literal(lines: list[bytes]) -> bytes:
    """The octets of the one literal in a FETCH response."""
    text = b"".join(lines)
    m = re.search(rb"\{(\d+)\}\r\n", text)
    assert m, text
    return text[m.end() : m.end() + int(m.group(1))]


def _validity(lines: list[bytes]) -> int:
    m = re.search(rb"UIDVALIDITY (\d+)", b"".join(lines))
    assert m
    return int(m.group(1))


def _fetch_part(c: RawClient, item: bytes) -> bytes:
    return _literal(c.cmd(b"F", b"UID FETCH 1 (" + item + b")"))


class CatenateTests(LoopbackIMAPCase):
    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        yield self.store.deliver(USER, BytesSource(MULTI), "ann@example.test")
        yield self.store.create_folder(USER, "Drafts")

    def client(self) -> RawClient:
        c = RawClient(self.port_number)
        self.addCleanup(c.close)
        c.login()
        return c

    def session(self, script) -> defer.Deferred:
        return self.in_thread(lambda: script(self.client()))

    @defer.inlineCallbacks
    def test_sections_make_one_message(self):
        def script(c):
            caps = c.cmd(b"C", b"CAPABILITY")[0]
            validity = _validity(c.cmd(b"S", b"SELECT INBOX"))
            expected = b"".join(
                NEW_HEADER if item is None else _fetch_part(c, item) for item in FETCHED
            )
            out = c.cmd(b"A", catenate_command(validity))
            c.cmd(b"S", b"EXAMINE Drafts")
            stored = c.cmd(b"F", b"UID FETCH 1 (RFC822.SIZE BODY.PEEK[])")
            return caps, expected, out, stored

        caps, expected, out, stored = yield self.session(script)
        self.assertIn(b" CATENATE", caps)
        self.assertRegex(_tagged(out), rb"^OK \[APPENDUID \d+ 1\] APPEND completed$")
        self.assertEqual(_literal(stored), expected)
        self.assertEqual(expected, EXPECTED)
        self.assertIn(b"RFC822.SIZE %d " % len(expected), b"".join(stored))
        self.assertIn(b"Subject: forward\r\n\r\nfirst partContent-Type: text/plain", expected)

    @defer.inlineCallbacks
    def test_bad_urls_store_nothing(self):
        bad = [
            (b"/INBOX;UIDVALIDITY=1/;UID=1", b"Invalid UIDVALIDITY"),
            (b"/INBOX/;UID=99", b"Message not found"),
            (b"/Nope/;UID=1", b"Mailbox doesn't exist: Nope"),
            (b"imap://alice@127.0.0.1/INBOX/;UID=1", b"Invalid IMAP URL: Relative URL required"),
            (b"garbage%%", b"Invalid IMAP URL: bad character in the mailbox name"),
            (b"/INBOX/;UID=1/;SECTION=7", b"Section not found"),
            (b"/INBOX/;UID=1/;SECTION=BOGUS", b"Invalid section"),
            (b"/INBOX", b"Invalid messagepart IMAP URL"),
            (b"INBOX/;UID=1", b"Mailbox doesn't exist: INBOX/INBOX"),
        ]

        def script(c):
            out = []
            c.cmd(b"S", b"SELECT INBOX")
            for url, _ in bad:
                # A good first message, the bad URL in the second: neither is stored.
                out.append(
                    c.cmd(
                        b"A",
                        b'APPEND Drafts {2+}\r\nx\n CATENATE (TEXT {1+}\r\ny URL "%s" TEXT {1+}\r\nz)'
                        % url,
                    )
                )
            c.cmd(b"U", b"UNSELECT")
            out.append(c.cmd(b"A", b'APPEND Drafts CATENATE (URL ";UID=1")'))
            out.append(c.cmd(b"N", b"NOOP"))
            return out, c.cmd(b"S", b"STATUS Drafts (MESSAGES UIDNEXT)")

        out, status = yield self.session(script)
        for (url, reason), lines in zip(bad, out, strict=False):
            self.assertEqual(lines, [b"A NO [BADURL %s] %s.\r\n" % (url, reason)])
        self.assertEqual(
            out[len(bad)],
            [b"A NO [BADURL ;UID=1] Mailbox-relative IMAP URL, but no mailbox selected.\r\n"],
        )
        self.assertEqual(out[-1], [b"N OK NOOP completed\r\n"])
        self.assertEqual(status[0], b"* STATUS Drafts (MESSAGES 0 UIDNEXT 1)\r\n")

    @defer.inlineCallbacks
    def test_bad_url_answers_are_dovecots(self):
        def script(c):
            c.cmd(b"S", b"SELECT INBOX")
            return [
                c.cmd(b"A", b'APPEND Drafts CATENATE (URL "%s")' % url)[-1]
                for url in SAME_AS_DOVECOT
            ]

        self.assertEqual((yield self.session(script)), BAD_URL_ANSWERS)

    @defer.inlineCallbacks
    def test_syntax(self):
        def script(c):
            c.cmd(b"S", b"SELECT INBOX")
            return [
                c.cmd(b"A", b"APPEND Drafts CATENATE ()"),
                c.cmd(b"B", b"APPEND Drafts CATENATE (TEXT {3+}\r\nabc"),
                c.cmd(b"C", b"APPEND Drafts CATENATE (TEXT {3+}\r\nabc FOO)"),
                c.cmd(b"D", b"APPEND Drafts CATENATE (url /INBOX/;UID=1 text {2+}\r\nab)"),
                c.cmd(b"E", b"APPEND Drafts CATENATE (URL {13+}\r\n/INBOX/;UID=1)"),
                c.cmd(b"F", b"APPEND Drafts CATENATE (URL {0+}\r\n)"),
                c.cmd(b"N", b"NOOP"),
            ]

        out = yield self.session(script)
        self.assertEqual(out[0], [b"A BAD Empty CATENATE list\r\n"])
        self.assertEqual(out[1], [b"B BAD Invalid CATENATE list\r\n"])
        self.assertEqual(out[2], [b"C BAD Invalid CATENATE part\r\n"])
        self.assertRegex(_tagged(out[3]), rb"^OK \[APPENDUID \d+ 1\]")
        self.assertRegex(_tagged(out[4]), rb"^OK \[APPENDUID \d+ 2\]")
        self.assertEqual(out[5:], [[b"F BAD Empty URL\r\n"], [b"N OK NOOP completed\r\n"]])

    @defer.inlineCallbacks
    def test_multiappend_with_catenate(self):
        def script(c):
            c.cmd(b"S", b"SELECT INBOX")
            out = c.cmd(
                b"A",
                b'APPEND Drafts (\\Seen) CATENATE (URL ";UID=1/;SECTION=1") {3+}\r\nab\n'
                b' (\\Draft) CATENATE (TEXT {3+}\r\nxyz URL ";UID=1/;SECTION=1.MIME")',
            )
            c.cmd(b"S", b"EXAMINE Drafts")
            return out, c.cmd(b"F", b"FETCH 1:* (FLAGS BODY.PEEK[])")

        out, fetched = yield self.session(script)
        self.assertRegex(_tagged(out), rb"^OK \[APPENDUID \d+ 1:3\] APPEND completed$")
        text = b"".join(fetched)
        self.assertIn(b"FLAGS (\\Seen \\Recent) BODY[] {12}\r\nfirst part\r\n)", text)
        self.assertIn(b"BODY[] {4}\r\nab\r\n)", text)
        self.assertIn(
            b"FLAGS (\\Draft \\Recent) BODY[] {46}\r\nxyzContent-Type: text/plain; charset=utf-8\r\n\r\n)",
            text,
        )

    @defer.inlineCallbacks
    def test_too_big(self):
        # Two copies of a 60,000-octet message pass the 100,000 limit.
        yield self.store.deliver(
            USER, BytesSource(b"Subject: big\n\n" + b"x" * 60_000 + b"\n"), "a@b.test"
        )

        def script(c):
            c.cmd(b"S", b"SELECT INBOX")
            out = c.cmd(b"A", b'APPEND Drafts CATENATE (URL ";UID=2" URL ";UID=2")')
            texts = c.cmd(
                b"B",
                b"APPEND Drafts CATENATE (TEXT {60000+}\r\n%s TEXT {60000+}\r\n%s)"
                % (b"y" * 60_000, b"y" * 60_000),
            )
            return out, texts, c.cmd(b"N", b"NOOP"), c.cmd(b"S", b"STATUS Drafts (MESSAGES)")

        out, texts, noop, status = yield self.session(script)
        self.assertEqual(out, [b"A NO [TOOBIG] Composed message grows too big.\r\n"])
        self.assertEqual(texts, [b"B NO [TOOBIG] Message too big\r\n"])
        self.assertEqual(noop, [b"N OK NOOP completed\r\n"])
        self.assertEqual(status[0], b"* STATUS Drafts (MESSAGES 0)\r\n")

    @defer.inlineCallbacks
    def test_a_big_message_is_streamed(self):
        imap = dataclasses.replace(self.config.imap, max_literal_size=8 * 1024 * 1024)
        self.factory.config = dataclasses.replace(self.config, imap=imap)
        body = b"".join(b"line %07d of a big message\n" % i for i in range(120_000))  # 3.4 MB
        yield self.store.deliver(USER, BytesSource(b"Subject: big\n\n" + body), "a@b.test")

        def script(c):
            c.cmd(b"S", b"SELECT INBOX")
            out = c.cmd(b"A", b'APPEND Drafts CATENATE (TEXT {4+}\r\nX: y URL ";UID=2")')
            c.cmd(b"S", b"EXAMINE Drafts")
            return out, c.cmd(b"F", b"FETCH 1 BODY.PEEK[]")

        out, fetched = yield self.session(script)
        self.assertRegex(_tagged(out), rb"^OK \[APPENDUID \d+ 1\]")
        expected = b"X: ySubject: big\r\n\r\n" + body.replace(b"\n", b"\r\n")
        got = _literal(fetched)
        self.assertEqual(len(got), len(expected))
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(expected).digest())


class DovecotComparison(unittest.TestCase):
    """The same CATENATE on Dovecot stores the same octets as ours."""

    timeout = 60

    def setUp(self):
        reason = dovecot_peer.available()
        if reason:
            raise unittest.SkipTest(reason)

    def test_same_message_as_dovecot(self):
        dovecot = dovecot_peer.Dovecot()
        mbox = b"From ann@example.test Mon Jan  1 00:00:00 2024\n" + MULTI + b"\n"
        dovecot.start(mbox)
        try:
            c = RawClient(dovecot.port)
            try:
                out = c.cmd(
                    b"L",
                    b"LOGIN %s %s" % (dovecot_peer.USER.encode(), dovecot_peer.PASSWORD.encode()),
                )
                assert out[-1].startswith(b"L OK"), out
                c.cmd(b"M", b"CREATE Drafts")
                validity = _validity(c.cmd(b"S", b"SELECT INBOX"))
                expected = b"".join(
                    NEW_HEADER if item is None else _fetch_part(c, item) for item in FETCHED
                )
                out = c.cmd(b"A", catenate_command(validity))
                self.assertRegex(_tagged(out), rb"^OK \[APPENDUID \d+ 1\]")
                c.cmd(b"S", b"SELECT INBOX")
                refused = [
                    _untimed(c.cmd(b"A", b'APPEND Drafts CATENATE (URL "%s")' % url))
                    for url in SAME_AS_DOVECOT
                ]
                c.cmd(b"S", b"EXAMINE Drafts")
                stored = _literal(c.cmd(b"F", b"UID FETCH 1 BODY.PEEK[]"))
            finally:
                c.close()
        finally:
            dovecot.stop()
        self.assertEqual(stored, expected)
        self.assertEqual(refused, BAD_URL_ANSWERS)
        # and the octets ours stores (test_sections_make_one_message):
        self.assertEqual(stored, EXPECTED)
