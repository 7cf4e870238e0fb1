"""
FETCH answers compared with Dovecot's for the same messages: Dovecot's
imap process is run over its standard input (PREAUTH, no daemon, no
network) on an mbox in a temporary folder, and both answers are parsed
into nested lists so that the choices RFC 3501 leaves open do not count:

- a string may be quoted or a literal (Dovecot sends a literal for any
  string with a quote or backslash in it, we escape it);
- type, subtype and encoding names may be in either case (we send them in
  upper case, as RFC 3501's own examples do; Dovecot in lower case);
- a text part without a charset: Dovecot adds the RFC 2045 5.2 default
  ("charset" "us-ascii"), we give the parameters the message has.

Where we differ from Dovecot on purpose (sections of a part that does not
exist, or HEADER/TEXT of a part that is not message/rfc822: NIL here, an
empty string there), the items are not asked for.

Dovecot refuses to read mail as root, so as root the process runs as
nobody (setpriv) on a folder under /tmp that nobody can reach; the test
is skipped where Dovecot or setpriv is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_imap_envelope import CASES
from tests.test_imap_harness import Harness
from tests.test_imap_mime_structure import LINES, NESTED, TOP_RFC822, crlf

DOVECOT_IMAP = "/usr/lib/dovecot/imap"
NOBODY = 65534

pytestmark = pytest.mark.skipif(
    not os.path.exists(DOVECOT_IMAP) or (os.geteuid() == 0 and shutil.which("setpriv") is None),
    reason="needs Dovecot's imap (dovecot-imapd) and, as root, setpriv",
)

ITEMS = [
    "BODYSTRUCTURE",
    "BODY",
    "ENVELOPE",
    "RFC822.SIZE",
    "BODY.PEEK[1]",
    "BODY.PEEK[1.MIME]",
    "BODY.PEEK[TEXT]",
    "BODY.PEEK[1]<2.7>",
]
ITEMS_RFC822 = ["BODY.PEEK[1.HEADER]", "BODY.PEEK[1.TEXT]", "BODY.PEEK[1.1]", "BODY.PEEK[1.1.1]"]
ITEMS_NESTED = [
    "BODY.PEEK[2]",
    "BODY.PEEK[2.HEADER]",
    "BODY.PEEK[2.TEXT]",
    "BODY.PEEK[2.MIME]",
    "BODY.PEEK[2.1]",
    "BODY.PEEK[2.1.1]",
    "BODY.PEEK[2.HEADER.FIELDS (SUBJECT FROM)]",
]

B64_RFC822 = crlf(
    'Subject: b64\nContent-Type: multipart/mixed; boundary="Q"\n\n--Q\n'
    "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
    "RnJvbTogeEB5DQoNCmhpDQo=\n--Q\n"
    "Content-Type: message/rfc822\n\nSubject: deep\nContent-Type: message/rfc822\n\n"
    "Subject: deeper\nFrom: z@z.org\n\ndeep body\n--Q--\n"
)
DIGEST = crlf(
    'Subject: digest\nContent-Type: multipart/digest; boundary="D"\n\n--D\n\n'
    "Subject: d1\n\nd1 body\n--D\nContent-Type: text/plain\n\nnot a message\n--D--\n"
)
HEADERS = crlf(
    'From: "Joe \\"Q\\" Public" <joe@example.org>\n'
    'To: "back\\\\slash" <b@x.org>, team: a@x.org, "B B" <b@y.org>;, solo@z.org\n'
    "Cc: undisclosed-recipients:;\nSender:\nReply-To: <@r1.org,@r2.org:ann@example.org>\n"
    'Subject: =?utf-8?b?SGVsbG8=?= \t"quoted"\n  back\\slash\n'
    "Date: Mon,  1 Jan 2024\n  10:00:00 +0000\nMessage-ID: <id@x>\nIn-Reply-To: <p@x>\n\nbody\n"
)


# --- a small reader of IMAP data ---------------------------------------------

_TOKEN = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|\{(\d+)\}\r\n|([^\s()"{]+))', re.S)


def parse_fetch(data: bytes) -> dict[str, object]:
    """The items of one '* n FETCH (...)' response, keyed by upper-case name."""
    start = data.index(b"FETCH (") + len(b"FETCH ")
    value, _ = _read(data, start)
    assert isinstance(value, list)
    out: dict[str, object] = {}
    for name, item in zip(value[::2], value[1::2], strict=True):
        assert isinstance(name, str)
        out[re.sub(r"\.PEEK", "", name.upper())] = item
    return out


def _read(data: bytes, pos: int) -> tuple[object, int]:
    m = _TOKEN.match(data, pos)
    assert m, data[pos : pos + 50]
    if m.group(1):
        items: list[object] = []
        pos = m.end()
        while True:
            close = _TOKEN.match(data, pos)
            assert close
            if close.group(2):
                return items, close.end()
            item, pos = _read(data, pos)
            items.append(item)
    if m.group(3) is not None:
        return re.sub(rb"\\(.)", rb"\1", m.group(3)), m.end()
    if m.group(4) is not None:
        n = int(m.group(4))
        return data[m.end() : m.end() + n], m.end() + n
    atom = m.group(5).decode()
    if atom.upper().startswith("BODY[") and "]" not in atom:  # BODY[HEADER.FIELDS (A B)]
        end = data.index(b"]", m.end()) + 1
        tail = re.match(rb"<\d+>", data[end:])
        end += tail.end() if tail else 0
        atom = data[m.start(5) : end].decode()
        return atom, end
    return (None if atom == "NIL" else atom), m.end()


def normalized(value: object, structure: bool) -> object:
    """Case and the default charset made alike where RFC 3501 leaves them open."""
    if isinstance(value, list):
        if structure and value == [b"charset", b"us-ascii"]:
            return None
        return [normalized(v, structure) for v in value]
    if structure and isinstance(value, bytes):
        return value.lower()
    return value


# --- the two servers ---------------------------------------------------------


def dovecot_fetch(messages: list[bytes], items: list[str]) -> list[dict[str, object]]:
    """APPEND the messages to a fresh Dovecot mbox and FETCH the items of each."""
    as_root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="dovecot-cmp-") as top:
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
        script += b"S SELECT INBOX\r\n"
        for i in range(len(messages)):
            script += b"F%d FETCH %d (%s)\r\n" % (i, i + 1, " ".join(items).encode())
        script += b"Z LOGOUT\r\n"
        command = [DOVECOT_IMAP, "-c", str(root / "dovecot.conf")]
        if as_root:
            command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *command]
        env = {"USER": "cmp", "HOME": str(root), "PATH": os.environ.get("PATH", "")}
        done = subprocess.run(command, input=script, capture_output=True, env=env, timeout=60)
    out = done.stdout
    answers = []
    for i in range(len(messages)):
        start = out.index(b"* %d FETCH (" % (i + 1))
        assert b"\r\nF%d OK" % i in out, out[-500:]
        answers.append(parse_fetch(out[start:]))
    return answers


def our_fetch(tmp_path: Path, messages: list[bytes], items: list[str]) -> list[dict[str, object]]:
    h = Harness(tmp_path)
    for m in messages:
        h.deliver(m)
    c = h.connect()
    c.login()
    c.select()
    answers = []
    for i in range(len(messages)):
        out = c.cmd(f"f FETCH {i + 1} ({' '.join(items)})")
        assert out.endswith(b"f OK FETCH completed\r\n"), out
        answers.append(parse_fetch(out))
    return answers


def compare(tmp_path: Path, messages: list[bytes], items: list[str]) -> None:
    theirs = dovecot_fetch(messages, items)
    ours = our_fetch(tmp_path, messages, items)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.keys() == b.keys(), (i, a.keys(), b.keys())
        for name in a:
            structure = name in ("BODYSTRUCTURE", "BODY")
            assert normalized(a[name], structure) == normalized(b[name], structure), (
                i,
                name,
                a[name],
                b[name],
            )


def test_sections_and_structures_as_dovecot(tmp_path):
    compare(tmp_path, [TOP_RFC822], ITEMS + ITEMS_RFC822)
    compare(tmp_path / "2", [NESTED], ITEMS + ITEMS_NESTED + ["BODY.PEEK[2.2.MIME]"])
    compare(tmp_path / "3", [B64_RFC822], ITEMS + ITEMS_NESTED)
    compare(tmp_path / "4", [LINES], ITEMS + ["BODY.PEEK[2]", "BODY.PEEK[2.MIME]"])
    compare(tmp_path / "5", [DIGEST], ITEMS + ["BODY.PEEK[1.HEADER]", "BODY.PEEK[1.1]"])


def test_envelopes_as_dovecot(tmp_path):
    messages = [HEADERS] + [
        crlf("To: x@example.test\nSubject: s\n") + b"Cc: " + value + b"\r\n\r\nbody\r\n"
        for value, _ in CASES
        if value.strip(b" ,")
    ]
    compare(tmp_path, messages, ["ENVELOPE"])
