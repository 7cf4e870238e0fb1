"""
``twistd mailsrv`` and ``mailsrv`` find the config file the same way:
--config, else MAILSRV_CONFIG, else /etc/mailsrv/mailsrv.toml when it
exists, else the built-in default.
"""

from __future__ import annotations

import os
import poplib
import subprocess
import sys

from mailsrv.tap import Options
from tests.e2e import PASSWORD, MailServer


def test_server_and_admin_command_both_follow_mailsrv_config(tmp_path):
    base = tmp_path / "srv"
    base.mkdir()
    srv = MailServer(base, config_in_env=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with srv:  # listening on the ports of the file MAILSRV_CONFIG names
        r = subprocess.run(
            [sys.executable, "-m", "mailsrv", "user", "add", "alice@example.test"],
            input=PASSWORD + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(elsewhere),
            env=dict(os.environ, MAILSRV_CONFIG=str(srv.config_path)),
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"added alice@example.test to {srv.data / 'passwd'}\n"
        assert not (elsewhere / "data").exists()
        p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
        p.user("alice@example.test")
        assert p.pass_(PASSWORD).startswith(b"+OK")
        p.quit()
    assert "(from MAILSRV_CONFIG)" in srv.output()


def test_twistd_options_find_the_config_in_order(tmp_path):
    system = tmp_path / "etc" / "mailsrv" / "mailsrv.toml"
    system.parent.mkdir(parents=True)
    system.write_text('[server]\nhostname = "system.example.test"\n')
    env = tmp_path / "env.toml"
    env.write_text('[server]\nhostname = "env.example.test"\n')
    given = tmp_path / "given.toml"
    given.write_text('[server]\nhostname = "given.example.test"\n')

    def hostname(argv, environ, system_config=system):
        options = Options(environ=environ, system_config=system_config)
        options.parseOptions(argv)
        return options["settings"].server.hostname

    environ = {"MAILSRV_CONFIG": str(env)}
    assert hostname(["--config", str(given)], environ) == "given.example.test"
    assert hostname([], environ) == "env.example.test"
    assert hostname([], {}) == "system.example.test"
    assert hostname([], {}, tmp_path / "absent.toml") == "localhost"  # the built-in default
