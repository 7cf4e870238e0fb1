"""
fail2ban's stock Debian filters (postfix in mode auth/aggressive, dovecot)
read the login failures a real ``twistd -n mailsrv`` wrote to its log: the
failing client's address is found, a client that logged in is not.

Failing clients connect from 127.0.0.2, the one that logs in from 127.0.0.3
(both loopback on Linux), so the addresses tell the lines apart.
"""

from __future__ import annotations

import imaplib
import poplib
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.e2e import PASSWORD, MailServer

FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
FILTERS = Path("/etc/fail2ban/filter.d")
BAD = "127.0.0.2"
GOOD = "127.0.0.3"
USER = "alice@example.test"

pytestmark = pytest.mark.skipif(
    FAIL2BAN_REGEX is None or not (FILTERS / "postfix.conf").exists(),
    reason="fail2ban-regex or its filters are not installed (Debian package fail2ban)",
)


class _IMAP(imaplib.IMAP4):
    """An IMAP client whose connection comes from a chosen loopback address."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout):  # type: ignore[override]
        import socket

        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


class _POP3(poplib.POP3):
    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout):  # type: ignore[override]
        import socket

        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


def _smtp_auth(port: int, source: str, password: str) -> bool:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        try:
            s.login(USER, password)
        except smtplib.SMTPAuthenticationError:
            return False
        return True


def _imap_login(port: int, source: str, password: str) -> bool:
    c = _IMAP("127.0.0.1", port, source)
    try:
        c.login(USER, password)
    except imaplib.IMAP4.error:
        return False
    finally:
        c.shutdown()
    return True


def _pop3_login(port: int, source: str, password: str) -> bool:
    c = _POP3("127.0.0.1", port, source)
    try:
        c.user(USER)
        c.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        c.close()
    return True


@pytest.fixture(scope="module")
def log_file(tmp_path_factory) -> Path:
    """The log a real server wrote while clients failed and succeeded to log in."""
    base = tmp_path_factory.mktemp("f2b")
    server = MailServer(base)
    server.add_user(USER)
    server.start()
    try:
        submission = server.ports["submission"]
        assert not _smtp_auth(submission, BAD, "wrong")
        assert _smtp_auth(submission, GOOD, PASSWORD)
        assert not _imap_login(server.ports["imap"], BAD, "wrong")
        assert _imap_login(server.ports["imap"], GOOD, PASSWORD)
        assert not _pop3_login(server.ports["pop3"], BAD, "wrong")
        assert _pop3_login(server.ports["pop3"], GOOD, PASSWORD)
    finally:
        server.close()
    return base / "server.log"


def _matched_ips(log: Path, filter_spec: str) -> list[str]:
    assert FAIL2BAN_REGEX is not None
    out = subprocess.run(
        [FAIL2BAN_REGEX, "-o", "ip", str(log), filter_spec],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("mode", ["auth", "aggressive"])
def test_postfix_filter_matches_smtp_auth_failures(log_file: Path, mode: str) -> None:
    # smtplib tries PLAIN, then LOGIN: two failures, both the bad client's.
    ips = _matched_ips(log_file, f"{FILTERS / 'postfix.conf'}[mode={mode}]")
    assert ips and set(ips) == {BAD}, log_file.read_text()


def test_dovecot_filter_matches_imap_and_pop3_failures(log_file: Path) -> None:
    ips = _matched_ips(log_file, str(FILTERS / "dovecot.conf"))
    assert len(ips) >= 2 and set(ips) == {BAD}, log_file.read_text()  # IMAP and POP3
    text = log_file.read_text()
    assert f"imap-login: Login: user=<{USER}>, method=PLAIN, rip={GOOD}, lip=127.0.0.1" in text
    assert f"pop3-login: Login: user=<{USER}>, method=PLAIN, rip={GOOD}" in text
    assert f"[{GOOD}]: sasl_method=PLAIN, sasl_username={USER}" in text
