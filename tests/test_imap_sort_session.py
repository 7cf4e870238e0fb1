"""
SORT, THREAD, ESORT and their UID forms in a session: on the in-memory
store over StringTransport (the answers and errors, byte for byte), and on
the mbox store over loopback (the header keys read once, in the thread
pool, and not again for a second SORT).
"""

from __future__ import annotations

import threading

import pytest
from twisted.internet import defer

from mailsrv.spool import BytesSource
from mailsrv.store.mbox.view import MboxFolder
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER, Harness

MESSAGES = [
    b"From: Zed <zed@z.test>\nTo: amy@x.test\nSubject: Re: hello\n"
    b"Date: Mon, 1 Jan 2024 12:00:00 +0000\nMessage-ID: <2@x>\nReferences: <1@x>\n\nb\n",
    b"From: amy@x.test\nTo: Bob <bob@x.test>\nSubject: hello\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <1@x>\n\nbody\n",
    b'From: "Carl" <carl@x.test>\nCc: dan@x.test\nSubject: [list] other\nDate: bogus\n'
    b"Message-ID: <3@x>\n\nbody body\n",
    b"From: bob@x.test\nSubject: Re: other\nDate: Mon, 1 Jan 2024 09:00:00 -0500\n"
    b"Message-ID: <4@x>\nIn-Reply-To: <3@x>\n\nbody body body\n",
]


@pytest.fixture
def client(tmp_path):
    h = Harness(tmp_path)
    for m in MESSAGES:
        h.deliver(m)
    c = h.connect()
    c.login()
    c.select()
    return c


def test_capabilities_advertised(client):
    caps = client.cmd(b"c CAPABILITY").split(b"\r\n")[0].split()
    for cap in (b"SORT", b"SORT=DISPLAY", b"ESORT", b"THREAD=REFERENCES", b"THREAD=ORDEREDSUBJECT"):
        assert cap in caps


@pytest.mark.parametrize(
    "command,answer",
    [
        (b"SORT (SUBJECT) UTF-8 ALL", b"* SORT 1 2 3 4\r\n"),
        (b"SORT (SUBJECT REVERSE DATE) UTF-8 ALL", b"* SORT 1 2 4 3\r\n"),
        # Message 3's Date is invalid: its INTERNALDATE (2023-11-14) counts.
        (b"SORT (DATE) UTF-8 ALL", b"* SORT 3 2 1 4\r\n"),
        (b"SORT (REVERSE DATE) US-ASCII ALL", b"* SORT 4 1 2 3\r\n"),
        (b"SORT (FROM) UTF-8 ALL", b"* SORT 2 4 3 1\r\n"),
        (b"SORT (TO) UTF-8 ALL", b"* SORT 3 4 1 2\r\n"),
        (b"SORT (CC) UTF-8 ALL", b"* SORT 1 2 4 3\r\n"),
        (b"SORT (SIZE) UTF-8 ALL", b"* SORT 3 2 4 1\r\n"),
        (b"SORT (DISPLAYFROM) UTF-8 ALL", b"* SORT 2 4 3 1\r\n"),
        (b"SORT (DISPLAYTO) UTF-8 ALL", b"* SORT 3 4 1 2\r\n"),
        (b"SORT (ARRIVAL) UTF-8 ALL", b"* SORT 1 2 3 4\r\n"),
        (b'SORT (SUBJECT) "utf-8" OR FROM zed NOT 2:3', b"* SORT 1 4\r\n"),
        (b"SORT (DATE) UTF-8 HEADER Message-ID 3@x", b"* SORT 3\r\n"),
        (b"SORT (DATE) UTF-8 SUBJECT nothing", b"* SORT\r\n"),
        (
            b"SORT RETURN (MIN MAX COUNT ALL) (DATE) UTF-8 ALL",
            b'* ESEARCH (TAG "t") MIN 3 MAX 4 ALL 3,2,1,4 COUNT 4\r\n',
        ),
        (b"SORT RETURN () (SUBJECT) UTF-8 FROM bob", b'* ESEARCH (TAG "t") ALL 4\r\n'),
        (b"SORT RETURN (COUNT MIN) (DATE) UTF-8 TO nobody", b'* ESEARCH (TAG "t") COUNT 0\r\n'),
        (b"THREAD REFERENCES UTF-8 ALL", b"* THREAD (3 4)(2 1)\r\n"),
        (b"THREAD ORDEREDSUBJECT UTF-8 ALL", b"* THREAD (3 4)(2 1)\r\n"),
        (b"THREAD REFERENCES UTF-8 1:2", b"* THREAD (2 1)\r\n"),
        (b"THREAD REFERENCES UTF-8 SUBJECT nothing", b"* THREAD\r\n"),  # RFC 5256 4
    ],
)
def test_answers(client, command, answer):
    assert client.cmd(b"t " + command) == answer + command.split(b" ")[0].join(
        [b"t OK ", b" completed\r\n"]
    )


@pytest.mark.parametrize(
    "command,answer",
    [
        (b"SORT (ARRIVAL) KOI8-R ALL", b"t NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset"),
        (b"THREAD REFERENCES ISO-8859-1 ALL", b"t NO [BADCHARSET (UTF-8 US-ASCII)]"),
        (b"SORT (BOGUS) UTF-8 ALL", b"t BAD Illegal syntax: Unknown sort key BOGUS"),
        (b"SORT (REVERSE) UTF-8 ALL", b"t BAD"),
        (b"SORT DATE UTF-8 ALL", b"t BAD Illegal syntax: Missing sort criteria"),
        (b"SORT (DATE) UTF-8", b"t BAD"),
        (b"SORT (DATE)", b"t BAD"),
        (b"SORT (DATE) UTF-8 FOO", b"t BAD"),
        (b"SORT RETURN (PARTIAL 1:*) (DATE) UTF-8 ALL", b"t BAD"),  # RFC 5267 4.4: no "*"
        (b"THREAD SUBJECT UTF-8 ALL", b"t BAD Illegal syntax: Unknown thread algorithm"),
        (b"UID FROB 1", b"t BAD"),
    ],
)
def test_errors(client, command, answer):
    out = client.cmd(b"t " + command)
    assert out.startswith(answer), out
    assert out.count(b"\r\n") == 1


def test_uid_forms_answer_uids(client):
    assert b"t OK" in client.cmd(b"t STORE 1 +FLAGS (\\Deleted)")
    assert b"t OK" in client.cmd(b"t EXPUNGE")
    # Sequence numbers now run 1-3 for UIDs 2-4.
    assert client.cmd(b"t SORT (DATE) UTF-8 ALL").startswith(b"* SORT 2 1 3\r\n")
    assert client.cmd(b"t UID SORT (DATE) UTF-8 ALL").startswith(b"* SORT 3 2 4\r\n")
    assert client.cmd(b"t UID SORT RETURN (MIN MAX) (DATE) UTF-8 UID 2:3").startswith(
        b'* ESEARCH (TAG "t") UID MIN 3 MAX 2\r\n'
    )
    assert client.cmd(b"t UID THREAD REFERENCES UTF-8 ALL").startswith(b"* THREAD (3 4)(2)\r\n")
    assert client.cmd(b"t UID THREAD ORDEREDSUBJECT UTF-8 ALL").startswith(b"* THREAD (3 4)(2)\r\n")
    # The other UID commands are still there.
    assert client.cmd(b"t UID FETCH 2 UID") == b"* 1 FETCH (UID 2)\r\nt OK FETCH completed\r\n"
    assert client.cmd(b"t UID SEARCH ALL").startswith(b"* SEARCH 2 3 4\r\n")


def test_sort_needs_a_selected_mailbox(tmp_path):
    h = Harness(tmp_path)
    c = h.connect()
    c.login()
    assert c.cmd(b"t SORT (DATE) UTF-8 ALL").startswith(b"t BAD")
    assert c.cmd(b"t THREAD REFERENCES UTF-8 ALL").startswith(b"t BAD")


def test_charset_as_literal(client):
    client.send(b"t SORT (DATE) {5}\r\n")
    assert client.send(b"UTF-8 ALL\r\n") == b"* SORT 3 2 1 4\r\nt OK SORT completed\r\n"


class SortCacheLoopbackTest(LoopbackIMAPCase):
    """On the mbox store: headers read once, off the reactor thread; a second SORT reads none."""

    @defer.inlineCallbacks
    def test_second_sort_reads_no_header(self):
        for m in MESSAGES:
            yield self.store.deliver(USER, BytesSource(m), "s@example.test")
        reads: list[tuple[int, bool]] = []
        real = MboxFolder.read_headers
        main = threading.main_thread()

        def counted(folder, uid):
            reads.append((uid, threading.current_thread() is main))
            return real(folder, uid)

        self.patch(MboxFolder, "read_headers", counted)

        def session(port: int, commands: list[bytes]) -> list[list[bytes]]:
            c = RawClient(port)
            try:
                c.login()
                assert c.cmd(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
                return [c.cmd(b"T", cmd) for cmd in commands]
            finally:
                c.close()

        first = yield self.in_thread(
            session, self.port_number, [b"SORT (SUBJECT) UTF-8 ALL", b"SORT (FROM) UTF-8 ALL"]
        )
        self.assertEqual(first[0], [b"* SORT 1 2 3 4\r\n", b"T OK SORT completed\r\n"])
        self.assertEqual(first[1], [b"* SORT 2 4 3 1\r\n", b"T OK SORT completed\r\n"])
        self.assertEqual(sorted(uid for uid, _ in reads), [1, 2, 3, 4])
        self.assertFalse(any(on_main for _, on_main in reads))  # all in the pool
        # Another session, another command: the keys come from the cache.
        second = yield self.in_thread(
            session, self.port_number, [b"THREAD REFERENCES UTF-8 ALL", b"SORT (DATE) UTF-8 ALL"]
        )
        # Message 3's Date is invalid: its INTERNALDATE (today) puts its thread last.
        self.assertEqual(second[0], [b"* THREAD (2 1)(3 4)\r\n", b"T OK THREAD completed\r\n"])
        self.assertEqual(len(reads), 4)
        # A new message: only its header is read.
        yield self.store.deliver(
            USER, BytesSource(b"Subject: a new one\nFrom: a@x.test\n\nx\n"), "s@example.test"
        )
        third = yield self.in_thread(session, self.port_number, [b"SORT (SUBJECT) UTF-8 ALL"])
        self.assertEqual(third[0], [b"* SORT 5 1 2 3 4\r\n", b"T OK SORT completed\r\n"])
        self.assertEqual(sorted(uid for uid, _ in reads), [1, 2, 3, 4, 5])
        self.assertEqual(self.failures, [])
        yield self.settle()
