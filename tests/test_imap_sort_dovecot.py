"""
SORT and THREAD answers compared byte for byte with Dovecot's on the same
mbox file (tests/sort_corpus.py), where a private Dovecot can run here
(tests/dovecot_peer.py); skipped otherwise.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailsrv.store.names import INBOX, folder_path
from tests import dovecot_peer, sort_corpus
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient

COMMANDS = [
    b"SORT (ARRIVAL) UTF-8 ALL",
    b"SORT (REVERSE ARRIVAL) UTF-8 ALL",
    b"SORT (SUBJECT) UTF-8 ALL",
    b"SORT (REVERSE SUBJECT) UTF-8 ALL",
    b"SORT (DATE) UTF-8 ALL",
    b"SORT (REVERSE DATE) UTF-8 ALL",
    b"SORT (FROM) UTF-8 ALL",
    b"SORT (TO) UTF-8 ALL",
    b"SORT (CC) UTF-8 ALL",
    b"SORT (SIZE) UTF-8 ALL",
    b"SORT (DISPLAYFROM) UTF-8 ALL",
    b"SORT (DISPLAYTO) UTF-8 ALL",
    b"SORT (SUBJECT DATE) UTF-8 ALL",
    b"SORT (SUBJECT REVERSE DATE) UTF-8 ALL",
    b"SORT (REVERSE FROM SUBJECT) US-ASCII ALL",
    b"SORT (SUBJECT) UTF-8 FROM ann",
    b"SORT (DATE) UTF-8 NOT SUBJECT hello 3:20",
    b"UID SORT (REVERSE SIZE DATE) UTF-8 UID 2:*",
    b"SORT RETURN (MIN MAX COUNT ALL) (DATE) UTF-8 ALL",
    b"UID SORT RETURN (COUNT ALL) (SUBJECT) UTF-8 ALL",
    b"SORT RETURN () (FROM) UTF-8 SUBJECT hello",
    b"SORT RETURN (MIN MAX COUNT ALL) (DATE) UTF-8 SUBJECT nothing-matches",
    b"THREAD REFERENCES UTF-8 ALL",
    b"THREAD ORDEREDSUBJECT UTF-8 ALL",
    b"UID THREAD REFERENCES UTF-8 ALL",
    b"THREAD REFERENCES UTF-8 5:20",
    b"THREAD ORDEREDSUBJECT UTF-8 FROM ann",
]


def _answers(port: int, login: bytes) -> list[list[bytes]]:
    """Each command's untagged lines and the tagged status word, from a fresh session."""
    c = RawClient(port)
    try:
        out = c.cmd(b"L", login)
        assert out[-1].startswith(b"L OK"), out
        out = c.cmd(b"S", b"EXAMINE INBOX")
        assert out[-1].startswith(b"S OK"), out
        answers = []
        for i, command in enumerate(COMMANDS):
            tag = b"T%d" % i
            lines = c.cmd(tag, command)
            status = lines[-1].split(b" ")[1] if lines else b""
            answers.append([ln for ln in lines[:-1] if ln.startswith(b"* ")] + [status])
        return answers
    finally:
        c.close()


class SortLikeDovecotTest(LoopbackIMAPCase):
    """Our SORT/THREAD answers equal Dovecot's on the same mailbox."""

    timeout = 120

    def mailbox(self) -> bytes:
        return sort_corpus.mbox()

    def setUp(self) -> None:
        reason = dovecot_peer.available()
        if reason:
            raise unittest.SkipTest(reason)
        super().setUp()
        data = self.mailbox()
        path = folder_path(self.config.mail_dir, "alice@example.test", INBOX)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.dovecot = dovecot_peer.Dovecot()
        self.addCleanup(self.dovecot.stop)
        self.dovecot.start(data)

    @defer.inlineCallbacks
    def test_same_answers_as_dovecot(self):
        ours = yield self.in_thread(
            _answers, self.port_number, b'LOGIN alice@example.test "secret"'
        )
        theirs = yield self.in_thread(
            _answers,
            self.dovecot.port,
            b"LOGIN %s %s" % (dovecot_peer.USER.encode(), dovecot_peer.PASSWORD.encode()),
        )
        diffs = [
            (command, o, t) for command, o, t in zip(COMMANDS, ours, theirs, strict=True) if o != t
        ]
        for command, o, t in diffs:
            print(command, "\n  ours:   ", o, "\n  dovecot:", t)
        self.assertEqual(diffs, [])


class GeneratedMailboxLikeDovecotTest(SortLikeDovecotTest):
    """The same on 600 generated messages with real-looking threads."""

    def mailbox(self) -> bytes:
        return sort_corpus.generated_mbox(600)
