"""
End to end, international addresses: a real ``twistd -n mailsrv`` on loopback,
a UTF-8 user added with ``mailsrv user add``, mail sent with SMTPUTF8 (RFC 6531)
by smtplib and by swaks, read back over POP3 and IMAP with the UTF-8 login.
"""

from __future__ import annotations

import imaplib
import poplib
import shutil
import smtplib
import socket
import subprocess

import pytest

from tests.e2e import PASSWORD, MailServer

JOSE = "jösé@example.test"
ANNA_A_LABEL = "anna@xn--bcher-kva.example"

MESSAGE = "From: ñandú@remote.test\r\nSubject: héllo\r\n\r\nüber\r\n".encode()


@pytest.fixture
def server(tmp_path):
    with MailServer(tmp_path, domains=("example.test", "xn--bcher-kva.example")) as srv:
        srv.add_user(JOSE)
        srv.add_user("anna@Bücher.example")  # stored as its A-labels
        yield srv


def pop3_messages(srv, user: str) -> list[bytes]:
    p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
    p.user(user)  # poplib sends UTF-8
    p.pass_(PASSWORD)
    count, _ = p.stat()
    out = [b"\r\n".join(p.retr(i + 1)[1]) for i in range(count)]
    p.quit()
    return out


def imap_login_literal(srv, user: str) -> list[bytes]:
    """LOGIN with the user name as a literal (RFC 3501 4.3: 8-bit in a literal); the replies."""
    name = user.encode()
    with socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()  # greeting
        s.sendall(b"a1 LOGIN {%d}\r\n" % len(name))
        cont = f.readline()
        assert cont.startswith(b"+"), cont
        s.sendall(name + b' "' + PASSWORD.encode() + b'"\r\n')
        out = [f.readline()]
        while not out[-1].startswith(b"a1 "):
            out.append(f.readline())
        s.sendall(b"a2 LOGOUT\r\n")
        return out


def test_smtputf8_to_a_utf8_user_and_an_idn_domain_read_over_pop3_and_imap(server):
    users = server.cli("user", "list").stdout.split()
    assert JOSE in users and ANNA_A_LABEL in users
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("smtputf8")
        refused = s.sendmail(
            "ñandú@remote.test",
            [JOSE, "anna@bücher.example"],
            MESSAGE,
            mail_options=["SMTPUTF8"],
        )
    assert refused == {}
    # Without SMTPUTF8 the UTF-8 address is refused (RFC 6531 3.7.4.1).
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        s.command_encoding = "utf-8"
        s.mail("bob@remote.test")
        assert s.rcpt(JOSE)[0] == 553

    # The mbox on disk is the user's folder, named by the stored spelling.
    assert b"\n\xc3\xbcber\n" in server.inbox(JOSE).read_bytes()
    assert server.inbox(ANNA_A_LABEL).exists()

    (msg,) = pop3_messages(server, JOSE)
    assert msg.startswith("Return-Path: <ñandú@remote.test>".encode())
    assert "Subject: héllo".encode() in msg
    # The IDN user logs in with either form of the domain.
    assert len(pop3_messages(server, "anna@bücher.example")) == 1
    assert len(pop3_messages(server, ANNA_A_LABEL)) == 1

    replies = imap_login_literal(server, JOSE)
    assert replies[-1].startswith(b"a1 OK"), replies
    # AUTHENTICATE PLAIN carries UTF-8 (RFC 4616).
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    try:
        typ, _ = m.authenticate("PLAIN", lambda _: f"\0{JOSE}\0{PASSWORD}".encode())
        assert typ == "OK"
        m.select("INBOX")
        typ, data = m.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and "Subject: héllo".encode() in data[0][1]
    finally:
        m.logout()


def test_swaks_without_smtputf8_is_refused_the_utf8_address_but_not_the_a_label(server):
    # swaks (20201014) cannot add SMTPUTF8 to MAIL: what a legacy client sees.
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed")

    def run(to: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [swaks, "--server", f"127.0.0.1:{server.ports['smtp']}", "--helo", "client.test"]
            + ["--from", "bob@remote.test", "--to", to, "--body", "hej"],
            capture_output=True,
            timeout=60,
        )

    refused = run(JOSE)
    assert refused.returncode != 0
    assert b"553 5.6.7 Non-ASCII addresses not permitted for that recipient" in refused.stdout
    accepted = run(ANNA_A_LABEL)
    assert accepted.returncode == 0, accepted.stdout.decode(errors="replace")
    assert len(pop3_messages(server, "anna@bücher.example")) == 1
