"""
A real ``twistd -n mailsrv`` writes no line per DNS query, per resolver
set-up or per factory start and stop: not in a log file (the relay
process's lines come through the server) nor on standard output (the relay
process writes its own).
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.e2e import PASSWORD, MailServer

NOISE = ("resolv.conf changed", "Resolver added", "Starting factory", "Stopping factory")
USER = "alice@example.test"


@pytest.mark.parametrize("to_stdout", [False, True], ids=["logfile", "stdout"])
def test_no_noise_lines(tmp_path: Path, to_stdout: bool) -> None:
    server = MailServer(tmp_path, log_to_stdout=to_stdout)
    server.add_user(USER)
    server.start()
    try:
        # Mail for another domain: the relay process looks up its MX.
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
            s.ehlo("client.test")
            s.login(USER, PASSWORD)
            s.sendmail(USER, ["bob@example.net"], b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        server.close()
    log = server.log_path if to_stdout else tmp_path / "server.log"
    text = log.read_text(errors="replace")
    assert "accepted" in text and "Server Shut Down" in text, text
    noisy = [line for line in text.splitlines() if any(n in line for n in NOISE)]
    assert noisy == [], text
    # Each listening line names its service, not a factory class.
    for name in ("smtp", "submission", "imap", "pop3s"):
        assert f"] {name} starting on {server.ports[name]}" in text, text
    assert "GateFactory" not in text, text
