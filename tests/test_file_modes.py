"""
Nothing the server writes is readable by other local users: after mail in and
out, logins and folder changes, every file under the data folder is 0600 and
every folder 0700 (the TLS key too), whatever the umask.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import smtplib
import ssl
import stat

from tests.e2e import PASSWORD, MailServer, free_port

ALICE = "alice@example.test"


def _modes(root) -> dict[str, str]:
    """Path under C{root} -> its mode in octal, for the ones not 0600 (files) / 0700 (folders)."""
    wrong = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if stat.S_IMODE(st.st_mode) != want:
                wrong[os.path.relpath(path, root)] = oct(stat.S_IMODE(st.st_mode))
    return wrong


def test_every_file_0600_and_folder_0700(tmp_path):
    old = os.umask(0o022)  # the usual umask, which the server must not rely on
    try:
        srv = MailServer(tmp_path, extra=f'[relay]\nsmarthost = "127.0.0.1:{free_port()}"\n')
        srv.add_user(ALICE)
        srv.start()
    finally:
        os.umask(old)
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            s.sendmail("bob@remote.test", [ALICE], b"Subject: in\r\n\r\nhello\r\n")
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
            s.starttls(context=ssl._create_unverified_context())
            s.login(ALICE, PASSWORD)
            s.sendmail(ALICE, ["carol@remote.test"], b"Subject: out\r\n\r\nqueued\r\n")
        m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
        m.login(ALICE, PASSWORD)
        assert m.create("Projects/2024")[0] == "OK"
        assert m.append("Projects/2024", None, None, b"Subject: a\r\n\r\nb\r\n")[0] == "OK"
        assert m.select("INBOX")[0] == "OK"
        assert m.store("1", "+FLAGS", "(\\Seen)")[0] == "OK"
        m.logout()
        p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
        p.user(ALICE)
        p.pass_(PASSWORD)
        assert p.stat()[0] == 1
        p.quit()
        assert "carol@remote.test" in srv.cli("queue", "list").stdout
        names = {str(p.relative_to(srv.data)) for p in srv.data.rglob("*")}
        for expected in ("passwd", "tls/key.pem", "queue", "imap"):
            assert expected in names, sorted(names)
        assert any(n.endswith(".sqlite") for n in names), sorted(names)
        assert any(n.endswith(".subscriptions") for n in names), sorted(names)
        wrong = _modes(srv.data)
        assert wrong == {}, " ".join(f"{k}={v}" for k, v in sorted(wrong.items()))
        assert stat.S_IMODE(srv.data.stat().st_mode) == 0o700
    finally:
        srv.stop()
