"""
Login lines of a real ``twistd -n mailsrv`` in the shapes Postfix and
Dovecot write them: an SMTP AUTH refused by the throttle is a Postfix SASL
failure line (fail2ban's stock postfix filter counts it), and POP3 USER/PASS
logs C{method=PLAIN}, as Dovecot 2.3's pop3-login does (it passes USER/PASS
on to its auth process as SASL PLAIN).

The failing client connects from 127.0.0.2, the one that logs in from
127.0.0.3 (both loopback on Linux).
"""

from __future__ import annotations

import imaplib
import poplib
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e import PASSWORD, MailServer

FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
FILTERS = Path("/etc/fail2ban/filter.d")
BAD = "127.0.0.2"
GOOD = "127.0.0.3"
USER = "alice@example.test"
MAX_FAILURES = 2
SMTP_LOGINS = 2  # smtplib tries PLAIN, then LOGIN: two attempts per login

needs_fail2ban = pytest.mark.skipif(
    FAIL2BAN_REGEX is None or not (FILTERS / "postfix.conf").exists(),
    reason="fail2ban-regex or its filters are not installed (Debian package fail2ban)",
)


class _POP3(poplib.POP3):
    """A POP3 client whose connection comes from a chosen loopback address."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout):  # type: ignore[override]
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


class _IMAP(imaplib.IMAP4):
    """An IMAP client whose connection comes from a chosen loopback address."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout):  # type: ignore[override]
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


def imap_login(port: int, source: str, password: str) -> bool:
    c = _IMAP("127.0.0.1", port, source)
    try:
        c.login(USER, password)
    except imaplib.IMAP4.error:
        return False
    finally:
        c.shutdown()
    return True


def smtp_auth(port: int, source: str, password: str) -> int:
    """The SMTP code of the last AUTH answer (235 logged in)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        try:
            return s.login(USER, password)[0]
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code


def pop3_login(port: int, source: str, password: str) -> bool:
    c = _POP3("127.0.0.1", port, source)
    try:
        c.user(USER)
        c.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        c.close()
    return True


def run_logins(server: MailServer) -> list[int]:
    """The SMTP failures (the last ones refused by the throttle), then POP3 logins."""
    codes = [smtp_auth(server.ports["submission"], BAD, "wrong") for _ in range(SMTP_LOGINS)]
    assert pop3_login(server.ports["pop3"], GOOD, PASSWORD)
    return codes


def with_max_failures(server: MailServer, n: int) -> None:
    """Set [auth] max_failures in the config the server is about to start with."""
    text = server.config_path.read_text()
    server.config_path.write_text(text.replace("[auth]\n", f"[auth]\nmax_failures = {n}\n", 1))


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> tuple[Path, list[int]]:
    base = tmp_path_factory.mktemp("shapes")
    server = MailServer(base)
    with_max_failures(server, MAX_FAILURES)
    server.add_user(USER)
    server.start()
    try:
        codes = run_logins(server)
    finally:
        server.close()
    return base / "server.log", codes


def matched_ips(log: Path, filter_spec: str) -> list[str]:
    assert FAIL2BAN_REGEX is not None
    out = subprocess.run(
        [FAIL2BAN_REGEX, "-o", "ip", str(log), filter_spec],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@needs_fail2ban
@pytest.mark.parametrize("mode", ["auth", "aggressive"])
def test_throttled_smtp_logins_count_for_the_postfix_filter(server_log, mode: str) -> None:
    log, codes = server_log
    assert codes[-1] == 454  # the throttle refused the second login
    ips = matched_ips(log, f"{FILTERS / 'postfix.conf'}[mode={mode}]")
    # Every attempt: the failures, then the ones the throttle refused; in
    # aggressive mode also each session's "disconnect ... auth=0/2" line.
    expected = 2 * SMTP_LOGINS + (SMTP_LOGINS if mode == "aggressive" else 0)
    assert ips == [BAD] * expected, log.read_text()
    assert (
        f"warning: unknown[{BAD}]: SASL PLAIN authentication failed: too many failures, "
        f"sasl_username={USER}"
    ) in log.read_text()


def test_pop3_user_pass_logs_method_plain_as_dovecot(server_log) -> None:
    text = server_log[0].read_text()
    assert f"pop3-login: Login: user=<{USER}>, method=PLAIN, rip={GOOD}, lip=127.0.0.1" in text
    assert "method=USER" not in text
