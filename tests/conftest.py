"""
Suite-wide pytest hooks.

Tests that drive a real peer program (mutt, procmail, mbsync, swaks, ...) skip with the reason
"<program> is not installed" when it is missing. CI installs every peer and sets
C{MAILSRV_REQUIRE_PEERS=1}: there such a skip is turned into a failure, so a peer that failed to
install cannot hide a test.
"""

from __future__ import annotations

import os

import pytest

MISSING_PEER = "is not installed"

# The servers the tests start run as whoever runs the tests, root included
# (mailsrv.privileges refuses root otherwise); tests of that refusal pass
# their own environment.
os.environ["MAILSRV_ALLOW_ROOT"] = "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("MAILSRV_REQUIRE_PEERS") != "1":
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING_PEER in reason:
        report.outcome = "failed"
        report.longrepr = f"a peer program is missing in CI: {reason}"
