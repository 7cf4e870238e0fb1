"""
What a session that did not ENABLE UTF8=ACCEPT reads of a message with raw
UTF-8 headers (RFC 6532), compared byte for byte with Dovecot's answers on
the same mbox file, where a private Dovecot can run here
(tests/dovecot_peer.py); skipped otherwise. (Dovecot 2.3 does not offer
UTF8=ACCEPT, so only the sessions that keep modified UTF-7 compare.)
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailsrv.store.names import INBOX, folder_path
from tests import dovecot_peer
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient

MBOX = (
    "From jörg@exämple.org Thu Jan  1 00:00:00 2020\n"
    "From: Jörg <jörg@exämple.org>\nTo: ana@example.test, Grüße: b@c.d;\n"
    "Subject: Grüße aus Köln\nDate: Wed, 1 Jan 2020 00:00:00 +0000\n"
    "Message-ID: <1@exämple.org>\n\nüber\n\n"
).encode()

COMMANDS = [
    b"FETCH 1 (ENVELOPE)",
    b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])",
    b"SEARCH CHARSET UTF-8 SUBJECT {6+}\r\n" + "grüße".encode(),
    b"SEARCH CHARSET UTF-8 FROM {4+}\r\n" + "jörg".encode(),
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
            answers.append([b"".join(lines[:-1]), status])
        return answers
    finally:
        c.close()


class Utf8HeadersLikeDovecotTest(LoopbackIMAPCase):
    """Raw UTF-8 headers read by a session without UTF8=ACCEPT, as Dovecot answers."""

    timeout = 120

    def setUp(self) -> None:
        reason = dovecot_peer.available()
        if reason:
            raise unittest.SkipTest(reason)
        super().setUp()
        path = folder_path(self.config.mail_dir, "alice@example.test", INBOX)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(MBOX)
        self.dovecot = dovecot_peer.Dovecot()
        self.addCleanup(self.dovecot.stop)
        self.dovecot.start(MBOX)

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
