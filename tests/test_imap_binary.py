"""
FETCH BINARY[section], BINARY.PEEK, BINARY.SIZE and APPEND of a literal8
(RFC 3516): the decoders fed in chunks, the answers compared byte for byte
with Dovecot's for the same messages, and the mbox store over loopback (a
large attachment streamed while the server goes on serving, a message with
NUL octets stored and read back as sent).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from mailsrv.imap import binary
from mailsrv.spool import BytesSource
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER, Harness

DOVECOT_IMAP = "/usr/lib/dovecot/imap"
NOBODY = 65534
needs_dovecot = pytest.mark.skipif(
    not os.path.exists(DOVECOT_IMAP) or (os.geteuid() == 0 and shutil.which("setpriv") is None),
    reason="needs Dovecot's imap (dovecot-imapd) and, as root, setpriv",
)


def crlf(s: str | bytes) -> bytes:
    b = s.encode("latin-1") if isinstance(s, str) else s
    return b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


NUL_DATA = b"ab\x00cd" * 3
MIXED = crlf(
    b'Subject: mixed\nContent-Type: multipart/mixed; boundary="Q"\n\npreamble\n--Q\n'
    b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
    b"h=C3=A9llo=\n world=3D  \nsoft=\n line \n--Q\n"
    b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: BASE64\n\n"
    + base64.encodebytes(NUL_DATA)
    + b"--Q\nContent-Type: message/rfc822\n\nSubject: in\nContent-Transfer-Encoding: base64\n"
    b"X-After: kept\n\naGVsbG8=\n--Q\n"
    b"Content-Type: text/plain\nContent-Transfer-Encoding: 8bit\n\nplain \xe9 text\n--Q\n"
    b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    b"aGVs\r\n bG8h\n\n--Q--\nepilogue\n"
)
PLAIN = crlf("Subject: plain\n\nhello\nworld\n")
TOP_BASE64 = crlf(
    "Subject: top\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
    + base64.encodebytes(b"top level text\r\nline two\r\n").decode()
)
UNKNOWN = crlf(
    'Subject: unknown\nContent-Type: multipart/mixed; boundary="U"\n\n--U\n'
    "Content-Transfer-Encoding: x-uuencode\n\nbegin 644 x\n--U\n"
    "Content-Transfer-Encoding: 7bit\n\nfine\n--U--\n"
)
INVALID = crlf("Subject: bad\nContent-Transfer-Encoding: base64\n\naGVs bG8=\n!!!\n")

# (message index, FETCH items) asked of both servers
COMMANDS = [
    (1, "BINARY.PEEK[1] BINARY.PEEK[2] BINARY.SIZE[2]"),
    (1, "BINARY.PEEK[3] BINARY.SIZE[3] BINARY.PEEK[3.1]"),
    (1, "BINARY.PEEK[4] BINARY.SIZE[4] BINARY.PEEK[5] BINARY.SIZE[5]"),
    (1, "BINARY.PEEK[] BINARY.SIZE[]"),
    (1, "BINARY.PEEK[2]<2.3> BINARY.PEEK[1]<0.3> BINARY.PEEK[2]<14.10> BINARY.PEEK[2]<99.1>"),
    (1, "BINARY.PEEK[9] BINARY.SIZE[9] BINARY.PEEK[1.1]"),
    (2, "BINARY.PEEK[] BINARY.PEEK[1] BINARY.SIZE[1] BINARY.SIZE[]"),
    (3, "BINARY.PEEK[] BINARY.SIZE[] BINARY.PEEK[1] BINARY.SIZE[1]"),
    (4, "BINARY.PEEK[2]"),
    (4, "BINARY.PEEK[2] BINARY.PEEK[1]"),
    (4, "BINARY.PEEK[1]"),
    (5, "BINARY.PEEK[1]"),
]
MESSAGES = [MIXED, PLAIN, TOP_BASE64, UNKNOWN, INVALID]


def _answers(out: bytes, tags: list[bytes]) -> list[bytes]:
    """Each command's answer: its untagged lines as sent, and the tagged status and code."""
    found = []
    for tag in tags:
        m = re.search(rb"\r\n%s (OK|NO|BAD)( \[[^\]]*\])?[^\r]*\r\n" % tag, out)
        assert m, out[-400:]
        found.append((m.start() + 2, m.end(), m.group(1) + (m.group(2) or b"")))
    answers = []
    prev = 0
    for start, end, status in found:
        untagged = out[prev:start]
        answers.append(untagged[untagged.find(b"* ") :] + status)
        prev = end
    return answers


def dovecot_answers(messages: list[bytes], commands: list[tuple[int, str]]) -> list[bytes]:
    """
    APPEND the messages to a fresh Dovecot mbox (imap over stdin, PREAUTH)
    and run each FETCH in a process of its own (over stdin Dovecot answers
    pipelined commands out of order).
    """
    return [_dovecot_run(messages, n, items) for n, items in commands]


def _dovecot_run(messages: list[bytes], n: int, items: str) -> bytes:
    as_root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="dovecot-bin-") as top:
        root = Path(top)
        (root / "mail").mkdir()
        (root / "index").mkdir()
        (root / "inbox").touch()
        uid = NOBODY if as_root else os.geteuid()
        gid = NOBODY if as_root else os.getegid()
        (root / "dovecot.conf").write_text(
            f"base_dir = {root}/run\nlog_path = {root}/log\nssl = no\n"
            f"mail_location = mbox:{root}/mail:INBOX={root}/inbox:INDEX={root}/index\n"
            f"mail_uid = {uid}\nmail_gid = {gid}\nfirst_valid_uid = 1\nfirst_valid_gid = 1\n"
            "mbox_read_locks = fcntl\nmbox_write_locks = fcntl\n"
        )
        if as_root:
            os.chmod(root, 0o755)
            for p in [root, *root.iterdir()]:
                os.chown(p, uid, gid)
        script = b""
        for i, m in enumerate(messages):
            script += b"A%d APPEND INBOX {%d+}\r\n%s\r\n" % (i, len(m), m)
        script += b"S EXAMINE INBOX\r\nF0 FETCH %d (%s)\r\nZ LOGOUT\r\n" % (n, items.encode())
        command = [DOVECOT_IMAP, "-c", str(root / "dovecot.conf")]
        if as_root:
            command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *command]
        env = {"USER": "cmp", "HOME": str(root), "PATH": os.environ.get("PATH", "")}
        done = subprocess.run(command, input=script, capture_output=True, env=env, timeout=60)
    out = done.stdout
    return _answers(out[out.index(b"\r\nS OK") :], [b"F0"])[0]


def our_answers(
    tmp_path: Path, messages: list[bytes], commands: list[tuple[int, str]]
) -> list[bytes]:
    h = Harness(tmp_path)
    for m in messages:
        h.deliver(m)
    c = h.connect()
    c.login()
    c.cmd("S EXAMINE INBOX")
    out = b"\r\n"
    for i, (n, items) in enumerate(commands):
        out += c.cmd(f"F{i} FETCH {n} ({items})")
    return _answers(out, [b"F%d" % i for i in range(len(commands))])


# --- what a client sees ---------------------------------------------------------


@pytest.fixture
def ours(tmp_path):
    return our_answers(tmp_path, MESSAGES, COMMANDS)


def test_quoted_printable_and_base64_parts_are_decoded_with_literal8(ours):
    # RFC 3516 4.3: a literal8 for decoded data (as Dovecot: whenever something was decoded)
    assert ours[0] == (
        b"* 1 FETCH (BINARY[1] ~{24}\r\nh\xc3\xa9llo world=\r\nsoft line"
        b" BINARY[2] ~{15}\r\n" + NUL_DATA + b" BINARY.SIZE[2] 15)\r\nOK"
    )


def test_binary_size_is_the_length_of_the_decoded_literal(tmp_path):
    # Dovecot answers 19 here, not the length of its own BINARY[1] literal.
    (answer,) = our_answers(tmp_path, [MIXED], [(1, "BINARY.SIZE[1] BINARY.SIZE[]")])
    assert answer == b"* 1 FETCH (BINARY.SIZE[1] 24 BINARY.SIZE[] 577)\r\nOK"


def test_message_rfc822_part_says_its_content_is_binary(ours):
    assert ours[1] == (
        b"* 1 FETCH (BINARY[3] ~{70}\r\nSubject: in\r\nX-After: kept\r\n"
        b"Content-Transfer-Encoding: binary\r\n\r\nhello BINARY.SIZE[3] 70 BINARY[3.1] ~{5}\r\n"
        b"hello)\r\nOK"
    )


def test_an_unencoded_part_is_a_plain_literal_and_base64_across_lines_decodes(ours):
    assert ours[2] == (
        b"* 1 FETCH (BINARY[4] {12}\r\nplain \xe9 text BINARY.SIZE[4] 12 "
        b"BINARY[5] ~{6}\r\nhello! BINARY.SIZE[5] 6)\r\n"
        b"OK"
    )


def test_whole_multipart_message_has_every_encoded_part_decoded(ours):
    assert b"\r\n--Q\r\nContent-Type: application/octet-stream\r\n" in ours[3]
    assert b"Content-Transfer-Encoding: binary\r\n\r\n" + NUL_DATA + b"\r\n--Q\r\n" in ours[3]
    assert b"base64" not in ours[3].lower()
    assert ours[3].startswith(b"* 1 FETCH (BINARY[] ~{577}\r\nSubject: mixed\r\n")
    assert ours[3].endswith(b"--Q--\r\nepilogue\r\n BINARY.SIZE[] 577)\r\nOK")


def test_partial_and_missing_parts(ours):
    assert ours[4] == (
        b"* 1 FETCH (BINARY[2]<2> ~{3}\r\n\x00cd BINARY[1]<0> ~{3}\r\nh\xc3\xa9 "
        b"BINARY[2]<14> ~{1}\r\nd BINARY[2]<99> ~{0}\r\n)\r\nOK"
    )
    # a part that does not exist is empty, as Dovecot answers
    assert ours[5].startswith(b"* 1 FETCH (BINARY[9] {0}\r\n BINARY.SIZE[9] 0 BINARY[1.1] ~{24}")


def test_a_message_with_nothing_encoded_is_a_plain_literal(ours):
    assert ours[6] == (
        b"* 2 FETCH (BINARY[] {32}\r\nSubject: plain\r\n\r\nhello\r\nworld\r\n "
        b"BINARY[1] {14}\r\nhello\r\nworld\r\n BINARY.SIZE[1] 14 BINARY.SIZE[] 32)\r\nOK"
    )


def test_whole_message_of_a_single_base64_part(ours):
    body = b"top level text\r\nline two\r\n"
    header = (
        b"Subject: top\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    )
    assert ours[7] == (
        b"* 3 FETCH (BINARY[] ~{%d}\r\n%s%s BINARY.SIZE[] %d BINARY[1] ~{%d}\r\n%s "
        b"BINARY.SIZE[1] %d)\r\nOK"
        % (len(header + body), header, body, len(header + body), len(body), body, len(body))
    )


def test_unknown_encoding_is_no_unknown_cte_after_what_was_answered(ours):
    # RFC 3516 4.2; the response so far is closed and the command ends, as Dovecot does
    assert ours[8] == b"* 4 FETCH (BINARY[2] {4}\r\nfine)\r\nOK"
    assert ours[9] == b"* 4 FETCH (BINARY[2] {4}\r\nfine)\r\nNO [UNKNOWN-CTE]"
    assert ours[10] == b"* 4 FETCH (UID 4)\r\nNO [UNKNOWN-CTE]"
    assert ours[11] == b"* 5 FETCH (UID 5)\r\nNO [PARSE]"


def test_fetch_stops_at_the_first_message_refused(tmp_path):
    h = Harness(tmp_path)
    for m in (PLAIN, UNKNOWN, PLAIN):
        h.deliver(m)
    c = h.connect()
    c.login()
    c.select()
    out = c.cmd("f FETCH 1:3 (BINARY.SIZE[1] BINARY[1])")
    assert out.startswith(b"* 1 FETCH (BINARY.SIZE[1] 14 BINARY[1] {14}\r\nhello\r\nworld\r\n")
    assert b"* 2 FETCH (UID 2)\r\nf NO [UNKNOWN-CTE] Unknown Content-Transfer-Encoding\r\n" in out
    assert b"* 3 FETCH" not in out
    # BINARY (not .PEEK) marks the message read, as BODY[] does
    assert b"\\Seen" in c.cmd("g FETCH 1 FLAGS")


@pytest.mark.parametrize(
    "items",
    [
        "BINARY[TEXT]",
        "BINARY[1.MIME]",
        "BINARY[HEADER]",
        "BINARY[0]",
        "BINARY[1.]",
        "BINARY.SIZE[1]<0.5>",
        "BINARY[1]<0.0>",
        "BINARY.PEEK",
    ],
)
def test_sections_rfc3516_does_not_define_are_bad(tmp_path, items):
    # RFC 3516 4.1: section-binary = "[" [section-part] "]"
    h = Harness(tmp_path)
    h.deliver(PLAIN)
    c = h.connect()
    c.login()
    c.select()
    assert c.cmd(f"f FETCH 1 ({items})").startswith(b"f BAD ")


@needs_dovecot
def test_answers_are_dovecots_byte_for_byte(ours):
    theirs = dovecot_answers(MESSAGES, COMMANDS)
    for (n, items), mine, dovecot in zip(COMMANDS, ours, theirs, strict=True):
        assert mine == dovecot, (n, items)


# --- the decoders, fed in any chunks -------------------------------------------


def _decode_in_chunks(dec: object, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    prev = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        out += dec.feed(data[prev:cut])  # type: ignore[attr-defined]
        prev = cut
    return out + dec.finish()  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=8))
def test_base64_decoded_in_any_chunks_is_the_data(data, cuts):
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    assert _decode_in_chunks(binary.Base64Decoder(), encoded, cuts) == data


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=3000).map(lambda d: d.replace(b"\r", b"")),  # a bare CR is refused
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_quoted_printable_decoded_in_any_chunks_is_the_one_pass_decoding(data, cuts):
    import quopri

    encoded = quopri.encodestring(data).replace(b"\n", b"\r\n")
    one_pass = _decode_in_chunks(binary.QuotedPrintableDecoder(), encoded, [])
    assert _decode_in_chunks(binary.QuotedPrintableDecoder(), encoded, cuts) == one_pass
    assert one_pass == data.replace(b"\n", b"\r\n")


def test_base64_with_octets_outside_the_alphabet_is_invalid():
    with pytest.raises(binary.InvalidData):
        binary.Base64Decoder().feed(b"aGVs*bG8=")


# --- over loopback, the mbox store on disk ---------------------------------------


def _read_literal(c: RawClient) -> tuple[bytes, bytes]:
    """The line announcing a literal, and the literal's octets."""
    head = c.file.readline()
    m = re.search(rb"~?\{(\d+)\}\r\n$", head)
    assert m, head
    return head, c.file.read(int(m.group(1)))


class BinaryLoopbackTest(LoopbackIMAPCase):
    """BINARY from the mbox store over 127.0.0.1."""

    @defer.inlineCallbacks
    def test_large_attachment_streams_decoded_while_another_session_is_served(self):
        payload = os.urandom(3 * 1024 * 1024)
        message = crlf(
            'Subject: big\nContent-Type: multipart/mixed; boundary="B"\n\n--B\n\ntext\n--B\n'
            "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        )
        message += base64.encodebytes(payload).replace(b"\n", b"\r\n") + b"--B--\r\n"
        yield self.store.deliver(USER, BytesSource(message), "s@example.test", "INBOX")

        def client() -> dict[str, object]:
            seen: dict[str, object] = {}
            slow = RawClient(self.port_number, rcvbuf=16 * 1024)
            other = RawClient(self.port_number)
            try:
                slow.login()
                select = b"".join(slow.cmd(b"S", b"SELECT INBOX"))
                seen["validity"] = int(re.search(rb"UIDVALIDITY (\d+)", select).group(1))
                slow.send(b"F FETCH 1 (BINARY.PEEK[2])\r\n")
                head = slow.file.readline()
                seen["head"] = head
                # The first session does not read its answer: the server still serves others.
                other.login()
                seen["other"] = other.cmd(b"N", b"NOOP")[-1]
                m = re.search(rb"\{(\d+)\}\r\n$", head)
                assert m, head
                digest = hashlib.sha256()
                left = int(m.group(1))
                while left:
                    chunk = slow.file.read(min(left, 1 << 20))
                    assert chunk
                    digest.update(chunk)
                    left -= len(chunk)
                seen["digest"] = digest.digest()
                seen["tail"] = slow.read_until(b"F")
                seen["size"] = slow.cmd(b"Z", b"FETCH 1 (BINARY.SIZE[2] BINARY.SIZE[])")
            finally:
                slow.close()
                other.close()
            return seen

        seen = yield self.in_thread(client)
        yield self.settle()
        self.assertEqual(seen["head"], b"* 1 FETCH (BINARY[2] ~{%d}\r\n" % len(payload))
        self.assertTrue(seen["other"].startswith(b"N OK"))
        self.assertEqual(seen["digest"], hashlib.sha256(payload).digest())
        self.assertEqual(seen["tail"], [b")\r\n", b"F OK FETCH completed\r\n"])
        self.assertIn(b"BINARY.SIZE[2] %d " % len(payload), seen["size"][0])
        # The decoded sizes are kept with the cached MIME structure, not decoded again.
        root = self.factory.structures.get((USER, "INBOX", seen["validity"], 1))
        self.assertEqual(root.binary[(2,)], (len(payload), True))
        self.assertIn((), root.binary)
        self.assertEqual(self.failures, [])

    @defer.inlineCallbacks
    def test_append_of_a_literal8_with_nul_is_stored_as_sent(self):
        message = crlf(b"Subject: nul\n\nbefore\x00after \xff\nFrom the start\n\x00\n")

        def client() -> list[bytes]:
            c = RawClient(self.port_number)
            try:
                c.login()
                c.send(b"A APPEND INBOX ~{%d}\r\n" % len(message))
                cont = c.file.readline()
                c.send(message + b"\r\n")
                first = c.read_until(b"A")
                c.send(b"B APPEND INBOX (\\Seen) ~{%d+}\r\n" % len(message) + message + b"\r\n")
                second = c.read_until(b"B")
                c.cmd(b"S", b"SELECT INBOX")
                c.send(b"F FETCH 1:2 (BINARY.PEEK[] BODY.PEEK[1])\r\n")
                fetched = []
                for _ in range(2):
                    fetched.append(_read_literal(c))
                    fetched.append(_read_literal(c))
                    c.file.readline()
                return [
                    cont,
                    first[-1],
                    second[-1],
                    *[x for pair in fetched for x in pair],
                    c.read_until(b"F")[-1],
                ]
            finally:
                c.close()

        out = yield self.in_thread(client)
        yield self.settle()
        self.assertTrue(out[0].startswith(b"+ "))
        self.assertTrue(out[1].startswith(b"A OK [APPENDUID "))
        self.assertTrue(out[2].startswith(b"B OK [APPENDUID "))
        for i in (0, 1):
            head, data, _, part = out[3 + 4 * i : 7 + 4 * i]
            self.assertEqual(head, b"* %d FETCH (BINARY[] ~{%d}\r\n" % (i + 1, len(message)))
            self.assertEqual(data, message)
            self.assertEqual(part, b"before\x00after \xff\r\nFrom the start\r\n\x00\r\n")
        self.assertTrue(out[-1].startswith(b"F OK"))
        # On disk: an mbox (LF line ends, "From " quoted) with the NUL octets as they came.
        mbox = (self.config.mail_dir / "example.test" / "alice" / "INBOX").read_bytes()
        self.assertEqual(mbox.count(b"\nbefore\x00after \xff\n>From the start\n\x00\n"), 2)
        self.assertEqual(self.failures, [])


def test_binary_is_advertised(tmp_path):
    c = Harness(tmp_path).connect()
    c.login()
    caps = c.cmd("c CAPABILITY").split(b"\r\n")[0].split()
    assert b"BINARY" in caps


# Bodies Dovecot decodes or refuses (NO [PARSE]); ours must do the same.
EDGES = [
    (b"quoted-printable", b"a=zzb\r\n", None),
    (b"quoted-printable", b"lower=c3=a9 x\r\n", b"lower\xc3\xa9 x\r\n"),
    (b"quoted-printable", b"tab\t \r\nend=", b"tab\r\nend"),
    (b"quoted-printable", b"a=4", None),
    (b"quoted-printable", b"=\r\n=\r\nx=20\r\n", b"x \r\n"),
    (b"quoted-printable", b"a\rb\r\n", None),
    (b"base64", b"aGVsbG8=aGVsbG8=", None),
    (b"base64", b"aGV\r\nsbA=\r\n=\r\n", b"hell"),
    (b"base64", b"====", None),
    (b"base64", b"aGVsbG8=\r\n\r\n   \r\n", b"hello"),
]
EDGE_MESSAGES = [
    b"Subject: e\r\nContent-Transfer-Encoding: %s\r\n\r\n%s" % (cte, body) for cte, body, _ in EDGES
]
EDGE_COMMANDS = [(i + 1, "BINARY.PEEK[1]") for i in range(len(EDGES))]


def test_malformed_bodies_are_no_parse_and_odd_ones_decode(tmp_path):
    answers = our_answers(tmp_path, EDGE_MESSAGES, EDGE_COMMANDS)
    for i, ((_, _, decoded), answer) in enumerate(zip(EDGES, answers, strict=True)):
        if decoded is None:
            assert answer == b"* %d FETCH (UID %d)\r\nNO [PARSE]" % (i + 1, i + 1)
        else:
            assert answer == b"* %d FETCH (BINARY[1] ~{%d}\r\n%s)\r\nOK" % (
                i + 1,
                len(decoded),
                decoded,
            )


@needs_dovecot
def test_malformed_bodies_as_dovecot(tmp_path):
    ours = our_answers(tmp_path, EDGE_MESSAGES, EDGE_COMMANDS)
    assert ours == dovecot_answers(EDGE_MESSAGES, EDGE_COMMANDS)
