"""
``mailsrv check-config``: the settings that differ from the defaults as TOML
that loads again to the same settings, every setting with ``--all``, and
every problem of a bad config on a line of its own, with the file's line.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

from mailsrv.cli import main
from mailsrv.config import Config, load

ROOT = Path(__file__).resolve().parent.parent

BUSY = """\
[server]
hostname = "mail.example.test"
domains = ["example.test", "Example.ORG"]
data_dir = "var"
[listen]
smtp = ["tcp:2525:interface=127.0.0.1"]
[limits]
timeout = "2m"
[auth]
cleartext = "never"
failure_delay = 0.5
[relay]
retry_min = "10m"
tls_policy = { "bank.test" = "verify" }
smarthost = "relay.test:587"
smarthost_username = "me"
smarthost_password = "s3cret \\"quoted\\""
[dns]
nameservers = ["127.0.0.1:5353"]
[addresses]
aliases = "aliases.txt"
catch_all = { "example.org" = "postmaster@example.test" }
lists = { "team@example.test" = "Team <team.example.test>" }
[dkim]
keys = { "example.test" = "dkim/example.key" }
[filter]
rspamd = "http://127.0.0.1:11333"
reject_score = 15
[policy]
deny = ["192.0.2.0/24", "2001:db8::/32"]
dnsbl = ["zen.spamhaus.org=127.0.0.[2..11]*3"]
greylist = true
greylist_allow = ["friend.test"]
mailing_lists = ["@lists.example.net"]
pregreet_wait = "300ms"
[quota]
storage = "1G"
users = { "big@example.test" = "5G" }
"""


def settings(config: Config) -> Config:
    """The settings alone: not where they were read from."""
    return dataclasses.replace(config, path="", raw={}, source="", base_dir=None)


def busy(folder: Path) -> Path:
    """L{BUSY} in C{folder}, with the DKIM key file it names."""
    (folder / "dkim").mkdir()
    (folder / "dkim" / "example.key").write_text("")
    path = folder / "mailsrv.toml"
    path.write_text(BUSY)
    return path


def run(*argv, environ=None, system=Path("/nonexistent/mailsrv.toml")):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, environ=environ or {}, system_config=system)
    return code, out.getvalue(), err.getvalue()


def test_non_default_settings_load_again_to_the_same_config(tmp_path):
    original = busy(tmp_path)
    code, out, err = run("--config", str(original), "check-config", "--show-secrets")
    assert (code, err) == (0, "")
    assert out.startswith('[server]\nhostname = "mail.example.test"\n')
    assert "max_recipients" not in out  # a default is left out
    assert 'retry_min = "10m"' in out  # as the file gives it
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    assert settings(load(printed)) == settings(load(original))
    # Printed again, the same text: nothing more, nothing less.
    assert run("--config", str(printed), "check-config", "--show-secrets")[1] == out


def test_passwords_are_hidden_unless_asked(tmp_path):
    path = busy(tmp_path)
    out = run("--config", str(path), "check-config")[1]
    assert "s3cret" not in out
    assert "# smarthost_password = (hidden; --show-secrets prints it)" in out


def test_the_shipped_example_round_trips(tmp_path):
    example = tmp_path / "mailsrv.toml"
    example.write_text((ROOT / "etc" / "mailsrv.toml").read_text())
    code, out, _ = run("--config", str(example), "check-config")
    assert code == 0
    printed = tmp_path / "printed.toml"  # the same folder: the same relative paths
    printed.write_text(out)
    assert settings(load(printed)) == settings(load(example))


def test_all_prints_every_setting_and_where_the_config_came_from(tmp_path):
    path = busy(tmp_path)
    path.write_text(
        BUSY.replace('smarthost_username = "me"\n', "").replace(
            'smarthost_password = "s3cret \\"quoted\\""\n', ""
        )
    )
    code, out, _ = run("--config", str(path), "check-config", "--all")
    assert code == 0
    assert out.startswith(f"# config: {path} (from --config)\n")
    assert f"# queue: {tmp_path / 'var' / 'queue'}\n" in out
    assert f'data_dir = "{tmp_path / "var"}"\n' in out  # made absolute
    assert f'passwd_file = "{tmp_path / "var" / "passwd"}"\n' in out  # derived from data_dir
    assert "max_recipients = 1000\n" in out  # a default
    assert 'srs_domain = "mail.example.test"\n' in out  # derived from the hostname
    assert "# user is not set\n" in out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    printed = elsewhere / "all.toml"  # absolute paths: loads the same from any folder
    printed.write_text(out)
    assert settings(load(printed)) == settings(load(path))

    env_out = run("check-config", "-a", environ={"MAILSRV_CONFIG": str(path)})[1]
    assert env_out.startswith(f"# config: {path} (from MAILSRV_CONFIG)\n")
    code, default_out, err = run("check-config", "-a")
    assert default_out.startswith("# config: <default> (from built-in default)\n")
    assert "the built-in default" in err


def test_a_typo_names_the_key_its_line_and_a_near_match(tmp_path):
    path = tmp_path / "mailsrv.toml"
    path.write_text(
        '[server]\nhostname = "a.test"\nhostnme = "b.test"\n\n[relay]\nretry_min = 5\n'
        '[polcy]\ngreylist = true\n[auth]\ncleartext = "sometimes"\n'
    )
    code, out, err = run("--config", str(path), "check-config")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"mailsrv: {path}:7: [polcy]: unknown section, did you mean policy? (known: server, "
        "listen, tls, limits, auth, imap, relay, dns, addresses, dkim, filter, policy, quota, log, metrics)",
        f"mailsrv: {path}:3: server.hostnme: unknown key, did you mean hostname? (known: "
        "hostname, domains, data_dir, user, group)",
        f"mailsrv: {path}:10: auth.cleartext: must be one of 'never', 'loopback', 'always', "
        "not 'sometimes'",
    ]


def test_toml_errors_and_an_unreadable_file(tmp_path):
    path = tmp_path / "mailsrv.toml"
    path.write_text('[server]\nhostname = "a.test\n')
    code, _, err = run("--config", str(path), "check-config")
    assert code == 2
    assert err.startswith(f"mailsrv: {path}:2: not valid TOML: ")
    code, _, err = run("--config", str(tmp_path / "absent.toml"), "check-config")
    assert code == 2
    assert err == f"mailsrv: {tmp_path / 'absent.toml'}: cannot read: No such file or directory\n"


def test_the_command_exit_codes(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[server]\nhostname = "a.test"\n')
    bad.write_text("[limits]\nmax_errors = 0\n")
    for path, expected in ((good, 0), (bad, 2)):
        r = subprocess.run(
            [sys.executable, "-m", "mailsrv", "--config", str(path), "check-config"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == expected, r.stderr
    assert r.stderr == f"mailsrv: {bad}:2: limits.max_errors: must be at least 1, not 0\n"


def test_what_the_server_would_stop_on_at_its_start(tmp_path):
    path = tmp_path / "mailsrv.toml"
    path.write_text('[server]\nhostname = "a.test"\nuser = "no-such-user-here"\n')
    code, out, err = run("--config", str(path), "check-config")
    assert (code, out) == (2, "")
    assert (
        err == f"mailsrv: {path}:3: server.user: no-such-user-here: no such user on this system\n"
    )

    path.write_text(
        '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
        '[dkim]\nkeys = { "example.test" = "dkim/example.key" }\n'
    )
    (tmp_path / "cert.pem").write_text("")
    code, out, err = run("--config", str(path), "check-config")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"mailsrv: {path}:3: tls.key: cannot read {tmp_path / 'key.pem'}: No such file or "
        "directory",
        f"mailsrv: {path}:5: dkim.keys: cannot read {tmp_path / 'dkim' / 'example.key'}: No "
        "such file or directory",
    ]


def test_problems_of_the_aliases_file_are_warnings(tmp_path):
    path = tmp_path / "mailsrv.toml"
    path.write_text('[addresses]\naliases = "aliases"\n')
    (tmp_path / "aliases").write_text("postmaster: root\nbroken line\n")
    code, out, err = run("--config", str(path), "check-config")
    assert code == 0
    assert out == ""  # "aliases" is the default
    assert err.startswith(f"mailsrv: warning: {tmp_path / 'aliases'}:2: ")
