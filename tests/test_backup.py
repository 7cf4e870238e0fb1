"""
``mailsrv backup DEST`` against a real ``twistd -n mailsrv``: taken while an
SMTP client keeps delivering to the same mailbox, the copy holds only whole
messages (Python's C{mailbox.mbox} reads each one back intact); a copy put
back under a new server serves the same messages, UIDs, flags and UIDLs
over IMAP and POP3; a large mailbox is streamed (the command's memory does
not grow with it); a folder that is not empty is refused.
"""

from __future__ import annotations

import filecmp
import imaplib
import mailbox
import os
import poplib
import re
import resource
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e import PASSWORD, MailServer

USER = "alice@example.test"
BACKUPS_WHILE_DELIVERING = 3


def body_of(seq: int) -> str:
    """Message C{seq}'s body: between 1 and about 200 kB, each line naming its message."""
    lines = 10 + (seq % 7) * 400
    return "".join(f"{seq}:{i} {'x' * 60}\n" for i in range(lines))


def message(seq: int) -> str:
    return (
        f"From: sender@remote.test\r\nTo: {USER}\r\nSubject: message {seq}\r\n"
        f"X-Seq: {seq}\r\n\r\n" + body_of(seq).replace("\n", "\r\n")
    )


class DeliveryLoop(threading.Thread):
    """Delivers messages 0, 1, 2, ... over one SMTP session until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.delivered: list[int] = []
        self.progress = threading.Condition()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as s:
                seq = 0
                while not self.stopping.is_set():
                    s.sendmail("sender@remote.test", [USER], message(seq))
                    with self.progress:
                        self.delivered.append(seq)
                        self.progress.notify_all()
                    seq += 1
        except BaseException as e:  # reported by the test
            self.error = e
            with self.progress:
                self.progress.notify_all()

    def wait_for(self, count: int) -> None:
        with self.progress:
            assert self.progress.wait_for(
                lambda: len(self.delivered) >= count or self.error is not None, timeout=60
            )
        assert self.error is None, self.error


def command_of(config: Path) -> list[str]:
    return [sys.executable, "-m", "mailsrv", "--config", str(config)]


def run_backup(server: MailServer, dest: Path) -> str:
    result = server.cli("backup", str(dest))
    assert result.returncode == 0, result.stderr
    return result.stdout


def whole_messages(mbox: Path) -> list[int]:
    """The X-Seq of each message of C{mbox}, after checking that each one is whole."""
    seqs = []
    box = mailbox.mbox(mbox, create=False)
    try:
        for msg in box:
            seq = int(msg["X-Seq"])
            payload = msg.get_payload()
            assert isinstance(payload, str)
            assert payload.rstrip("\n") == body_of(seq).rstrip("\n"), f"message {seq} cut"
            seqs.append(seq)
    finally:
        box.close()
    return seqs


def inbox_in(dest: Path) -> Path:
    return dest / "data" / "mail" / "example.test" / "alice" / "INBOX"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("backup")
    # Outbound mail goes to a closed port: it is deferred and stays in the queue.
    s = MailServer(base, extra='[relay]\nsmarthost = "127.0.0.1:1"\n')
    s.add_user(USER)
    s.start()
    try:
        yield s
    finally:
        s.close()


def test_backup_while_delivering_holds_only_whole_messages(server, tmp_path) -> None:
    loop = DeliveryLoop(server.ports["smtp"])
    loop.start()
    try:
        for n in range(BACKUPS_WHILE_DELIVERING):
            loop.wait_for(3 * (n + 1))
            before = len(loop.delivered)
            dest = tmp_path / f"copy{n}"
            summary = run_backup(server, dest)
            after = len(loop.delivered)
            seqs = whole_messages(inbox_in(dest))
            # Every message accepted before the backup began is in it, in order,
            # and nothing after a message that was still being sent.
            assert seqs == list(range(len(seqs))), seqs
            assert before <= len(seqs) <= after + 1, (before, len(seqs), after)
            assert re.search(r": 1 folders of 1 users \(.*\d+ queued messages", summary), summary
            assert (dest / "data" / "passwd").is_file()
    finally:
        loop.stopping.set()
        loop.join(60)
    assert loop.error is None, loop.error


def _imap_state(port: int) -> tuple[bytes, dict[int, tuple[int, bool]]]:
    """UIDVALIDITY and, per UID, the message's X-Seq and whether it is \\Flagged."""
    c = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    try:
        c.login(USER, PASSWORD)
        c.select("INBOX", readonly=True)
        validity = c.response("UIDVALIDITY")[1][0]
        _, data = c.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (X-SEQ)])")
        state = {}
        for item in data:
            if not isinstance(item, tuple):
                continue
            meta, header = item
            uid = int(re.search(rb"UID (\d+)", meta).group(1))  # type: ignore[union-attr]
            seq = int(re.search(rb"X-Seq: (\d+)", header).group(1))  # type: ignore[union-attr]
            state[uid] = (seq, b"\\Flagged" in meta)
    finally:
        c.logout()
    return validity, state


def _flag(port: int, uid: int) -> None:
    c = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    try:
        c.login(USER, PASSWORD)
        c.select("INBOX")
        c.uid("STORE", str(uid), "+FLAGS", "(\\Flagged)")
    finally:
        c.logout()


def _uidls(port: int) -> list[bytes]:
    c = poplib.POP3("127.0.0.1", port, timeout=60)
    try:
        c.user(USER)
        c.pass_(PASSWORD)
        return c.uidl()[1]
    finally:
        c.quit()


def test_a_restored_copy_serves_its_messages_under_a_greater_uidvalidity(server, tmp_path) -> None:
    # RFC 3501 2.3.1.1: the UIDs given after the backup are given again after a
    # restore, so the restored folders must have a greater UIDVALIDITY.
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=60) as s:
        for seq in range(1000, 1002):
            s.sendmail("sender@remote.test", [USER], message(seq))
    _, state = _imap_state(server.ports["imap"])
    flagged = max(state)
    _flag(server.ports["imap"], flagged)
    validity, in_copy = _imap_state(server.ports["imap"])
    assert in_copy[flagged][1]
    dest = tmp_path / "copy"
    run_backup(server, dest)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=60) as s:
        for seq in range(1002, 1004):
            s.sendmail("sender@remote.test", [USER], message(seq))
    _, before = _imap_state(server.ports["imap"])
    later = {uid: seq for uid, (seq, _) in before.items() if seq in (1002, 1003)}
    assert len(later) == 2
    uidls = _uidls(server.ports["pop3"])

    # Restoring as the README says: stop, copy the data folder back, start.
    server.stop()
    shutil.rmtree(server.data)
    shutil.copytree(dest / "data", server.data, symlinks=True)
    server.start()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=60) as s:
        s.sendmail("sender@remote.test", [USER], message(1004))
    new_validity, after = _imap_state(server.ports["imap"])
    assert int(new_validity) > int(validity)
    restored = {uid: v for uid, v in after.items() if v[0] != 1004}
    assert restored == in_copy  # every message of the copy, same UIDs and flags
    assert [uid for uid, (seq, _) in after.items() if seq == 1004] == [max(in_copy) + 1]
    assert set(_uidls(server.ports["pop3"])).isdisjoint(uidls)
    assert not (server.data / "BACKUP-COMPLETE").exists()
    assert "1 folders got a new UIDVALIDITY" in server.output()

    # The next start is an ordinary one: the UIDVALIDITY stays.
    server.stop()
    server.start()
    assert _imap_state(server.ports["imap"]) == (new_validity, after)


def _peak_memory(argv: list[str]) -> tuple[int, str]:
    """Run C{argv}; its peak resident memory in octets, and its output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out
    return usage.ru_maxrss * 1024, out  # Linux: kilobytes


def test_a_large_mailbox_is_streamed(tmp_path) -> None:
    size = 128 * 1024 * 1024
    data = tmp_path / "data"
    inbox = data / "mail" / "example.test" / "bob" / "INBOX"
    inbox.parent.mkdir(parents=True)
    line = b"y" * 1023 + b"\n"
    with open(inbox, "wb") as f:
        f.write(b"From sender@remote.test Mon Dec  7 01:00:00 2026\nSubject: big\n\n")
        for _ in range(size // len(line)):
            f.write(line)
    os.chmod(inbox, 0o640)
    config = tmp_path / "mailsrv.toml"
    config.write_text('[server]\ndomains = ["example.test"]\ndata_dir = "data"\n')
    dest = tmp_path / "copy"
    command = [sys.executable, "-m", "mailsrv", "--config", str(config)]
    baseline, _ = _peak_memory([*command, "user", "list"])
    peak, out = _peak_memory([*command, "backup", str(dest)])
    # Read whole, the mailbox alone would add its size.
    assert peak < baseline + size // 4, f"peak {peak}, {baseline} without a backup"
    copy = dest / "data" / "mail" / "example.test" / "bob" / "INBOX"
    assert filecmp.cmp(inbox, copy, shallow=False)
    assert os.stat(copy).st_mode & 0o777 == 0o640
    assert os.stat(copy).st_mtime_ns == os.stat(inbox).st_mtime_ns
    assert "1 folders of 1 users (128" in out, out


def test_a_folder_that_is_not_empty_is_refused(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    config = tmp_path / "mailsrv.toml"
    config.write_text('[server]\ndomains = ["example.test"]\ndata_dir = "data"\n')
    dest = tmp_path / "copy"
    dest.mkdir()
    (dest / "something").write_text("kept")
    result = subprocess.run(
        [sys.executable, "-m", "mailsrv", "--config", str(config), "backup", str(dest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "is not empty" in result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["something"]
    inside = tmp_path / "data" / "copy"
    result = subprocess.run(
        [sys.executable, "-m", "mailsrv", "--config", str(config), "backup", str(inside)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "inside the data folder" in result.stderr
    assert not inside.exists()
    (tmp_path / "backups").symlink_to(tmp_path / "data")  # a path that leads inside it
    result = subprocess.run(
        [*command_of(config), "backup", str(tmp_path / "backups" / "copy")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "inside the data folder" in result.stderr
    assert not inside.exists()


def test_queued_messages_are_copied_whole(server, tmp_path) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=60) as s:
        s.login(USER, PASSWORD)
        s.sendmail(USER, ["someone@remote.test"], message(2000).replace("sender@remote.test", USER))
    queue = server.data / "queue"
    queued = sorted(queue.glob("*.msg"))
    assert queued, "the message to a remote address waits in the queue"
    dest = tmp_path / "copy"
    summary = run_backup(server, dest)
    assert f", {len(queued)} queued messages" in summary, summary
    for path in queued:
        copy = dest / "data" / "queue" / path.name
        assert filecmp.cmp(path, copy, shallow=False)
        assert os.stat(copy).st_mode == os.stat(path).st_mode
    assert not (dest / "data" / "queue" / "tmp").exists()
    assert not (dest / "data" / "queue" / "relay.lock").exists()


def _file_size_limit(octets: int):
    """For preexec_fn: files the child writes stop at C{octets} (EFBIG, as a full disk would)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (octets, octets))

    return limit


def test_a_copy_cut_short_says_so_and_is_not_marked_complete(tmp_path) -> None:
    data = tmp_path / "data"
    inbox = data / "mail" / "example.test" / "bob" / "INBOX"
    inbox.parent.mkdir(parents=True)
    inbox.write_bytes(
        b"From sender@remote.test Mon Dec  7 01:00:00 2026\nSubject: big\n\n" + b"z" * 4_000_000
    )
    config = tmp_path / "mailsrv.toml"
    config.write_text('[server]\ndomains = ["example.test"]\ndata_dir = "data"\n')
    command = [sys.executable, "-m", "mailsrv", "--config", str(config), "backup"]
    cut = tmp_path / "cut"
    result = subprocess.run(
        [*command, str(cut)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_file_size_limit(1_000_000),
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "NOT complete" in result.stderr and "do not restore" in result.stderr, result.stderr
    assert str(inbox.relative_to(data)) in result.stderr  # names the file
    assert not (cut / "BACKUP-COMPLETE").exists()

    whole = tmp_path / "whole"
    result = subprocess.run([*command, str(whole)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (whole / "BACKUP-COMPLETE").read_text() == result.stdout
