"""
An installation of the version before international addresses, upgraded:
its users' folders are where that version put them (the domain as written
in the password file, lower-cased; the local part as written). A real
``twistd -n mailsrv`` refuses to start with the commands that move them to
today's names (it never moves mail itself), and once the admin ran them the
users read their old mail over POP3 and IMAP. Two password-file lines that
were two users and are now one refuse the start too.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mailsrv.auth.passwd import PasswordFile, default_hasher
from mailsrv.imap.account import subscriptions_path
from mailsrv.spool import BytesSource
from mailsrv.store.index import index_base
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.names import user_dir
from mailsrv.store.upgrade import OldNames, check_user_names, user_paths
from tests.e2e import PASSWORD, MailServer
from tests.store_contract import NOW, SyncReactor, SyncThreadPool
from tests.test_startup_errors import assert_one_line, run_twistd

DOMAINS = ("bücher.example", "example.test")
ANNA_OLD = "anna@bücher.example"
ANNA_NEW = "anna@xn--bcher-kva.example"
JOSE_NFD = "jose\u0301@example.test"
JOSE_NFC = "jos\u00e9@example.test"


def mbox(*subjects: str) -> bytes:
    return b"".join(
        b"From old@remote.test Mon Jan  1 00:00:00 2024\n"
        + f"Subject: {s}\n\n{s} body\n\n".encode()
        for s in subjects
    )


def write_passwd(data: Path, *addresses: str) -> None:
    """A password file as the older version's C{user add} wrote it."""
    h = default_hasher().hash(PASSWORD)
    data.mkdir(parents=True, exist_ok=True)
    (data / "passwd").write_text("".join(f"{a}:{h}\n" for a in addresses), encoding="utf-8")
    os.chmod(data / "passwd", 0o600)


def old_layout(data: Path) -> None:
    """
    What the older version left: anna's folders under the U-label domain
    (an INBOX with its index, an Archive, her IMAP subscriptions), José's
    under his NFD local part.
    """
    write_passwd(data, ANNA_OLD, JOSE_NFD)
    # anna's mail and index as the store writes them, under the old names.
    store = MboxMailStore(
        data / "mail", data / "index", SyncReactor(), SyncThreadPool(), clock=lambda: NOW
    )
    for s in ("old one", "old two"):
        store.deliver(ANNA_NEW, BytesSource(mbox(s).split(b"\n", 1)[1]), "old@remote.test")
    for sub in ("mail", "index"):
        (data / sub / "bücher.example").mkdir()
        os.rename(data / sub / "xn--bcher-kva.example" / "anna", data / sub / "bücher.example/anna")
        (data / sub / "xn--bcher-kva.example").rmdir()
    (data / "mail/bücher.example/anna/Archive").write_bytes(mbox("archived"))
    (data / "imap/bücher.example").mkdir(parents=True)
    (data / "imap/bücher.example/anna.subscriptions").write_text("Archive\nINBOX\n")
    jose = data / "mail" / "example.test" / "jose\u0301"
    jose.mkdir(parents=True)
    (jose / "INBOX").write_bytes(mbox("para josé"))


def pop3_subjects(srv: MailServer, user: str) -> list[str]:
    p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
    try:
        p.user(user)
        p.pass_(PASSWORD)
        count, _ = p.stat()
        out = []
        for i in range(count):
            lines = p.retr(i + 1)[1]
            out += [ln.decode()[9:] for ln in lines if ln.startswith(b"Subject: ")]
        return out
    finally:
        p.quit()


def commands(text: str) -> list[str]:
    """The shell commands a start-up error gives, in order."""
    return re.findall(r"`([^`]+)`", text)


def test_old_folders_stop_the_start_with_the_commands_that_move_them(tmp_path):
    srv = MailServer(tmp_path, domains=DOMAINS)
    data = srv.data
    old_layout(data)
    r = run_twistd(tmp_path, srv.config_path)
    assert r.returncode != 0
    said = r.stdout + r.stderr
    assert "Traceback" not in said, said
    assert "cannot start" in said and "server.data_dir" in said
    todo = commands(said)
    assert len(todo) == 4  # anna's mail, index and subscriptions; José's mail
    # Nothing was moved by the server.
    assert (data / "mail/bücher.example/anna/INBOX").exists()
    assert not (data / "mail/xn--bcher-kva.example").exists()
    for command in todo:
        subprocess.run(["sh", "-c", command], check=True)
    with srv:
        assert pop3_subjects(srv, ANNA_NEW) == ["old one", "old two"]
        assert pop3_subjects(srv, ANNA_OLD) == ["old one", "old two"]
        assert pop3_subjects(srv, JOSE_NFC) == ["para josé"]
        m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        try:
            assert m.login(ANNA_NEW, PASSWORD)[0] == "OK"
            typ, lsub = m.lsub()
            assert typ == "OK" and sorted(lsub) == [b'() "/" Archive', b'() "/" INBOX'], lsub
            assert m.select("Archive") == ("OK", [b"1"])
            typ, got = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK" and b"Subject: archived" in got[0][1]
        finally:
            m.logout()


def test_both_names_present_are_not_merged_nor_served(tmp_path):
    # The new name may hold another user's leftovers (a deleted user's folder):
    # serving either would hide or mix mail.
    srv = MailServer(tmp_path, domains=DOMAINS)
    data = srv.data
    write_passwd(data, ANNA_OLD)
    old = data / "mail/bücher.example/anna"
    new = data / "mail/xn--bcher-kva.example/anna"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    (old / "INBOX").write_bytes(mbox("old"))
    (new / "INBOX").write_bytes(mbox("new"))
    r = run_twistd(tmp_path, srv.config_path)
    assert r.returncode != 0
    said = r.stdout + r.stderr
    assert "Traceback" not in said, said
    assert "both belong to" in said and f"{shlex.quote(str(new))}.aside" in said
    assert (old / "INBOX").read_bytes() == mbox("old")
    assert (new / "INBOX").read_bytes() == mbox("new")


def test_a_line_already_in_the_new_spelling_still_finds_the_old_folders(tmp_path):
    # `mailsrv user passwd` of the new version writes the line in the new form
    # before the first start: the folders on disk still say where the mail is.
    data = tmp_path / "data"
    old_layout(data)
    write_passwd(data, ANNA_NEW, JOSE_NFC)
    with pytest.raises(OldNames) as e:
        check_user_names(data, PasswordFile(data / "passwd"))
    assert len(commands(str(e.value))) == 4


def test_folders_of_nobody_under_an_old_name_are_only_reported(tmp_path):
    data = tmp_path / "data"
    write_passwd(data, "bob@example.test", "anna@\u2603.example")  # a symbol: not IDNA2008
    gone = data / "mail/bücher.example/anna"  # a user deleted before the upgrade
    gone.mkdir(parents=True)
    kept = data / "mail/\u2603.example/anna"
    kept.mkdir(parents=True)
    reported = check_user_names(data, PasswordFile(data / "passwd"))
    assert len(reported) == 2
    assert any("no user is named so now" in r for r in reported)
    assert any("not a usable name" in r for r in reported)
    assert gone.is_dir() and kept.is_dir()


@pytest.mark.parametrize(
    "first, second",
    [(ANNA_OLD, "Anna@xn--bcher-kva.example"), (JOSE_NFD, JOSE_NFC)],
    ids=["u-label-and-a-label", "nfd-and-nfc"],
)
def test_two_users_that_are_now_one_refuse_the_start(tmp_path, first, second):
    srv = MailServer(tmp_path, domains=DOMAINS)
    write_passwd(srv.data, first, "bob@example.test", second)
    local, domain = first.rsplit("@", 1)
    old = srv.data / "mail" / domain.lower() / local
    old.mkdir(parents=True)
    (old / "INBOX").write_bytes(mbox("first"))
    r = run_twistd(tmp_path, srv.config_path)
    line = assert_one_line(
        tmp_path, r, "cannot start", "auth.passwd_file", f"line 1 ({first}) and line 3 ({second})"
    )
    assert "another address" in line
    # Nothing was moved or rewritten.
    assert (old / "INBOX").read_bytes() == mbox("first")
    assert (srv.data / "passwd").read_text("utf-8").splitlines()[0].startswith(first + ":")


def test_user_add_refuses_the_other_spelling_of_a_user(tmp_path):
    srv = MailServer(tmp_path, domains=DOMAINS)
    srv.add_user(ANNA_NEW)
    srv.add_user(JOSE_NFC)
    for other in (ANNA_OLD, "Anna@Bücher.example", JOSE_NFD):
        r = srv.cli("user", "add", other, stdin=PASSWORD + "\n", check=False)
        assert r.returncode != 0 and "already exists" in r.stderr, other
    assert srv.cli("user", "list").stdout.split() == [ANNA_NEW, JOSE_NFC]


def test_the_upgrade_knows_every_path_named_by_a_user(tmp_path):
    """L{user_paths} in today's form are the paths the store and the IMAP server use."""
    data = tmp_path / "data"
    paths = user_paths(data, "jos\u00e9", "xn--bcher-kva.example")
    subs = subscriptions_path(data, "josé@Bücher.example")
    assert paths == [
        user_dir(data / "mail", "josé@Bücher.example"),
        index_base(data / "index", "xn--bcher-kva.example", "jos\u00e9", "INBOX").parent,
        subs,
        subs.with_name(subs.name + ".lock"),
    ]


def test_the_admin_command_leaves_two_spellings_of_one_user_alone(tmp_path):
    """Rewriting the file would keep one hash for two users: the command refuses, the file stays."""
    srv = MailServer(tmp_path, domains=DOMAINS)
    write_passwd(srv.data, ANNA_OLD, "bob@example.test", ANNA_NEW)
    before = (srv.data / "passwd").read_bytes()
    for args in (("user", "add", "carol@example.test"), ("user", "del", "bob@example.test")):
        r = srv.cli(*args, stdin=PASSWORD + "\n", check=False)
        assert r.returncode != 0, r
        assert f"line 1 ({ANNA_OLD}) and line 3 ({ANNA_NEW})" in r.stderr
    assert (srv.data / "passwd").read_bytes() == before
