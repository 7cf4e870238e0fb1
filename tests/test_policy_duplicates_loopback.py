"""
Mass duplicate mail end to end: a real ``twistd -n mailsrv`` on loopback
with the default limit (50 distinct recipients an hour), driven by smtplib
on the MX and on submission with AUTH. The transaction that takes the
message past 50 recipients gets 451 4.7.1, its retry 550 5.7.1, and nothing
of it reaches a mailbox or the queue on disk; a list alias of 100 members
is not held back.
"""

from __future__ import annotations

import smtplib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailsrv.outbound.queue import QueueStore

from .e2e import PASSWORD, MailServer, free_port

ALICE, BOB = "alice@example.test", "bob@example.test"
LIST = "staff@example.test"
MEMBERS = [f"m{i}@lists.remote.test" for i in range(100)]
BODY = "Our watches are the cheapest on the Internet.\r\nhttp://watches.example/\r\n"


def message(sender: str, subject: str, boundary: str) -> str:
    """The same text each time; its header and MIME boundary differ, as generated mail's do."""
    return (
        f"From: {sender}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n{BODY}--{boundary}--\r\n"
    )


def config(tmp_path: Path) -> str:
    (tmp_path / "aliases").write_text(f"{LIST}: " + ",\n\t".join(MEMBERS) + "\n")
    return (
        "[policy]\n"
        "duplicate_recipients = 50\n"
        'duplicate_window = "1h"\n'
        "[addresses]\n"
        'aliases = "aliases"\n'
        f'catch_all = {{ "example.test" = "{BOB}" }}\n'
        f'lists = {{ "{LIST}" = "Staff <staff.example.test>" }}\n'
        # Queued mail waits: nobody listens there.
        f'[relay]\nsmarthost = "127.0.0.1:{free_port()}"\n'
    )


def queued(server: MailServer) -> list[tuple[str, list[str]]]:
    """Each queue file on disk: its sender and recipients."""
    store = QueueStore(server.data / "queue")
    out = []
    for qid in sorted(store.ids()):
        env = store.load_envelope(qid)
        out.append((env.sender, sorted(r.address for r in env.recipients)))
    return out


def send_in_batches(
    client: smtplib.SMTP, sender: str, rcpts: list[str], batch: int
) -> list[tuple[int, bytes]]:
    """The same message to C{rcpts}, C{batch} at a time: each final reply (code, text)."""
    out = []
    for n, i in enumerate(range(0, len(rcpts), batch)):
        data = message(sender, f"part {n + 1}", boundary=f"=_b{n}_{i * 7919}")
        try:
            client.sendmail(sender, rcpts[i : i + batch], data)
            out.append((250, b""))
        except smtplib.SMTPDataError as e:
            out.append((e.smtp_code, e.smtp_error))
            client.rset()
            # The client tries again: refused for good.
            try:
                client.sendmail(sender, rcpts[i : i + batch], data)
                out.append((250, b""))
            except smtplib.SMTPDataError as e:
                out.append((e.smtp_code, e.smtp_error))
            break
    return out


def test_the_message_past_50_recipients_is_deferred_then_refused_lists_pass(tmp_path):
    with MailServer(tmp_path, extra=config(tmp_path)) as server:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(server.add_user, [ALICE, BOB]))
        # The MX: one sender, 60 addresses of ours (a catch-all: all reach bob), 10 at a time.
        mx_rcpts = [f"u{i}@example.test" for i in range(60)]
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.ehlo("client.origin.test")
            replies = send_in_batches(client, "seller@origin.test", mx_rcpts, 10)
            assert [code for code, _ in replies] == [250] * 5 + [451, 550]
            assert replies[5][1].startswith(b"4.7.1 The same message to more than 50 recipients")
            assert b"ask the postmaster" in replies[5][1]
            assert replies[6][1].startswith(b"5.7.1 The same message to more than 50 recipients")
            # The same message through a list alias of 100: taken.
            data = message("seller@origin.test", "to the list", boundary="=_list")
            assert client.sendmail("seller@origin.test", [LIST], data) == {}
        mbox = server.inbox(BOB).read_bytes()
        assert [f"Subject: part {n}".encode() in mbox for n in range(1, 7)] == [True] * 5 + [False]
        assert mbox.count(b"\nSubject: ") == 5
        # One queue file: the list's 100 copies (forwarded, with an SRS sender).
        assert [rcpts for _, rcpts in queued(server)] == [sorted(MEMBERS)]

        # Submission: a user sends 60 addresses elsewhere, 20 at a time.
        out_rcpts = [f"r{i}@far.test" for i in range(60)]
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
            client.ehlo("client.example.test")
            client.login(ALICE, PASSWORD)
            replies = send_in_batches(client, ALICE, out_rcpts, 20)
            assert [code for code, _ in replies] == [250, 250, 451, 550]
            assert replies[2][1].startswith(b"4.7.1 ")
            assert replies[3][1].startswith(b"5.7.1 ")
        files = queued(server)
        assert sorted(rcpts for sender, rcpts in files if sender == ALICE) == sorted(
            [sorted(out_rcpts[:20]), sorted(out_rcpts[20:40])]
        )
        assert not any(r in rcpts for _, rcpts in files for r in out_rcpts[40:])
        log = (tmp_path / "server.log").read_text()
        assert log.count("duplicate mail deferred: 60 distinct recipients") == 2
        assert log.count("duplicate mail refused: 60 distinct recipients") == 2


@pytest.mark.parametrize(
    "entry, others",
    [
        # Another sender from the same client is counted as usual.
        ('"seller@origin.test"', [250, 250, 451, 550]),
        # Everything from the network passes.
        ('"127.0.0.0/8"', [250, 250, 250]),
    ],
)
def test_a_mailing_list_entry_is_never_held_back(tmp_path, entry, others):
    extra = config(tmp_path).replace("[policy]\n", f"[policy]\nmailing_lists = [{entry}]\n")
    with MailServer(tmp_path, extra=extra) as server:
        server.add_user(BOB)
        rcpts = [f"u{i}@example.test" for i in range(60)]
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.ehlo("client.origin.test")
            replies = send_in_batches(client, "seller@origin.test", rcpts, 20)
            assert [code for code, _ in replies] == [250] * 3
            replies = send_in_batches(client, "other@origin.test", rcpts, 20)
            assert [code for code, _ in replies] == others
        mbox = server.inbox(BOB).read_bytes()
        assert mbox.count(b"\nSubject: part") == 3 + others.count(250)
