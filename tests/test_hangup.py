"""
SIGHUP, as a terminal's hang-up or ``systemctl reload`` sends it: a real
``twistd -n mailsrv`` keeps serving, logs what it did, reads its TLS
certificate and key again (ACME clients renew them in place), and its relay
process lives on.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import time
from pathlib import Path

import pytest

from tests.certs import make_chain
from tests.e2e import MailServer


def wait_for_log(srv: MailServer, pattern: str, count: int = 1, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (srv.base / "server.log").read_text(errors="replace")
        if len(re.findall(pattern, text)) >= count:
            return text
        assert srv.proc is not None and srv.proc.poll() is None, srv.output()
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the log after {timeout}s:\n{srv.output()}")


def alive(pid: int) -> bool:
    """Running, and not a zombie its parent has yet to reap."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def ignores_sighup(pid: int, timeout: float = 10.0) -> bool:
    """Whether the process's ignored-signals mask has SIGHUP, once it got that far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        mask = int(re.search(r"\nSigIgn:\t([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
        if mask & (1 << (signal.SIGHUP - 1)):
            return True
        time.sleep(0.05)
    return False


def submissions_ehlo(srv: MailServer, root: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(root))
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], context=ctx, timeout=30) as s:
        return s.ehlo()[0]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_sighup_keeps_serving_and_reloads_the_certificate(tmp_path):
    first = make_chain(tmp_path / "pki1")
    live = tmp_path / "live"  # where an ACME client keeps the current files
    live.mkdir()
    (live / "fullchain.pem").write_bytes(first.fullchain.read_bytes())
    (live / "privkey.pem").write_bytes(first.key.read_bytes())
    srv = MailServer(
        tmp_path,
        extra=f'[tls]\ncertificate = "{live / "fullchain.pem"}"\nkey = "{live / "privkey.pem"}"\n',
    )
    with srv:
        text = wait_for_log(srv, r"relay process started \(pid \d+\)")
        relay_pid = int(re.findall(r"relay process started \(pid (\d+)\)", text)[0])
        assert submissions_ehlo(srv, first.root) == 250
        ignores_sighup(relay_pid)  # past its start-up, so that the signal tests its set-up

        # Renewed in place, then SIGHUP to the server and (as a terminal
        # does to its whole process group) to the relay process.
        second = make_chain(tmp_path / "pki2")
        (live / "fullchain.pem").write_bytes(second.fullchain.read_bytes())
        (live / "privkey.pem").write_bytes(second.key.read_bytes())
        assert srv.proc is not None
        os.kill(relay_pid, signal.SIGHUP)
        srv.proc.send_signal(signal.SIGHUP)
        text = wait_for_log(srv, r"SIGHUP: reloaded the TLS certificate")
        assert str(live / "fullchain.pem") in text
        assert srv.proc.poll() is None
        assert submissions_ehlo(srv, second.root) == 250  # the renewed certificate
        with pytest.raises(ssl.SSLCertVerificationError):
            submissions_ehlo(srv, first.root)
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            assert s.ehlo("client.test")[0] == 250

        # A broken file does not take the server down: the old one stays.
        (live / "privkey.pem").write_text("not a key\n")
        srv.proc.send_signal(signal.SIGHUP)
        text = wait_for_log(srv, r"SIGHUP: cannot reload the TLS certificate")
        assert submissions_ehlo(srv, second.root) == 250

        assert alive(relay_pid)
        assert len(re.findall(r"relay process started", text)) == 1
        assert "relay process ended" not in text
