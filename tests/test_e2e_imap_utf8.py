"""
End to end, UTF-8 headers (RFC 6532) from SMTP to IMAP: a real ``twistd -n
mailsrv`` on loopback takes a message with SMTPUTF8 (RFC 6531), and both an
IMAP session that enabled UTF8=ACCEPT (RFC 6855) and one that did not read
it back as it was sent; a folder one made with a UTF-8 name is the other's
folder in modified UTF-7.
"""

from __future__ import annotations

import smtplib
import socket

import pytest

from tests.e2e import PASSWORD, MailServer

USER = "ana@example.test"
SUBJECT = "Grüße aus Köln".encode()
MESSAGE = (
    "From: Jörg <jörg@exämple.org>\r\nTo: ana@example.test\r\n"
    "Subject: Grüße aus Köln\r\nMessage-ID: <1@exämple.org>\r\n\r\nüber\r\n"
).encode()


@pytest.fixture
def server(tmp_path):
    with MailServer(tmp_path) as srv:
        srv.add_user(USER)
        yield srv


def imap(srv: MailServer, commands: list[bytes], enable: bool) -> list[bytes]:
    """Log in, ENABLE UTF8=ACCEPT if C{enable}, run C{commands}: everything read, per command."""
    with socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()  # greeting
        out = []
        lines = [b'L LOGIN %s "%s"' % (USER.encode(), PASSWORD.encode())]
        if enable:
            lines.append(b"E ENABLE UTF8=ACCEPT")
        lines += [b"T%d %s" % (i, c) for i, c in enumerate(commands)]
        for line in lines:
            tag = line.split(b" ", 1)[0]
            s.sendall(line + b"\r\n")
            got = [f.readline()]
            while not got[-1].startswith(tag + b" "):
                got.append(f.readline())
            assert got[-1].startswith(tag + b" OK"), got
            out.append(b"".join(got))
        s.sendall(b"Z LOGOUT\r\n")
        return out


def test_utf8_headers_sent_by_smtp_are_read_as_they_are_by_both_kinds_of_session(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("smtputf8")
        refused = s.sendmail("jörg@exämple.org", [USER], MESSAGE, mail_options=["SMTPUTF8"])
    assert refused == {}
    fetch = b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] ENVELOPE BODY.PEEK[TEXT])"
    for enable in (False, True):
        out = imap(server, [b"SELECT INBOX", fetch], enable)
        if enable:
            assert out[1] == b"* ENABLED UTF8=ACCEPT\r\nE OK ENABLE completed\r\n"
        fetched = out[-1]
        assert b"Subject: " + SUBJECT + b"\r\n" in fetched
        # ENVELOPE: the subject and the address as they are (a literal holds 8-bit octets).
        assert b"{%d}\r\n%s" % (len(SUBJECT), SUBJECT) in fetched
        assert "{5}\r\nJörg NIL {5}\r\njörg {12}\r\nexämple.org".encode() in fetched
        assert "BODY[TEXT] {7}\r\nüber\r\n".encode() in fetched

    made = imap(server, ['CREATE "Bücher"'.encode(), b'LIST "" "B*"'], enable=True)
    assert made[-1].startswith(b"* LIST")
    legacy = imap(server, [b'LIST "" "B*"', b"SELECT B&APw-cher"], enable=False)
    assert legacy[1].splitlines()[0] == b'* LIST (\\NoInferiors) "/" B&APw-cher'
    assert (server.data / "mail" / "example.test" / "ana" / "Bücher").is_file()
