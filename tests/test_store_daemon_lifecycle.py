"""
The mbox files around the daemon's life, as other programs (mutt, procmail,
Python's mailbox) read them: a rewrite a crash interrupted is finished when
the server starts, before anyone logs in; flags sessions changed are in the
file after the server stops, even with the sessions still open.
"""

from __future__ import annotations

import imaplib
import mailbox
import os
import signal
import smtplib
import time
from pathlib import Path

from mailsrv.spool import BytesSource
from mailsrv.store import rewrite
from mailsrv.store.mbox import MboxMailStore
from tests.e2e import PASSWORD, MailServer
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool
from tests.test_store_rewrite import _KillingOs, message

KEPT = [1, 3, 4, 7, 8, 9, 10, 12, 13, 15]
DROPPED = [2, 5, 6, 11, 14]


def subjects(path: Path) -> list[str]:
    """The Subject of every message Python's mailbox module finds in C{path}, in order."""
    box = mailbox.mbox(str(path), create=False)
    try:
        return [str(m["Subject"]) for m in box]
    finally:
        box.close()


def new_store(data: Path) -> MboxMailStore:
    return MboxMailStore(
        data / "mail", data / "index", SyncReactor(), SyncThreadPool(), clock=lambda: NOW
    )


def expunge_killed(data: Path, at: int) -> None:
    """In a forked child: expunge L{DROPPED} from INBOX, killed (-9) at rewrite step C{at}."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            rewrite.SEGMENT = 3000
            rewrite.os = _KillingOs(at)  # type: ignore[attr-defined]
            store = new_store(data)
            d = store.open_folder(USER, "INBOX")
            folder = []
            d.addCallback(folder.append)
            folder[0].expunge(DROPPED)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), status


def test_interrupted_rewrite_is_finished_at_start_up(tmp_path):
    srv = MailServer(tmp_path)
    data = srv.data
    store = new_store(data)
    for i in range(1, 16):
        store.deliver(USER, BytesSource(message(i)), "s@x")
    inbox = srv.inbox(USER)
    assert subjects(inbox) == [f"m{i}" for i in range(1, 16)]
    expunge_killed(data, at=12)
    lock = inbox.with_name("INBOX.lock")
    if lock.exists():  # left by the dead child: make it stale at once
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
    half = subjects(inbox)
    assert half != [f"m{i}" for i in KEPT] and half != [f"m{i}" for i in range(1, 16)]
    assert list((data / "index").rglob("*.rewrite"))

    srv.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and list((data / "index").rglob("*.rewrite*")):
            time.sleep(0.05)
        # No login: the server finished the rewrite by itself.
        assert list((data / "index").rglob("*.rewrite*")) == []
        assert subjects(inbox) == [f"m{i}" for i in KEPT]
        box = mailbox.mbox(str(inbox), create=False)
        for m in box:
            i = int(str(m["Subject"])[1:])
            body = m.as_bytes().split(b"\n\n", 1)[1].rstrip(b"\n")
            want = message(i).split(b"\n\n", 1)[1].replace(b"\nFrom ", b"\n>From ")
            assert body == want.rstrip(b"\n"), f"message {i} is damaged"
        box.close()
        assert "finished the interrupted rewrite of alice@example.test INBOX" in srv.output()
    finally:
        srv.stop()


def test_flags_are_written_at_shutdown_with_the_session_open(tmp_path):
    srv = MailServer(tmp_path)
    srv.start()
    try:
        srv.add_user(USER)
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            s.sendmail("bob@remote.test", [USER], message(1).replace(b"\n", b"\r\n"))
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        imap.login(USER, PASSWORD)
        assert imap.select("INBOX")[0] == "OK"
        assert imap.store("1", "+FLAGS", r"(\Flagged)")[0] == "OK"
        assert imap.noop()[0] == "OK"
        box = mailbox.mbox(str(srv.inbox(USER)), create=False)
        assert "F" not in box[0].get_flags()  # not yet: a session is on the folder
        box.close()
    finally:
        # SIGTERM, the IMAP session still open; twistd ends by the signal once stopped
        assert srv.stop() in (0, -signal.SIGTERM), srv.output()
    imap.sock.close()
    box = mailbox.mbox(str(srv.inbox(USER)), create=False)
    assert "F" in box[0].get_flags(), srv.output()
    assert box[0]["X-Status"] == "F"
    box.close()
