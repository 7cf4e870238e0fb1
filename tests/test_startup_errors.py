"""
A server that cannot start says why in one line that names the setting, its
value and the config file, and exits with a non-zero status: a real
``twistd -n mailsrv --config FILE`` in a subprocess, no traceback, no usage
text, no pid file left behind.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e import SERVICES, TWISTD, free_port


def write_config(base: Path, listen: dict[str, str] | None = None, extra: str = "") -> Path:
    """A config with every listener on a free loopback port, unless given in C{listen}."""
    listen = dict(listen or {})
    for name in SERVICES:
        listen.setdefault(name, f"tcp:{free_port()}:interface=127.0.0.1")
    path = base / "mailsrv.toml"
    lines = "\n".join(f'{name} = ["{e}"]' for name, e in listen.items())
    path.write_text(
        '[server]\nhostname = "mx.example.test"\ndomains = ["example.test"]\n'
        f'data_dir = "data"\n{extra}\n[listen]\n{lines}\n'
    )
    return path


def run_twistd(base: Path, config: Path, log_file: bool = False) -> subprocess.CompletedProcess:
    cmd = [TWISTD, "--nodaemon", f"--pidfile={base / 'twistd.pid'}"]
    if log_file:
        cmd.append(f"--logfile={base / 'server.log'}")
    cmd += ["mailsrv", "--config", str(config)]
    return subprocess.run(cmd, cwd=str(base), capture_output=True, text=True, timeout=60)


def assert_one_line(base: Path, r: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status non-zero; one line on stderr or stdout with all C{words}; no traceback."""
    log = base / "server.log"
    everything = r.stdout + r.stderr + (log.read_text() if log.exists() else "")
    assert r.returncode != 0, everything
    assert "Traceback" not in everything, everything
    assert "Usage:" not in everything, everything
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if all(w in ln for w in words)]
    assert lines, everything
    assert not (base / "twistd.pid").exists()
    return lines[0]


@pytest.mark.parametrize("log_file", [False, True], ids=["log-to-stdout", "log-file"])
def test_port_in_use(tmp_path, log_file):
    for _ in range(3):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            endpoint = f"tcp:{port}:interface=127.0.0.1"
            config = write_config(tmp_path, {"imap": endpoint})
            r = run_twistd(tmp_path, config, log_file=log_file)
        if "listen.imap" in r.stdout + r.stderr:
            break
        # Another program took one of the other free ports meanwhile: that
        # listener is the one refused. Try again with new ports.
        (tmp_path / "server.log").unlink(missing_ok=True)
    line = assert_one_line(tmp_path, r, "listen.imap", endpoint, str(config))
    assert "in use" in line


def test_port_out_of_range(tmp_path):
    config = write_config(tmp_path, {"smtp": "tcp:99999:interface=127.0.0.1"})
    r = run_twistd(tmp_path, config)
    assert r.returncode == 2
    line = assert_one_line(tmp_path, r, "listen.smtp", "tcp:99999", str(config))
    assert "65535" in line


@pytest.mark.parametrize("kind", ["missing", "a folder", "not PEM"])
def test_unusable_certificate(tmp_path, kind):
    cert = tmp_path / "cert.pem"
    if kind == "a folder":
        cert.mkdir()
    elif kind == "not PEM":
        cert.write_text("this is not a certificate\n")
    key = tmp_path / "key.pem"
    key.write_text("")
    config = write_config(tmp_path, extra=f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n')
    r = run_twistd(tmp_path, config)
    assert_one_line(tmp_path, r, "tls.certificate", str(cert), str(config))


def test_unusable_key(tmp_path):
    from tests.certs import make_chain

    chain = make_chain(tmp_path / "pki")
    other = make_chain(tmp_path / "other")
    config = write_config(
        tmp_path, extra=f'[tls]\ncertificate = "{chain.fullchain}"\nkey = "{other.key}"\n'
    )
    r = run_twistd(tmp_path, config)
    assert_one_line(tmp_path, r, "tls.key", str(other.key), str(config))


def test_data_dir_not_writable(tmp_path):
    # A path below a regular file cannot be made, even by root.
    (tmp_path / "notadir").write_text("a file\n")
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('data_dir = "data"', 'data_dir = "notadir/data"'))
    r = run_twistd(tmp_path, config)
    assert_one_line(tmp_path, r, "server.data_dir", str(tmp_path / "notadir" / "data"), str(config))
