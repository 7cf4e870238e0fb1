"""
A full disk, for real: the daemon's data folder on a small tmpfs (mounted by
the test, so root only), filled to the last byte. Taking mail in is refused
with a temporary error and the session goes on; reading mail keeps working.
"""

from __future__ import annotations

import contextlib
import errno
import imaplib
import os
import poplib
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.e2e import PASSWORD, MailServer

ALICE = "alice@example.test"
BIG = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 5000  # 400 KB: spooled to a file


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "8m", inodes: int | None = None):
    """
    A tmpfs of C{size} (and C{inodes} files, if given) at C{path}, unmounted
    afterwards; skips when it cannot be made.
    """
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    options = f"size={size},mode=0700" + ("" if inodes is None else f",nr_inodes={inodes}")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of C{folder} to the last byte; the file that does it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


@pytest.fixture
def full_server(tmp_path):
    with tmpfs(tmp_path / "data"):
        srv = MailServer(tmp_path)
        srv.add_user(ALICE)
        srv.start()
        try:
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
                for i in range(2):
                    s.sendmail(
                        "bob@remote.test", [ALICE], b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i)
                    )
            m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
            m.login(ALICE, PASSWORD)  # the first login writes its files
            m.logout()
            srv.filler = fill(srv.data)
            yield srv
        finally:
            srv.stop()


def _submission(srv: MailServer) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30)
    s.starttls(context=ssl._create_unverified_context())
    s.login(ALICE, PASSWORD)
    return s


def test_a_full_disk(full_server):
    """
    IMAP: SELECT, FETCH (with or without PEEK) and EXAMINE work, APPEND
    (spooled or not) and STORE are NO [OVERQUOTA] and the session goes on. POP3: login and RETR work. SMTP:
    DATA (spooled or not) is 452 4.3.1 and the session goes on; once there
    is room again mail is taken.
    """
    _imap(full_server)
    _pop3(full_server)
    _smtp(full_server)
    assert "Unhandled Error" not in full_server.output()


def _imap(full_server):
    m = imaplib.IMAP4("127.0.0.1", full_server.ports["imap"])
    try:
        m.login(ALICE, PASSWORD)
        typ, data = m.select("INBOX")
        assert (typ, data) == ("OK", [b"2"]), full_server.output()
        typ, data = m.fetch("2", "(BODY.PEEK[])")
        assert typ == "OK" and b"body 1" in data[0][1]
        typ, data = m.fetch("1", "(BODY[])")  # read, though \Seen cannot be stored
        assert typ == "OK" and b"body 0" in data[0][1], (typ, data)
        typ, data = m.store("2", "+FLAGS", "(\\Flagged)")
        assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]"), (typ, data)
        for message in (BIG, b"Subject: small\r\n\r\nhi\r\n"):
            typ, data = m.append("INBOX", None, None, message)
            assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]"), (typ, data)
            assert m.noop()[0] == "OK"
        typ, data = m.select("INBOX", readonly=True)  # EXAMINE
        assert (typ, data) == ("OK", [b"2"])
        m.logout()
    finally:
        with contextlib.suppress(OSError):
            m.shutdown()


def _pop3(full_server):
    p = poplib.POP3("127.0.0.1", full_server.ports["pop3"], timeout=30)
    p.user(ALICE)
    assert p.pass_(PASSWORD).startswith(b"+OK"), full_server.output()
    assert p.stat()[0] == 2
    assert b"body 0" in b"\n".join(p.retr(1)[1])
    p.quit()


def _smtp(full_server):
    with _submission(full_server) as s:
        for data in (BIG, b"Subject: small\r\n\r\nhi\r\n"):  # spooled to a file; in memory
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail(ALICE, [ALICE, "carol@remote.test"], data)
            assert e.value.smtp_code == 452, e.value
            assert e.value.smtp_error.startswith(b"4.3.1"), e.value
            assert s.noop()[0] == 250
    full_server.filler.unlink()
    with _submission(full_server) as s:
        assert s.sendmail(ALICE, [ALICE], b"Subject: room again\r\n\r\nhi\r\n") == {}
