"""
The real daemon raises its soft open files limit (RLIMIT_NOFILE) to the hard
limit at start-up, and warns when the hard limit is below what
C{[policy] max_connections} needs (as Dovecot does).
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest

from tests.e2e import MailServer
from tests.load_support import twistd_with_open_files_limit

_, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


def _open_files_limits(pid: int) -> tuple[int, int]:
    """The soft and hard 'Max open files' of C{pid}."""
    text = Path(f"/proc/{pid}/limits").read_text()
    m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    assert m, text
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(HARD < 8192, reason="needs a hard open files limit of 8192 or more")
def test_the_soft_limit_is_raised_to_the_hard_limit(monkeypatch, tmp_path):
    twistd_with_open_files_limit(monkeypatch, tmp_path, 256, 8192)
    with MailServer(tmp_path) as server:
        assert _open_files_limits(server.proc.pid) == (8192, 8192)
        assert "open files limit" not in server.output()


def test_a_hard_limit_below_what_max_connections_need_is_logged(monkeypatch, tmp_path):
    twistd_with_open_files_limit(monkeypatch, tmp_path, 256, 512)
    with MailServer(tmp_path) as server:
        assert _open_files_limits(server.proc.pid) == (512, 512)
    assert (
        "open files limit (ulimit -n) is 512, lower than the 5128 needed under"
        " [policy] max_connections = 1000" in server.output()
    )
