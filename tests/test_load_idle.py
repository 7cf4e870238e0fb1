"""
The real daemon with 1,000 idle connections (logged-in IMAP sessions with
INBOX selected and POP3 sessions holding their maildrop) and 100 SMTP
sessions in the middle of a message stays responsive: a NOOP on a new
connection is answered in well under 50 ms. It starts with the soft open
files limit many systems give a daemon (1024), which it raises to the hard
limit: without that, the connections past about 1,000 are never accepted.

The memory per connection, and the same against Dovecot, are measured by
benchmarks/load_bench.py, not asserted here.
"""

from __future__ import annotations

import resource
import statistics

import pytest

from tests.e2e import MailServer
from tests.load_support import (
    NO_CONNECTION_LIMITS,
    Idle,
    imap_noops,
    imap_session,
    pop3_noops,
    pop3_session,
    smtp_noops,
    smtp_session,
    twistd_with_open_files_limit,
    write_passwd,
)

POP3_USERS = 300  # one maildrop each
IMAP_SESSIONS = 700  # over the same users
SMTP_SESSIONS = 100
PASSWORD = "pw"
RCPT = "postmaster@example.test"
SETUP_TIMEOUT = 30.0  # seconds for one connection to be set up
BOUND_MS = 50.0  # the median NOOP; typically well under 1 ms
_, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


def _user(i: int) -> str:
    return f"load{i % POP3_USERS}@example.test"


@pytest.mark.skipif(HARD < 4096, reason="needs a hard open files limit of 4096 or more")
def test_a_noop_is_quick_with_a_thousand_idle_connections(monkeypatch, tmp_path):
    twistd_with_open_files_limit(monkeypatch, tmp_path, 1024, HARD)
    with MailServer(tmp_path, extra=NO_CONNECTION_LIMITS) as server:
        users = [_user(i) for i in range(POP3_USERS)]
        write_passwd(server.data / "passwd", [*users, RCPT], PASSWORD)
        ports = server.ports
        idle = Idle()
        try:
            idle.open(pop3_session(ports["pop3"], _user, PASSWORD), POP3_USERS, SETUP_TIMEOUT)
            idle.open(imap_session(ports["imap"], _user, PASSWORD), IMAP_SESSIONS, SETUP_TIMEOUT)
            idle.open(smtp_session(ports["smtp"], RCPT), SMTP_SESSIONS, SETUP_TIMEOUT)
            imap = imap_noops(ports["imap"], RCPT, PASSWORD, 50, connections=3)
            pop3 = pop3_noops(ports["pop3"], RCPT, PASSWORD, 50)
            smtp = smtp_noops(ports["smtp"], 50)
            assert idle.check_open() == 0  # none of them was dropped
        finally:
            idle.close()
    for name, latency in (("imap", imap), ("pop3", pop3), ("smtp", smtp)):
        assert latency.median_ms < BOUND_MS, (name, latency.noops)
        assert statistics.median(latency.greetings) * 1000 < 10 * BOUND_MS, (name, latency)
