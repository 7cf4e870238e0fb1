"""
Reload end to end, the state sessions share across it: a real ``twistd -n
mailsrv`` with IMAP and POP3 sessions opened before a SIGHUP and others
after. A subscription, a flag change or an expunge made in one is seen by
the other (NOTIFY, NOOP), and two POP3 sessions on one maildrop still
exclude each other (RFC 1939 8: the maildrop lock).
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket

from tests.e2e import PASSWORD
from tests.test_reload_e2e import ALICE, hup, message, server


class Raw:
    """An IMAP client that sees every untagged line (NOTIFY's unasked ones too)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        assert self.file.readline().startswith(b"* OK")

    def cmd(self, tag: bytes, line: bytes) -> list[bytes]:
        self.sock.sendall(tag + b" " + line + b"\r\n")
        lines = []
        while True:
            got = self.file.readline()
            assert got, lines
            lines.append(got)
            if got.startswith(tag + b" "):
                assert got.startswith(tag + b" OK"), lines
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_imap_and_pop3_sessions_before_and_after_a_reload_share_their_state(tmp_path):
    with server(tmp_path) as srv:
        ports = srv.ports
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
            for _ in range(2):
                s.sendmail("bob@sender.test", [ALICE], message(300))
        before = Raw(ports["imap"])
        before.cmd(b"a1", f'LOGIN {ALICE} "{PASSWORD}"'.encode())
        before.cmd(b"a2", b"CREATE Work")
        before.cmd(b"a3", b"SELECT INBOX")
        before.cmd(b"a4", b"NOTIFY SET (personal (SubscriptionChange))")
        pop_before = poplib.POP3("127.0.0.1", ports["pop3"], timeout=30)
        pop_before.user(ALICE)
        pop_before.pass_(PASSWORD)

        hup(srv)

        after = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        after.login(ALICE, PASSWORD)
        assert after.select("INBOX") == ("OK", [b"2"])
        # RFC 5465 5.5: a subscription made after the reload, told to a session of before.
        assert after.subscribe("Work")[0] == "OK"
        assert before.file.readline() == b'* LIST (\\Subscribed \\NoInferiors) "/" Work\r\n'
        # A flag change and an expunge made before, seen after (RFC 3501 7.4.2, 7.4.1).
        before.cmd(b"a5", b"STORE 1 +FLAGS.SILENT (\\Flagged)")
        assert after.noop()[0] == "OK"
        assert any(b"\\Flagged" in r for r in after.response("FETCH")[1] if r)
        before.cmd(b"a6", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
        before.cmd(b"a7", b"EXPUNGE")
        assert after.noop()[0] == "OK"
        assert after.response("EXPUNGE")[1] == [b"2"]
        # RFC 1939 8: the maildrop locked by a POP3 session of before.
        pop_after = poplib.POP3("127.0.0.1", ports["pop3"], timeout=30)
        pop_after.user(ALICE)
        try:
            pop_after.pass_(PASSWORD)
            raise AssertionError("a second POP3 session opened a locked maildrop")
        except poplib.error_proto as e:
            assert b"IN-USE" in e.args[0] or b"lock" in e.args[0].lower(), e
        pop_after.close()
        pop_before.quit()
        after.logout()
        before.close()
