"""
``twistd mailsrv`` and ``mailsrv`` pick the same config file, from the same
place, in every case: --config, else $MAILSRV_CONFIG, else
/etc/mailsrv/mailsrv.toml when it exists, else the built-in default.
"""

from __future__ import annotations

import io
from pathlib import Path

from mailsrv.cli import main
from mailsrv.tap import Options


def server_choice(argv, environ, system):
    options = Options(environ=environ, system_config=system)
    options.parseOptions(argv)
    return options["settings"].path, options["config_origin"]


def admin_choice(argv, environ, system):
    out, err = io.StringIO(), io.StringIO()
    code = main(
        [*argv, "check-config", "--all"],
        stdout=out,
        stderr=err,
        environ=environ,
        system_config=system,
    )
    assert code == 0, err.getvalue()
    first = out.getvalue().splitlines()[0]  # "# config: PATH (from ORIGIN)"
    path, _, origin = first.removeprefix("# config: ").rpartition(" (from ")
    return path, origin.removesuffix(")")


def test_both_commands_agree_in_every_case(tmp_path: Path) -> None:
    system = tmp_path / "etc" / "mailsrv" / "mailsrv.toml"
    system.parent.mkdir(parents=True)
    system.write_text('[server]\nhostname = "system.example.test"\n')
    env = tmp_path / "env.toml"
    env.write_text('[server]\nhostname = "env.example.test"\n')
    given = tmp_path / "given.toml"
    given.write_text('[server]\nhostname = "given.example.test"\n')
    absent = tmp_path / "absent.toml"
    cases = [
        (["--config", str(given)], {"MAILSRV_CONFIG": str(env)}, system, (str(given), "--config")),
        ([], {"MAILSRV_CONFIG": str(env)}, system, (str(env), "MAILSRV_CONFIG")),
        ([], {"MAILSRV_CONFIG": ""}, system, (str(system), str(system))),
        ([], {}, system, (str(system), str(system))),
        ([], {}, absent, ("<default>", "built-in default")),
    ]
    for argv, environ, system_config, expected in cases:
        assert server_choice(argv, environ, system_config) == expected, (argv, environ)
        assert admin_choice(argv, environ, system_config) == expected, (argv, environ)
