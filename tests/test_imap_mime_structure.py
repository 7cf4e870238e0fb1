"""
FETCH of MIME structure over the protocol: message/rfc822 sections at the
top level and inside a multipart (RFC 3501 6.4.5), BODYSTRUCTURE of
message/rfc822 and the line counts of parts before a delimiter (RFC 3501
7.4.2, RFC 2046 5.1.1), and ENVELOPE address shapes (groups, routes,
defaults). The expected bytes are Dovecot 2.3's for the same messages,
apart from the choices listed in tests/test_imap_mime_dovecot.py.
"""

from __future__ import annotations

import re

import pytest
from twisted.internet import defer

from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import Harness


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


# A whole message forwarded as the top-level body.
TOP_RFC822 = crlf(
    "From: Outer <outer@example.org>\n"
    "Subject: outer\n"
    "MIME-Version: 1.0\n"
    "Content-Type: message/rfc822\n"
    "\n"
    "From: Inner <inner@example.org>\n"
    "Subject: inner\n"
    'Content-Type: multipart/mixed; boundary="ZZ"\n'
    "\n"
    "--ZZ\n"
    "Content-Type: text/plain\n"
    "\n"
    "part one\n"
    "--ZZ\n"
    "Content-Type: application/octet-stream\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "AAAA\n"
    "--ZZ--\n"
)
OUTER_HEADER = crlf(
    "From: Outer <outer@example.org>\nSubject: outer\nMIME-Version: 1.0\n"
    "Content-Type: message/rfc822\n\n"
)
INNER = TOP_RFC822[len(OUTER_HEADER) :]
INNER_HEADER = INNER[: INNER.index(b"\r\n\r\n") + 4]

# A forwarded message (multipart itself) as part 2 of a multipart.
NESTED = crlf(
    "From: a@example.org\n"
    "Subject: nested\n"
    'Content-Type: multipart/mixed; boundary="XX"\n'
    "\n"
    "preamble\n"
    "--XX\n"
    "Content-Type: text/plain\n"
    "\n"
    "hello\n"
    "--XX\n"
    "Content-Type: message/rfc822\n"
    "Content-Description: fwd\n"
    "\n"
    "From: b@example.org\n"
    "Subject: fwd inner\n"
    'Content-Type: multipart/alternative; boundary="YY"\n'
    "\n"
    "--YY\n"
    "Content-Type: text/plain\n"
    "\n"
    "plain one\n"
    "plain two\n"
    "--YY\n"
    "Content-Type: text/html\n"
    "\n"
    "<p>html</p>\n"
    "--YY--\n"
    "\n"
    "--XX--\n"
    "epilogue\n"
)

# Text parts whose last line end belongs to the next delimiter.
LINES = crlf(
    "From: a@example.org\n"
    "Subject: lines\n"
    'Content-Type: multipart/mixed; boundary="b1"\n'
    "\n"
    "--b1\n"
    "\n"
    "hello\n"
    "\n"
    "--b1\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "one\n"
    "two\n"
    "--b1--\n"
)


def fetch(c, items: str, seq: int | str = 1) -> bytes:
    out = c.cmd(f"f FETCH {seq} ({items})")
    assert out.endswith(b"f OK FETCH completed\r\n"), out
    return out


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def session(h: Harness, *messages: bytes):
    for m in messages:
        h.deliver(m)
    c = h.connect()
    c.login()
    c.select()
    return c


def literal(name: str, data: bytes) -> bytes:
    return name.encode() + b" {%d}\r\n" % len(data) + data


# --- message/rfc822 sections (RFC 3501 6.4.5) ------------------------------


def test_top_level_rfc822_part_1_is_the_whole_encapsulated_message(h):
    c = session(h, TOP_RFC822)
    out = fetch(c, "BODY.PEEK[1] BODY.PEEK[1.HEADER] BODY.PEEK[1.TEXT] BODY.PEEK[1.MIME]")
    assert literal("BODY[1]", INNER) in out
    assert literal("BODY[1.HEADER]", INNER_HEADER) in out
    assert literal("BODY[1.TEXT]", INNER[len(INNER_HEADER) :]) in out
    # Part 1 of a non-multipart message is its body: its MIME header is the message's.
    assert literal("BODY[1.MIME]", OUTER_HEADER) in out


def test_top_level_rfc822_parts_of_the_encapsulated_multipart(h):
    c = session(h, TOP_RFC822)
    out = fetch(
        c,
        "BODY.PEEK[1.1] BODY.PEEK[1.2] BODY.PEEK[1.2.MIME] BODY.PEEK[1.HEADER.FIELDS (SUBJECT)]"
        " BODY.PEEK[1]<0.10> BODY.PEEK[1]<230.100> RFC822.SIZE",
    )
    assert literal("BODY[1.1]", b"part one") in out
    assert literal("BODY[1.2]", b"AAAA") in out
    assert (
        literal(
            "BODY[1.2.MIME]",
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n",
        )
        in out
    )
    assert literal("BODY[1.HEADER.FIELDS (SUBJECT)]", b"Subject: inner\r\n\r\n") in out
    assert literal("BODY[1]<0>", b"From: Inne") in out
    assert literal("BODY[1]<230>", INNER[230:]) in out
    assert b"RFC822.SIZE %d" % len(TOP_RFC822) in out
    # Part 2 does not exist; a leaf is its own part 1, with nothing below that.
    out = fetch(c, "BODY.PEEK[2] BODY.PEEK[1.1.1] BODY.PEEK[1.1.1.1]")
    assert b"BODY[2] NIL" in out and b"BODY[1.1.1.1] NIL" in out
    assert literal("BODY[1.1.1]", b"part one") in out


def test_top_level_rfc822_bodystructure(h):
    c = session(h, TOP_RFC822)
    out = fetch(c, "BODYSTRUCTURE")
    assert out.startswith(
        b'* 1 FETCH (BODYSTRUCTURE ("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 238 '
        b'(NIL "inner" (("Inner" NIL "inner" "example.org")) (("Inner" NIL "inner" "example.org")) '
        b'(("Inner" NIL "inner" "example.org")) NIL NIL NIL NIL NIL) '
        b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 8 0 NIL NIL NIL NIL)'
        b'("APPLICATION" "OCTET-STREAM" NIL NIL NIL "BASE64" 4 NIL NIL NIL NIL) '
        b'"MIXED" ("boundary" "ZZ") NIL NIL NIL) 14 NIL NIL NIL NIL))\r\n'
    ), out
    assert len(INNER) == 238 and INNER.count(b"\n") == 14
    out = fetch(c, "ENVELOPE")
    assert b'ENVELOPE (NIL "outer" (("Outer" NIL "outer" "example.org"))' in out


def test_rfc822_inside_multipart(h):
    c = session(h, NESTED)
    inner = NESTED[NESTED.index(b"From: b@") : NESTED.index(b"\r\n--XX--")]
    out = fetch(
        c,
        "BODY.PEEK[2] BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] BODY.PEEK[2.MIME]"
        " BODY.PEEK[2.1] BODY.PEEK[2.1.MIME] BODY.PEEK[2.2] BODY.PEEK[2]<3.5>",
    )
    assert literal("BODY[2]", inner) in out
    header = inner[: inner.index(b"\r\n\r\n") + 4]
    assert literal("BODY[2.HEADER]", header) in out
    assert literal("BODY[2.TEXT]", inner[len(header) :]) in out
    assert (
        literal("BODY[2.MIME]", b"Content-Type: message/rfc822\r\nContent-Description: fwd\r\n\r\n")
        in out
    )
    assert literal("BODY[2.1]", b"plain one\r\nplain two") in out
    assert literal("BODY[2.1.MIME]", b"Content-Type: text/plain\r\n\r\n") in out
    assert literal("BODY[2.2]", b"<p>html</p>") in out
    assert literal("BODY[2]<3>", inner[3:8]) in out
    out = fetch(c, "BODY.PEEK[1.HEADER] BODY.PEEK[2.1.1.1] BODY.PEEK[2.3]")
    assert b"BODY[1.HEADER] NIL" in out and b"BODY[2.1.1.1] NIL" in out
    assert b"BODY[2.3] NIL" in out


def test_rfc822_inside_multipart_bodystructure_and_body(h):
    c = session(h, NESTED)
    envelope = (
        b'(NIL "fwd inner" ((NIL NIL "b" "example.org")) ((NIL NIL "b" "example.org")) '
        b'((NIL NIL "b" "example.org")) NIL NIL NIL NIL NIL)'
    )
    out = fetch(c, "BODYSTRUCTURE")
    assert out.startswith(
        b'* 1 FETCH (BODYSTRUCTURE (("TEXT" "PLAIN" NIL NIL NIL "7BIT" 5 0 NIL NIL NIL NIL)'
        b'("MESSAGE" "RFC822" NIL NIL "fwd" "7BIT" 205 ' + envelope + b" "
        b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 20 1 NIL NIL NIL NIL)'
        b'("TEXT" "HTML" NIL NIL NIL "7BIT" 11 0 NIL NIL NIL NIL) "ALTERNATIVE" ("boundary" "YY")'
        b' NIL NIL NIL) 14 NIL NIL NIL NIL) "MIXED" ("boundary" "XX") NIL NIL NIL))\r\n'
    ), out
    out = fetch(c, "BODY")
    assert out.startswith(
        b'* 1 FETCH (BODY (("TEXT" "PLAIN" NIL NIL NIL "7BIT" 5 0)'
        b'("MESSAGE" "RFC822" NIL NIL "fwd" "7BIT" 205 ' + envelope + b" "
        b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 20 1)("TEXT" "HTML" NIL NIL NIL "7BIT" 11 0)'
        b' "ALTERNATIVE") 14) "MIXED"))\r\n'
    ), out


def test_rfc822_in_a_forbidden_encoding_still_has_envelope_body_and_lines(h):
    # RFC 3501 7.4.2's grammar: "MESSAGE" "RFC822" is always followed by them.
    msg = crlf(
        'Subject: b64\nContent-Type: multipart/mixed; boundary="Q"\n\n--Q\n'
        "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
        "RnJvbTogeEB5DQoNCmhpDQo=\n--Q--\n"
    )
    c = session(h, msg)
    out = fetch(c, "BODYSTRUCTURE")
    assert (
        b'(("MESSAGE" "RFC822" NIL NIL NIL "BASE64" 26 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 0 0 NIL NIL NIL NIL) 1 NIL NIL NIL NIL) "MIXED"'
    ) in out


# --- line counts (RFC 2046 5.1.1) ------------------------------------------


def test_text_part_line_counts_leave_out_the_delimiters_line_end(h):
    c = session(h, LINES)
    out = fetch(c, "BODYSTRUCTURE BODY.PEEK[1] BODY.PEEK[2]")
    assert (
        b'BODYSTRUCTURE (("TEXT" "PLAIN" NIL NIL NIL "7BIT" 7 1 NIL NIL NIL NIL)'
        b'("TEXT" "PLAIN" ("charset" "utf-8") NIL NIL "7BIT" 8 1 NIL NIL NIL NIL) "MIXED"'
    ) in out
    assert literal("BODY[1]", b"hello\r\n") in out and literal("BODY[2]", b"one\r\ntwo") in out


def test_line_counts_of_a_single_part_and_of_a_last_line_without_end(h):
    c = session(
        h,
        crlf("Subject: one\n\nline 1\nline 2\n"),
        crlf("Subject: two\n\nline 1\nno end"),
        crlf('Subject: x\nContent-Type: multipart/mixed; boundary="Q"\n\n--Q\n\nend\n')
        + crlf("--Q\n\nno line end\n--Q--"),
    )
    assert b'"7BIT" 16 2 NIL NIL NIL NIL)' in fetch(c, "BODYSTRUCTURE", 1)
    assert b'"7BIT" 14 1 NIL NIL NIL NIL)' in fetch(c, "BODYSTRUCTURE", 2)
    out = fetch(c, "BODYSTRUCTURE", 3)
    assert b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 3 0 NIL NIL NIL NIL)' in out
    assert b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 11 0 NIL NIL NIL NIL) "MIXED"' in out


# --- ENVELOPE (RFC 3501 7.4.2) ---------------------------------------------


def envelope_of(h: Harness, header: str) -> bytes:
    c = session(h, crlf(header + "\nbody\n"))
    out = fetch(c, "ENVELOPE", "*")
    m = re.match(rb"\* \d+ FETCH \(ENVELOPE (.*)\)\r\nf OK", out, re.S)
    assert m, out
    return m.group(1)


def test_envelope_keeps_groups(h):
    env = envelope_of(
        h,
        "From: Ann <ann@example.org>\n"
        'To: team: a@x.org, "B B" <b@y.org>;, solo@z.org\n'
        "Cc: undisclosed-recipients:;\n"
        "Subject: groups\n",
    )
    assert env == (
        b'(NIL "groups" (("Ann" NIL "ann" "example.org")) (("Ann" NIL "ann" "example.org")) '
        b'(("Ann" NIL "ann" "example.org")) ((NIL NIL "team" NIL)(NIL NIL "a" "x.org")'
        b'("B B" NIL "b" "y.org")(NIL NIL NIL NIL)(NIL NIL "solo" "z.org")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) NIL NIL NIL)'
    )


def test_envelope_empty_sender_and_reply_to_are_the_from(h):
    env = envelope_of(h, "From: Ann <ann@example.org>\nSender:\nReply-To:   \nSubject: s\n")
    ann = b'(("Ann" NIL "ann" "example.org"))'
    assert env == b'(NIL "s" %s %s %s NIL NIL NIL NIL NIL)' % (ann, ann, ann)


def test_envelope_keeps_a_source_route(h):
    env = envelope_of(
        h,
        "From: Ann <@r1.org,@r2.org:ann@example.org>\nTo: <@relay.net:bob@example.net>\n"
        "Subject: route\n",
    )
    ann = b'(("Ann" "@r1.org,@r2.org" "ann" "example.org"))'
    assert env == (
        b'(NIL "route" %s %s %s ((NIL "@relay.net" "bob" "example.net")) NIL NIL NIL NIL)'
        % (ann, ann, ann)
    )


def test_envelope_missing_fields_are_nil_and_strings_quoted(h):
    env = envelope_of(h, "To: x@example.org\n")
    assert env == b'(NIL NIL NIL NIL NIL ((NIL NIL "x" "example.org")) NIL NIL NIL NIL)'
    env = envelope_of(
        h,
        'From: "Joe \\"Q\\" Public" <joe@example.org>\n'
        'To: "back\\\\slash" <b@x.org>, =?utf-8?q?J=C3=B6rg?= <j@example.org>\n'
        'Subject: =?utf-8?b?SGVsbG8=?= \t"quoted"\n  back\\slash\n'
        "Date: Mon,  1 Jan 2024\n  10:00:00 +0000\n"
        "Message-ID: <id@x>\nIn-Reply-To: <p@x>\n",
    )
    joe = b'(("Joe \\"Q\\" Public" NIL "joe" "example.org"))'
    assert env == (
        b'("Mon,  1 Jan 2024  10:00:00 +0000" "=?utf-8?b?SGVsbG8=?= \\"quoted\\" back\\\\slash" '
        b'%s %s %s (("back\\\\slash" NIL "b" "x.org")("=?utf-8?q?J=C3=B6rg?=" NIL "j" '
        b'"example.org")) NIL NIL "<p@x>" "<id@x>")' % (joe, joe, joe)
    )


# --- the same over a real socket, mbox store on disk -------------------------


class MimeStructureLoopbackTest(LoopbackIMAPCase):
    """The sections above, APPENDed and fetched over 127.0.0.1 from the mbox store."""

    def session(self, messages: list[bytes], commands: list[bytes]) -> list[bytes]:
        c = RawClient(self.port_number)
        try:
            c.login()
            for i, m in enumerate(messages):
                c.send(b"A%d APPEND INBOX {%d+}\r\n" % (i, len(m)) + m + b"\r\n")
                assert c.read_until(b"A%d" % i)[-1].startswith(b"A%d OK" % i)
            c.cmd(b"S", b"SELECT INBOX")
            return [b"".join(c.cmd(b"F%d" % i, x)) for i, x in enumerate(commands)]
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_rfc822_sections_and_line_counts(self):
        answers = yield self.in_thread(
            self.session,
            [TOP_RFC822, NESTED, LINES],
            [
                b"FETCH 1 (BODY.PEEK[1] BODY.PEEK[1.HEADER] BODY.PEEK[1.1] BODY.PEEK[1]<0.10>)",
                b"FETCH 2 (BODY.PEEK[2.HEADER] BODY.PEEK[2.1] BODYSTRUCTURE)",
                b"FETCH 3 (BODYSTRUCTURE)",
                b"FETCH 1:3 (RFC822.SIZE)",
            ],
        )
        first, second, third, sizes = answers
        self.assertIn(literal("BODY[1]", INNER), first)
        self.assertIn(literal("BODY[1.HEADER]", INNER_HEADER), first)
        self.assertIn(literal("BODY[1.1]", b"part one"), first)
        self.assertIn(literal("BODY[1]<0>", b"From: Inne"), first)
        self.assertIn(
            literal(
                "BODY[2.HEADER]",
                crlf(
                    "From: b@example.org\nSubject: fwd inner\n"
                    'Content-Type: multipart/alternative; boundary="YY"\n\n'
                ),
            ),
            second,
        )
        self.assertIn(literal("BODY[2.1]", b"plain one\r\nplain two"), second)
        self.assertIn(b'"7BIT" 20 1 NIL NIL NIL NIL)', second)
        self.assertIn(b' "ALTERNATIVE" ("boundary" "YY") NIL NIL NIL) 14 NIL', second)
        self.assertIn(b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 7 1 NIL NIL NIL NIL)', third)
        self.assertEqual(
            re.findall(rb"RFC822.SIZE (\d+)", sizes),
            [b"%d" % len(m) for m in (TOP_RFC822, NESTED, LINES)],
        )
        self.assertEqual(self.failures, [])
