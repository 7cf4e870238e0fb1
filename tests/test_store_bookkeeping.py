"""
What the mbox bookkeeping fields (Status:, X-Status:, X-Keywords:, X-UID:,
X-IMAP:, X-IMAPbase:, Content-Length:, Lines:) do to mail that arrives: a
sender's own copies of them are dropped as the message is written, so they
set no flags (in mailsrv or in mutt); and the header block a session reads
is the one the scanner found, so BODY[HEADER] + BODY[TEXT] == BODY[].
Checked over SMTP and IMAP against the real daemon.
"""

from __future__ import annotations

import imaplib
import mailbox
import re
import shutil
import smtplib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from mailsrv.spool import BytesSource
from mailsrv.store import mboxfmt
from mailsrv.store.mbox import MboxMailStore
from tests.e2e import PASSWORD, MailServer
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool

ALICE = "alice@example.test"

# A sender's bookkeeping: with it a naive store would index \Seen \Deleted \Flagged.
FORGED = (
    b"Subject: invoice\r\n"
    b"Status: RO\r\n"
    b"X-Status: DF\r\n"
    b"X-Keywords: $Junk\r\n"
    b"  $More\r\n"
    b"Message-ID: <forged@x>\r\n"
    b"X-UID: 99\r\n"
    b"Content-Length: 3\r\n"
    b"Lines: 1\r\n"
    b"X-IMAPbase: 1 2\r\n"
    b"X-Other: kept\r\n"
    b"\r\n"
    b"From the body, quoted in the file\r\n"
    b">From already quoted\r\n"
    b"Status: RO stays: a body line\r\n"
)
SHOWN = (
    b"Subject: invoice\r\n"
    b"Message-ID: <forged@x>\r\n"
    b"X-Other: kept\r\n"
    b"\r\n"
    b"From the body, quoted in the file\r\n"
    b">From already quoted\r\n"
    b"Status: RO stays: a body line\r\n"
)
_BOOKKEEPING = re.compile(
    rb"(?im)^(status|x-status|x-keywords|x-uid|x-imap|x-imapbase|content-length|lines)\s*:"
)


def _fetch(imap, uid: str, what: str) -> tuple[str, list[bytes]]:
    """The FETCH response's text (flags, size) and its literals in order."""
    typ, data = imap.uid("FETCH", uid, f"({what})")
    assert typ == "OK", data
    text, literals = [], []
    for item in data:
        if isinstance(item, tuple):
            text.append(item[0].decode())
            literals.append(item[1])
        else:
            text.append(item.decode())
    return " ".join(text), literals


def _flags(text: str) -> set[str]:
    return set(re.search(r"FLAGS \(([^)]*)\)", text).group(1).split())


def _headers_of_file(path) -> list[bytes]:
    """Each message's header block as the file holds it (what mutt reads)."""
    data = path.read_bytes()
    return [m.split(b"\n\n", 1)[0] for m in re.split(rb"(?m)^From ", data)[1:]]


def test_sender_sets_no_flags_over_smtp_and_append(tmp_path):
    with MailServer(tmp_path) as srv:
        srv.add_user(ALICE)
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            s.sendmail("bob@example.test", [ALICE], FORGED)
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        try:
            imap.login(ALICE, PASSWORD)
            typ, _ = imap.append("INBOX", r"(\Flagged)", None, FORGED)
            assert typ == "OK"
            imap.select("INBOX")
            smtp_text, smtp_lits = _fetch(imap, "1", "FLAGS RFC822.SIZE BODY.PEEK[]")
            app_text, app_lits = _fetch(imap, "2", "FLAGS RFC822.SIZE BODY.PEEK[]")
        finally:
            imap.logout()
        inbox = srv.inbox(ALICE)
        heads = _headers_of_file(inbox)
        box = mailbox.mbox(str(inbox))
        mutt_view = [m.get_flags() for m in box]
        box.close()
        raw = inbox.read_bytes()
    # \Recent: the session is the first to see both (RFC 3501 2.3.2); not a stored flag
    assert _flags(smtp_text) == {r"\Recent"}
    assert _flags(app_text) == {r"\Flagged", r"\Recent"}
    for text, lits in ((smtp_text, smtp_lits), (app_text, app_lits)):
        body = lits[0]
        assert int(re.search(r"RFC822.SIZE (\d+)", text).group(1)) == len(body)
        assert body.endswith(SHOWN), body
    # the file does not carry the sender's bookkeeping either (mutt reads no flags)
    assert len(heads) == 2
    for head in heads:
        # only our own padding, a blank X-Keywords: (later flag writes take bytes from it)
        head = re.sub(rb"(?m)^X-Keywords: {%d}$" % mboxfmt.PADDING, b"", head, count=1)
        assert _BOOKKEEPING.search(head) is None, head
        assert b"X-Other: kept" in head
    assert mutt_view == ["", ""]
    # mboxrd quoting of the body as before
    assert raw.count(b"\n>From the body, quoted in the file\n") == 2
    assert raw.count(b"\n>>From already quoted\n") == 2
    assert raw.count(b"\nStatus: RO stays: a body line\n") == 2


_PAD = b"".join(b"X-Pad-%d: %s\r\n" % (k, b"p" * 70) for k in range(3700))  # ~300 KB
ODD_HEADERS = [
    # the header block ends after 256 KB (the scanner's reach): no end of header is seen
    b"Subject: big header\r\n" + _PAD + b"Status: RO\r\n\r\nbody text here\r\n",
    # no header fields at all: the blank line comes first; the rest is body
    b"\r\nStatus: RO\r\nX-Status: D\r\nbody after\r\n\r\nsecond paragraph\r\n",
    # a header and no body
    b"Subject: only a header\r\nX-Other: 1\r\n",
]


def test_header_and_text_make_up_the_message(tmp_path):
    with MailServer(tmp_path) as srv:
        srv.add_user(ALICE)
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        try:
            imap.login(ALICE, PASSWORD)
            for data in ODD_HEADERS:
                assert imap.append("INBOX", None, None, data)[0] == "OK"
            # the same written by another program (mboxo, its bookkeeping kept in the file)
            with open(srv.inbox(ALICE), "ab") as fh:
                for data in ODD_HEADERS:
                    fh.write(
                        b"From a@x Mon Jan  1 00:00:00 2024\n"
                        + data.replace(b"\r\n", b"\n")
                        + b"\n"
                    )
            imap.select("INBOX")
            got = {}
            for uid in range(1, 2 * len(ODD_HEADERS) + 1):
                got[uid] = _fetch(
                    imap,
                    str(uid),
                    "RFC822.SIZE BODY.PEEK[] BODY.PEEK[HEADER] BODY.PEEK[TEXT] RFC822.HEADER",
                )
        finally:
            imap.logout()
    for uid, (text, (full, header, body, rfc822_header)) in got.items():
        assert int(re.search(r"RFC822.SIZE (\d+)", text).group(1)) == len(full), uid
        assert header + body == full, (uid, header[-60:], body[:60])
        assert rfc822_header == header, uid
    # no header fields: BODY[HEADER] is the blank line, the body lines are not taken for fields
    for uid in (2, 5):
        full, header, body, _ = got[uid][1]
        assert header == b"\r\n"
        assert body == ODD_HEADERS[1][2:]
    # a header and no body: all of it is header
    for uid in (3, 6):
        assert got[uid][1][1] == ODD_HEADERS[2]
        assert got[uid][1][2] == b""


_PIECES = [
    b"Status: RO\r\n",
    b"X-Status: DF\n",
    b"status :R\n",
    b" folded\n",
    b"Lines: 3\n",
    b"Subject: s\n",
    b"From x\n",
    b">From y\n",
    b"\n",
    b"\r\n",
    b"\r",
    b"body",
    b"\n\n",
]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(hst.lists(hst.lists(hst.sampled_from(_PIECES), max_size=25).map(b"".join), max_size=4))
def test_delivered_messages_read_consistently(messages):
    """Whatever a delivered message holds: no flags, and size, header and text agree."""
    root = Path(tempfile.mkdtemp())
    try:
        store = MboxMailStore(
            root / "mail", root / "index", SyncReactor(), SyncThreadPool(), clock=lambda: NOW
        )
        for data in messages:
            d = store.deliver(USER, BytesSource(data), "s@x")
            assert d.called
        for cold in (False, True):
            if cold:  # the same file indexed afresh, as another program's
                store = MboxMailStore(
                    root / "mail",
                    root / "index2",
                    SyncReactor(),
                    SyncThreadPool(),
                    clock=lambda: NOW,
                )
            out: list = []
            store.open_folder(USER, "INBOX").addBoth(out.append)
            folder = out[0]
            infos = folder.messages()
            assert len(infos) == len(messages)
            for info in infos:
                assert info.flags == frozenset()
                with folder.open_message(info.uid) as fh:
                    full = fh.read()
                assert len(full) == info.size
                assert full.startswith(folder.read_headers(info.uid))
            folder.close()
    finally:
        shutil.rmtree(root, True)
