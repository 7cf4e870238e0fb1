"""
Reload end to end: a real ``twistd -n mailsrv`` gets SIGHUP after its config
file, password file or aliases file changed. New connections follow the new
settings while the sessions opened before keep theirs (an SMTP transaction
started before completes, an IMAP session stays selected); a config that
does not load is refused with its problems logged; a changed listener is
named as needing a restart; a user or an alias edited in place (same size,
same modification time: invisible to the watchers) serves at once; and the
relay process works with the new settings.
"""

from __future__ import annotations

import imaplib
import os
import re
import signal
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import PASSWORD, MailServer, free_port
from tests.test_hangup import wait_for_log

ALICE = "alice@example.test"
RELOADED = r"SIGHUP: reloaded the configuration"


def hup(srv: MailServer, pattern: str = RELOADED) -> str:
    """SIGHUP the server and wait for one more log line matching C{pattern}."""
    assert srv.proc is not None
    count = len(re.findall(pattern, srv.output_all()))
    srv.proc.send_signal(signal.SIGHUP)
    return wait_for_log(srv, pattern, count + 1)


def edit(srv: MailServer, old: str, new: str) -> None:
    text = srv.config_path.read_text()
    assert old in text, text
    srv.config_path.write_text(text.replace(old, new, 1))


def replace_in_place(path: Path, old: bytes, new: bytes) -> None:
    """
    Replace C{old} by C{new} (as long) in C{path}: same inode, same size and
    same modification time, as an edit within the file system's time
    granularity looks to a program that watches the file.
    """
    assert len(old) == len(new)
    st = os.stat(path)
    data = path.read_bytes()
    assert old in data
    with open(path, "r+b") as f:
        f.write(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_ino == st.st_ino


class LogText(MailServer):
    def output_all(self) -> str:
        return (self.base / "server.log").read_text(errors="replace")


def server(base: Path, extra: str = "") -> LogText:
    srv = LogText(base, extra=extra + "[policy]\n")
    srv.add_user(ALICE)
    return srv


def message(size: int, sender: bytes = b"bob@sender.test") -> bytes:
    head = b"From: " + sender + b"\r\nTo: alice@example.test\r\nSubject: big\r\n\r\n"
    return head + b"x" * (size - len(head) - 2) + b"\r\n"


def test_new_connections_follow_the_new_settings_open_sessions_keep_theirs(tmp_path):
    with server(tmp_path, "[limits]\nmax_message_size = 65536\n") as srv:
        ports = srv.ports
        # Before the reload: an SMTP transaction under way, an IMAP session selected.
        old_smtp = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30)
        assert old_smtp.ehlo("client.test")[0] == 250
        assert old_smtp.esmtp_features["size"] == "65536"
        assert old_smtp.mail("bob@sender.test")[0] == 250
        assert old_smtp.rcpt(ALICE)[0] == 250
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        imap.login(ALICE, PASSWORD)
        assert imap.select("INBOX")[0] == "OK"
        idle = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)  # told goodbye at the stop
        idle.login(ALICE, PASSWORD)

        edit(srv, 'hostname = "mx.example.test"', 'hostname = "mx2.example.test"')
        edit(srv, "max_message_size = 65536", "max_message_size = 2048")
        edit(srv, "[policy]\n", '[policy]\ndeny = ["127.0.0.3/32"]\n')
        text = hup(srv)
        assert "take effect only at a restart" not in text

        # A new connection: the new hostname, size limit and denied network.
        with smtplib.SMTP(timeout=30, source_address=("127.0.0.2", 0)) as new:
            code, greeting = new.connect("127.0.0.1", ports["smtp"])
            assert code == 220 and greeting.startswith(b"mx2.example.test"), greeting
            assert new.ehlo("client.test")[0] == 250
            assert new.esmtp_features["size"] == "2048"
            assert new.mail("bob@sender.test", ["SIZE=4000"])[0] == 552  # RFC 1870 6.1
        denied = socket.create_connection(
            ("127.0.0.1", ports["smtp"]), timeout=30, source_address=("127.0.0.3", 0)
        )
        with denied:
            assert denied.recv(512).startswith(b"554 5.7.1 mx2.example.test Access denied")

        # The sessions opened before: the transaction completes under the old limit.
        assert old_smtp.data(message(4000))[0] == 250
        old_smtp.quit()
        assert imap.noop()[0] == "OK"
        assert imap.state == "SELECTED"
        typ, data = imap.search(None, "ALL")
        assert typ == "OK"
        imap.logout()

        # SIGTERM: a session of the settings before the reload hears the goodbye too.
        srv.stop()
        assert idle.readline().startswith(b"* BYE"), srv.output()
        idle.shutdown()


def test_a_broken_config_is_refused_and_a_listener_change_named(tmp_path):
    with server(tmp_path) as srv:
        edit(srv, 'hostname = "mx.example.test"', 'hostname = "mx2.example.test"')
        srv.config_path.write_text(
            srv.config_path.read_text() + '[limits]\nmax_message_size = "big"\n'
        )
        text = hup(srv, r"SIGHUP: configuration refused")
        assert re.search(r"SIGHUP: .*mailsrv\.toml: .*max_message_size", text), text
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            code, greeting = s.ehlo("client.test")
            assert code == 250 and greeting.startswith(b"mx.example.test")  # the old settings

        # Fixed, with the MX listener moved: named, and the old port still serves.
        text = srv.config_path.read_text().replace('[limits]\nmax_message_size = "big"\n', "")
        old_port = srv.ports["smtp"]
        text = text.replace(f"tcp:{old_port}:", f"tcp:{free_port()}:")
        srv.config_path.write_text(text)
        text = hup(srv)
        assert re.search(r"take effect only at a restart .*: listen\b", text), text
        with smtplib.SMTP("127.0.0.1", old_port, timeout=30) as s:
            code, greeting = s.ehlo("client.test")
            assert code == 250 and greeting.startswith(b"mx2.example.test")


def test_users_and_aliases_edited_in_place_serve_after_sighup(tmp_path):
    (tmp_path / "aliases").write_text(f"list1@example.test: {ALICE}\n")
    srv = server(tmp_path, '[addresses]\naliases = "aliases"\n')
    srv.add_user("carol@example.test")
    with srv:
        # Both files read once by the server.
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        imap.login("carol@example.test", PASSWORD)
        imap.logout()
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            s.ehlo("client.test")
            s.mail("bob@sender.test")
            assert s.rcpt("list1@example.test")[0] == 250
            assert s.rcpt("list2@example.test")[0] == 550

        replace_in_place(srv.data / "passwd", b"carol@", b"bobby@")
        replace_in_place(tmp_path / "aliases", b"list1@", b"list2@")
        hup(srv)

        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        assert imap.login("bobby@example.test", PASSWORD)[0] == "OK"
        imap.logout()
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            s.ehlo("client.test")
            s.mail("bob@sender.test")
            assert s.rcpt("list2@example.test")[0] == 250
            assert s.rcpt("list1@example.test")[0] == 550


class Sink:
    """A minimal SMTP server on 127.0.0.1 (RFC 5321 4.3.2) that keeps what it is sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.done = threading.Event()
        self.got = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    self._session(conn.makefile("rb"), conn)
                except OSError:
                    pass

    def _session(self, rfile, conn) -> None:
        conn.sendall(b"220 sink.test ESMTP\r\n")
        while True:
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                conn.sendall(b"250 sink.test\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go on\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = rfile.readline()
                    if not chunk:
                        return
                    data += chunk
                self.messages.append(data)
                conn.sendall(b"250 2.0.0 kept\r\n")
                self.got.set()
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def test_the_relay_process_takes_the_new_settings(tmp_path, sink):
    nowhere = free_port()  # nothing listens there
    with server(tmp_path, f'[relay]\nsmarthost = "127.0.0.1:{nowhere}"\n') as srv:
        wait_for_log(srv, r"relay process started \(pid \d+\)")
        edit(srv, f'smarthost = "127.0.0.1:{nowhere}"', f'smarthost = "127.0.0.1:{sink.port}"')
        text = hup(srv, r"relay process started \(pid \d+\)")
        pids = re.findall(r"relay process started \(pid (\d+)\)", text)
        assert len(set(pids)) == 2
        assert "relay process ended" not in text  # stopped on purpose, not a crash
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
            s.ehlo("client.test")
            s.login(ALICE, PASSWORD)
            s.sendmail(ALICE, ["carol@remote.test"], message(500, ALICE.encode()))
        assert sink.got.wait(30), srv.output()
        assert b"Subject: big" in sink.messages[0]
