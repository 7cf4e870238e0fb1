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

from tests import e2e
from tests.e2e import MailServer

_, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)


def _open_files_limits(pid: int) -> tuple[int, int]:
    """The soft and hard 'Max open files' of C{pid}."""
    text = Path(f"/proc/{pid}/limits").read_text()
    m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    assert m, text
    return int(m.group(1)), int(m.group(2))


def _with_limits(monkeypatch, tmp_path: Path, soft: int, hard: int) -> None:
    """twistd started with the open files limits C{soft} and C{hard}."""
    wrapper = tmp_path / "twistd-limited"
    script = f'#!/bin/sh\nulimit -Sn {soft}\nulimit -Hn {hard}\nexec {e2e.TWISTD} "$@"\n'
    wrapper.write_text(script)
    wrapper.chmod(0o755)
    monkeypatch.setattr(e2e, "TWISTD", str(wrapper))


@pytest.mark.skipif(HARD < 4096, reason="needs a hard open files limit of 4096 or more")
def test_the_soft_limit_is_raised_to_the_hard_limit(monkeypatch, tmp_path):
    _with_limits(monkeypatch, tmp_path, 256, 4096)
    with MailServer(tmp_path) as server:
        assert _open_files_limits(server.proc.pid) == (4096, 4096)
        assert "open files limit" not in server.output()


def test_a_hard_limit_below_what_max_connections_need_is_logged(monkeypatch, tmp_path):
    _with_limits(monkeypatch, tmp_path, 256, 512)
    with MailServer(tmp_path) as server:
        assert _open_files_limits(server.proc.pid) == (512, 512)
    assert (
        "open files limit (ulimit -n) is 512, lower than the 1128 needed under"
        " [policy] max_connections = 1000" in server.output()
    )
