"""
End to end, as root: a real ``twistd -n mailsrv`` started as root binds the
standard ports (25, 465, 587, 110, 995, 143, 993) on a loopback address of
its own, then runs as ``nobody:nogroup`` (C{[server] user}/C{group}), its
relay process and its sender verification process too; mail sent with SMTP
is read with POP3 and IMAP; SIGHUP, as nobody, makes new TLS connections get
a renewed certificate and lets a new user log in; and everything in the data
folder is nobody's with modes no wider than 0700/0600. A file left there by root ends the next
start with the C{chown} command that fixes it; started as root with no
account to run as, the server refuses. Skipped unless run as root.
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_chain
from tests.e2e import PASSWORD, TWISTD, MailServer, _children
from tests.test_hangup import wait_for_log

ROOT = Path(__file__).resolve().parent.parent

ADDRESS = "127.0.0.77"  # not 127.0.0.1: a system Postfix or Dovecot may listen there
PORTS = {
    "smtp": 25,
    "submission": 587,
    "submissions": 465,
    "pop3": 110,
    "pop3s": 995,
    "imap": 143,
    "imaps": 993,
}
USER, GROUP = "nobody", "nogroup"
ALICE = "alice@example.test"
DAVE = "dave@example.test"


def _account() -> tuple[int, int] | None:
    try:
        return pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return None


def _taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ADDRESS, port))
        except OSError:
            return True
    return False


def _runs(python: str) -> bool:
    """Whether the account can run C{python} with mailsrv and Twisted."""
    ids = _account()
    assert ids is not None
    try:
        probe = subprocess.run(
            [python, "-c", "import encodings.idna, mailsrv.tap, twisted.scripts.twistd"],
            user=ids[0],
            group=ids[1],
            extra_groups=[],
            capture_output=True,
            cwd="/",
            timeout=60,
        )
    except OSError:
        return False
    return probe.returncode == 0


def _twistd_for_account(folder: Path) -> str | None:
    """
    A twistd the account can run: this Python's, else (this Python's files
    are root's alone, as under /root/.pyenv) a venv in C{folder} on the
    system's Python of the same version that imports this one's packages.
    """
    if _runs(sys.executable):
        return TWISTD
    system = shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}", path="/usr/bin")
    if system is None:
        return None
    venv = folder / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = sysconfig.get_paths()["purelib"]
    (Path(sysconfig.get_paths(vars={"base": str(venv)})["purelib"]) / "parent.pth").write_text(
        f"import site; site.addsitedir({purelib!r})\n"
    )
    python = str(venv / "bin" / "python")
    twistd = venv / "bin" / "twistd"
    twistd.write_text(f"#!{python}\nfrom twisted.scripts.twistd import run\nrun()\n")
    twistd.chmod(0o755)
    if _runs(python):
        return str(twistd)
    # The packages and this checkout lie below a folder the account cannot enter
    # (a clone in a mkdtemp folder, 0700): a copy of both where it can.
    site = folder / "site"
    shutil.copytree(purelib, site, ignore=shutil.ignore_patterns("__pycache__", "__editable__*"))
    for part in ("mailsrv", "twisted/plugins"):
        shutil.copytree(ROOT / part, site / part, dirs_exist_ok=True)
    (Path(sysconfig.get_paths(vars={"base": str(venv)})["purelib"]) / "parent.pth").write_text(
        f"import site; site.addsitedir({str(site)!r})\n"
    )
    return str(twistd) if _runs(python) else None


pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0, reason="binding ports below 1024 and switching user need root"
    ),
    pytest.mark.skipif(_account() is None, reason=f"no {USER} user or {GROUP} group here"),
]


def _ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid (real, effective, saved, filesystem) and Groups of process C{pid}."""
    ids: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(v) for v in value.split()]
    return ids


@pytest.fixture
def dns() -> Iterator[int]:
    """A UDP name server on 127.0.0.1 that answers every query NXDOMAIN: its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                query, peer = sock.recvfrom(4096)
            except OSError:
                continue
            if len(query) < 12:
                continue
            # RFC 1035 4.1.1: the query back with QR set, and RCODE 3 (name error).
            flags = bytes([query[2] | 0x80, (query[3] & 0x70) | 0x03])
            sock.sendto(query[:2] + flags + query[4:6] + b"\0\0\0\0\0\0" + query[12:], peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    done.set()
    thread.join()
    sock.close()


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder the unprivileged account can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="mailsrv-privileges-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _server(base: Path, dns_port: int, extra: str = "") -> MailServer:
    """A server on the standard ports of L{ADDRESS}, to run as nobody:nogroup."""
    server = MailServer(
        base,
        extra=(
            f'{extra}[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
            "[policy]\nreverse_dns = false\nauthentication_workers = 1\n"
        ),
    )
    text = server.config_path.read_text()
    text = text.replace(
        'data_dir = "data"\n', f'data_dir = "data"\nuser = "{USER}"\ngroup = "{GROUP}"\n'
    )
    for name, port in PORTS.items():
        old = f'{name} = ["tcp:{server.ports[name]}:interface=127.0.0.1"]'
        assert old in text
        text = text.replace(old, f'{name} = ["tcp:{port}:interface={ADDRESS}"]')
    server.config_path.write_text(text)
    server.ports = dict(PORTS)
    return server


def _install_certificate(live: Path, folder: Path, ids: tuple[int, int]) -> Path:
    """A new chain for mx.example.test, written over the files in C{live} (as an ACME
    client renews them), readable by the account: its root CA."""
    chain = make_chain(folder)
    for source, name in ((chain.fullchain, "fullchain.pem"), (chain.key, "privkey.pem")):
        target = live / name
        target.write_bytes(source.read_bytes())
        os.chown(target, *ids)
        target.chmod(0o600)
    return chain.root


def _served_by(root: Path) -> bool:
    """Whether a new TLS connection to submissions gets a certificate issued under C{root}."""
    context = ssl.create_default_context(cafile=str(root))
    with socket.create_connection((ADDRESS, PORTS["submissions"]), timeout=60) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="mx.example.test") as tls:
                return tls.recv(512).startswith(b"220 ")
        except ssl.SSLCertVerificationError:
            return False


def test_binds_low_ports_then_runs_as_the_account(
    base: Path, dns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = [port for port in PORTS.values() if _taken(port)]
    if taken:
        pytest.skip(f"something already listens on {ADDRESS} port {taken}")
    twistd = _twistd_for_account(base)
    if twistd is None:
        pytest.skip(f"{USER} cannot run {sys.executable} with mailsrv (its files are root's alone)")
    monkeypatch.setattr("tests.e2e.TWISTD", twistd)
    uid, gid = _account()  # type: ignore[misc]
    live = base / "live"  # where an ACME client keeps the current certificate
    live.mkdir(mode=0o755)
    first = _install_certificate(live, base / "pki1", (uid, gid))
    tls = f'[tls]\ncertificate = "{live / "fullchain.pem"}"\nkey = "{live / "privkey.pem"}"\n'
    server = _server(base, dns, tls)
    try:
        server.start()
        assert server.proc is not None
        ids = _ids(server.proc.pid)
        assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [gid] * 4, ids
        assert set(ids["Groups"]) <= {gid}, ids  # no supplementary group of root's is kept
        server.add_user(ALICE)  # the mailsrv command, run as root: the file stays nobody's

        with smtplib.SMTP(ADDRESS, 25, timeout=60) as smtp:
            smtp.sendmail(
                "bob@sender.test",
                [ALICE],
                b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: hello\r\n\r\nhi\r\n",
            )

        # The relay process and the verifier process (started by that message) run as nobody.
        children = _children(server.proc.pid)
        kinds = {pid: cmd for pid, cmd in children.items() if b"mailsrv" in cmd}
        assert any(b"relay" in c or b"outbound" in c for c in kinds.values()), children
        assert any(b"worker_main" in c or b"authres" in c for c in kinds.values()), children
        for pid in children:
            child = _ids(pid)
            assert child["Uid"] == [uid] * 4 and child["Gid"] == [gid] * 4, (children[pid], child)

        pop = poplib.POP3(ADDRESS, 110, timeout=60)
        try:
            pop.user(ALICE)
            pop.pass_(PASSWORD)
            lines = pop.retr(1)[1]
            assert b"Subject: hello" in lines
        finally:
            pop.quit()
        imap = imaplib.IMAP4(ADDRESS, 143, timeout=60)
        try:
            imap.login(ALICE, PASSWORD)
            imap.select("INBOX")
            typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK" and b"Subject: hello" in bytes(data[0][1])  # type: ignore[index]
        finally:
            imap.logout()

        # Reload, as nobody: a renewed certificate and a new user.
        assert _served_by(first)
        second = _install_certificate(live, base / "pki2", (uid, gid))
        server.add_user(DAVE)
        server.proc.send_signal(signal.SIGHUP)
        text = wait_for_log(server, r"SIGHUP: reloaded the configuration")
        assert "SIGHUP: cannot" not in text and "SIGHUP: reloaded the TLS certificate" in text
        assert _served_by(second)
        assert not _served_by(first)
        imap = imaplib.IMAP4(ADDRESS, 143, timeout=60)
        try:
            assert imap.login(DAVE, PASSWORD)[0] == "OK"
        finally:
            imap.logout()
        assert re.search(r"relay process started", text)  # and it still runs, as nobody
        for pid in _children(server.proc.pid):
            assert _ids(pid)["Uid"] == [uid] * 4
    finally:
        server.close()  # SIGTERM, by pid; then its children
    assert "Server Shut Down." in server.output()

    loose = []
    for folder, dirs, files in os.walk(server.data):
        for name in [".", *dirs, *files]:
            path = Path(folder, name)
            st = os.lstat(path)
            widest = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if (st.st_uid, st.st_gid) != (uid, gid) or stat.S_IMODE(st.st_mode) & ~widest:
                loose.append(f"{path} {st.st_uid}:{st.st_gid} {oct(stat.S_IMODE(st.st_mode))}")
    assert not loose, loose

    # A file left by root in the data folder: the next start refuses, naming the fix.
    (server.data / "left-by-root").write_text("")
    out = _run(server.config_path, dict(os.environ))
    assert out.returncode != 0
    assert f"fix with: chown -R {USER}:{GROUP} {server.data}" in out.stdout, out.stdout
    assert "left-by-root (root)" in out.stdout, out.stdout


def _run(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """twistd mailsrv with C{config}, expected to end at start-up."""
    return subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "mailsrv", "--config", str(config)],
        cwd=str(config.parent),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )


def test_root_without_an_account_is_refused(base: Path) -> None:
    server = MailServer(base)
    env = {k: v for k, v in os.environ.items() if k != "MAILSRV_ALLOW_ROOT"}
    out = _run(server.config_path, env)
    assert out.returncode == 1, out.stdout
    assert "mailsrv: cannot start: server.user" in out.stdout, out.stdout
    assert "the mail services do not run as root" in out.stdout
    assert not server.data.exists()  # nothing created as root
