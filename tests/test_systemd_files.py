"""
The files an administrator installs for systemd and logrotate: the unit
passes C{systemd-analyze verify} (with twistd's path where it is here), and
its hardening keeps what the privilege drop needs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "etc" / "systemd" / "mailsrv.service"
TWISTD = Path(sys.executable).with_name("twistd")


def settings() -> dict[str, str]:
    out = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def test_unit_runs_twistd_in_the_foreground_without_a_pid_file():
    unit = settings()
    assert unit["Type"] == "notify"
    args = unit["ExecStart"].split()
    assert args[0].endswith("twistd") and "--nodaemon" in args and "--pidfile=" in args
    assert args[args.index("mailsrv") + 1 :] == ["--config", "/etc/mailsrv/mailsrv.toml"]
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_unit_keeps_what_the_privilege_drop_needs():
    unit = settings()
    caps = set(unit["CapabilityBoundingSet"].split())
    assert {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"} <= caps
    assert "User" not in unit  # started as root: it binds ports below 1024, then drops
    assert "-/var/lib/mailsrv" in unit["ReadWritePaths"].split()  # made by the admin first
    assert "AF_UNIX" in unit["RestrictAddressFamilies"].split()  # NOTIFY_SOCKET


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_unit_verifies(tmp_path):
    text = UNIT.read_text().replace("/usr/bin/twistd", str(TWISTD))
    (tmp_path / "mailsrv.service").write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "mailsrv.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_logrotate_config_parses(tmp_path):
    result = subprocess.run(
        ["logrotate", "-d", "-s", str(tmp_path / "state"), str(ROOT / "etc/logrotate.d/mailsrv")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr
