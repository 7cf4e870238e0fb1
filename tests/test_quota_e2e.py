"""
Storage quotas end to end (RFC 9208; [quota] in the config): a real
``twistd -n mailsrv`` on loopback, driven by smtplib and a raw IMAP client,
checked against the replies and the mbox files. Usage is the octets of a
user's mbox files, so it follows every change, also one made by another
program, and a restart.
"""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from mailsrv.store.quotalimits import format_size
from tests.e2e import PASSWORD, MailServer

ALICE = "alice@example.test"  # limited to 20K
BOB = "bob@example.test"  # no limit (an override of 0)
QUOTA = '[quota]\nstorage = "20K"\nusers = { "bob@example.test" = 0 }\n'


def message(octets: int, subject: str = "filler") -> bytes:
    """A message of about C{octets} octets (LF line ends)."""
    head = f"Subject: {subject}\nMessage-ID: <{subject}@example.test>\n\n".encode()
    line = b"x" * 75 + b"\n"
    return head + line * (max(octets - len(head), 0) // len(line))


def mbox_octets(srv: MailServer, address: str) -> int:
    """The octets of every mbox file of C{address}: what the quota counts."""
    local, domain = address.split("@")
    root = srv.data / "mail" / domain / local
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def outside_append(srv: MailServer, address: str, data: bytes) -> None:
    """Add a message to the INBOX as procmail or mutt would, behind the server's back."""
    path = srv.inbox(address)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(b"From outside@example.test Sat Jan  3 10:00:00 2026\n" + data + b"\n")


@pytest.fixture
def server(tmp_path):
    with MailServer(tmp_path, extra=QUOTA) as srv:
        srv.add_user(ALICE)
        srv.add_user(BOB)
        yield srv


class IMAP:
    """A raw IMAP client: sends lines, returns the response lines up to the tagged one."""

    def __init__(self, port: int, user: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.n = 0
        assert self.cmd(f'LOGIN {user} "{PASSWORD}"')[-1].startswith(b"T1 OK")

    def cmd(self, line: str | bytes, literal: bytes | None = None) -> list[bytes]:
        self.n += 1
        tag = b"T%d" % self.n
        raw = line.encode() if isinstance(line, str) else line
        if literal is not None:
            raw += b" {%d+}\r\n" % len(literal) + literal
        self.sock.sendall(tag + b" " + raw + b"\r\n")
        out = []
        while True:
            got = self.file.readline()
            assert got, out
            out.append(got)
            if got.startswith(tag + b" "):
                return out

    def close(self) -> None:
        self.cmd("LOGOUT")
        self.sock.close()


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def smtp_send(srv: MailServer, rcpts: list[str], data: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        return s.sendmail("carol@remote.test", rcpts, crlf(data))


def wait_for_line(srv: MailServer, text: str, timeout: float = 30.0) -> str:
    """The first line of the server's log holding C{text}, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = srv.base / "server.log"
        found = [line for line in log.read_text().splitlines() if text in line]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in the log:\n{srv.output()}")


def count_messages(srv: MailServer, address: str) -> int:
    path = srv.inbox(address)
    return path.read_bytes().count(b"\nFrom ") + 1 if path.exists() and path.stat().st_size else 0


def test_smtp_refuses_a_message_that_does_not_fit_and_a_user_over_quota_at_rcpt(server):
    assert smtp_send(server, [ALICE], message(12_000, "first")) == {}
    # RFC 3463 3.3: 4.2.2 at the end of DATA for the only recipient, nothing stored.
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtp_send(server, [ALICE], message(12_000, "second"))
    assert (refused.value.smtp_code, refused.value.smtp_error) == (452, b"4.2.2 Mailbox full")
    assert count_messages(server, ALICE) == 1
    # With another recipient, the others get it (alice's copy waits in the queue).
    assert smtp_send(server, [ALICE, BOB], message(12_000, "both")) == {}
    assert count_messages(server, BOB) == 1
    assert count_messages(server, ALICE) == 1
    # The relay process tries alice's copy: deferred (retried, bounced after max_lifetime).
    # (the session's own to=<...> relay=local lines are its deliveries: status=sent)
    line = wait_for_line(server, "dsn=4.2.2, status=deferred (452 4.2.2 Mailbox full)")
    assert "to=<alice@example.test>, relay=local, delay=" in line, line
    # Another program fills the mailbox: RCPT is refused at once (usage >= limit).
    outside_append(server, ALICE, message(9_000, "outside"))
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.test")
        s.mail("carol@remote.test")
        assert s.rcpt(ALICE) == (452, b"4.2.2 Mailbox full")
        assert s.rcpt(BOB)[0] == 250
    # The admin's view: usage and limit per user.
    out = server.cli("user", "quota").stdout.splitlines()
    assert [line.split()[0] for line in out] == [ALICE, BOB]
    used = mbox_octets(server, ALICE)
    share = f"{100 * used // (20 * 1024)}%"
    assert out[0].split() == [ALICE, "used", format_size(used), "limit", "20K", share]
    assert out[1].split() == [BOB, "used", format_size(mbox_octets(server, BOB)), "limit", "none"]


def test_imap_quota_commands_and_appends_copies_over_quota(server):
    imap = IMAP(server.ports["imap"], ALICE)
    caps = imap.cmd("CAPABILITY")[0].split()
    assert b"QUOTA" in caps and b"QUOTA=RES-STORAGE" in caps and b"QUOTASET" not in caps
    assert imap.cmd("GETQUOTAROOT INBOX") == [
        b'* QUOTAROOT INBOX "User quota"\r\n',
        b'* QUOTA "User quota" (STORAGE 0 20)\r\n',
        b"T3 OK Getquotaroot completed\r\n",
    ]
    assert imap.cmd("APPEND INBOX", crlf(message(12_000, "a1")))[-1].startswith(b"T4 OK")
    used = mbox_octets(server, ALICE)
    assert imap.cmd('GETQUOTA "User quota"') == [
        b'* QUOTA "User quota" (STORAGE %d 20)\r\n' % (used // 1024),
        b"T5 OK Getquota completed\r\n",
    ]
    # RFC 9208 4.3: a message that does not fit is refused, nothing stored.
    assert imap.cmd("APPEND INBOX", crlf(message(12_000, "a2"))) == [
        b"T6 NO [OVERQUOTA] Quota exceeded (mailbox for user is full)\r\n"
    ]
    assert mbox_octets(server, ALICE) == used
    assert imap.cmd("CREATE Keep")[-1].startswith(b"T7 OK")
    assert imap.cmd("SELECT INBOX")[-1].startswith(b"T8 OK")
    assert imap.cmd("COPY 1 Keep") == [
        b"T9 NO [OVERQUOTA] Quota exceeded (mailbox for user is full)\r\n"
    ]
    # A move takes no more room: allowed (to Trash, to an archive).
    assert imap.cmd("MOVE 1 Keep")[-1] == b"T10 OK MOVE completed\r\n"
    # Deleting the folder frees its room at once.
    assert imap.cmd("DELETE Keep")[-1].startswith(b"T11 OK")
    assert imap.cmd("GETQUOTAROOT Keep")[0] == b'* QUOTAROOT Keep "User quota"\r\n'
    assert imap.cmd("APPEND INBOX", crlf(message(12_000, "a3")))[-1].startswith(b"T13 OK")
    # Expunging frees it too.
    assert imap.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"T14 OK")
    assert imap.cmd("EXPUNGE")[-1].startswith(b"T15 OK")
    assert imap.cmd('GETQUOTA "User quota"')[0] == b'* QUOTA "User quota" (STORAGE 0 20)\r\n'
    assert imap.cmd('SETQUOTA "User quota" (STORAGE 100000)') == [
        b"T17 NO [NOPERM] Quota can be changed only by admin\r\n"
    ]
    imap.close()
    # A user without a limit has no quota root (as Dovecot).
    imap = IMAP(server.ports["imap"], BOB)
    assert imap.cmd("GETQUOTAROOT INBOX") == [
        b"* QUOTAROOT INBOX\r\n",
        b"T2 OK Getquotaroot completed\r\n",
    ]
    assert imap.cmd('GETQUOTA "User quota"') == [b"T3 NO Quota root doesn't exist\r\n"]
    imap.close()


def test_usage_after_a_restart_and_after_another_program_emptied_the_mailbox(server):
    assert smtp_send(server, [ALICE], message(15_000, "big")) == {}
    outside_append(server, ALICE, message(6_000, "outside"))
    used = mbox_octets(server, ALICE)
    assert used > 20 * 1024
    server.stop()
    server.start()
    imap = IMAP(server.ports["imap"], ALICE)
    assert imap.cmd('GETQUOTA "User quota"')[0] == (
        b'* QUOTA "User quota" (STORAGE %d 20)\r\n' % (used // 1024)
    )
    assert b"* 2 EXISTS\r\n" in imap.cmd("SELECT INBOX")
    imap.close()
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        smtp_send(server, [ALICE], message(100, "refused"))
    # mutt deletes everything: room again, with no restart and no session.
    server.inbox(ALICE).write_bytes(b"")
    assert smtp_send(server, [ALICE], message(100, "fits")) == {}
    assert count_messages(server, ALICE) == 1
