"""The ``mailsrv`` admin command: ``user add|list|del|passwd`` (and the ``queue`` hook)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailsrv.auth.passwd import PasswordFile
from mailsrv.cli import main


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def cfg(tmp_path) -> Path:
    p = tmp_path / "etc" / "mailsrv.toml"
    p.parent.mkdir()
    p.write_text('[server]\ndomains = ["example.test", "Example.ORG"]\ndata_dir = "../data"\n')
    return p


def run(*argv, stdin="", tty_answers=None, **where):
    """C{where}: C{environ} and C{system_config}, to find the config file."""
    out, err = io.StringIO(), io.StringIO()
    answers = list(tty_answers or [])
    code = main(
        [str(a) for a in argv],
        stdin=TTY() if tty_answers is not None else io.StringIO(stdin),
        stdout=out,
        stderr=err,
        getpass_=lambda prompt: answers.pop(0),
        **where,
    )
    return code, out.getvalue(), err.getvalue()


def verify(path: Path, address: str, password: str) -> bool:
    out = []
    PasswordFile(path).verify(address, password).addBoth(out.append)
    return out[0]


def test_user_add_list_passwd_del(cfg, tmp_path):
    passwd = tmp_path / "data" / "passwd"
    assert run("--config", cfg, "user", "add", "Alice@Example.TEST", stdin="pw one\n") == (
        0,
        f"added Alice@example.test to {cfg.parent / '..' / 'data' / 'passwd'}\n",
        "",
    )
    assert stat.S_IMODE(os.stat(passwd).st_mode) == 0o600
    assert passwd.read_text().startswith("Alice@example.test:$argon2id$")
    assert "pw one" not in passwd.read_text()
    assert verify(passwd, "Alice@example.test", "pw one") is True
    assert run("-c", cfg, "user", "add", "bob@example.org", stdin="b\r\n")[0] == 0
    assert verify(passwd, "bob@example.org", "b") is True  # CRLF from a Windows pipe stripped
    assert run("-c", cfg, "user", "list") == (0, "Alice@example.test\nbob@example.org\n", "")

    code, out, err = run("-c", cfg, "user", "add", "Alice@example.test", stdin="x\n")
    assert (code, out) == (1, "") and "already exists" in err

    assert run("-c", cfg, "user", "passwd", "Alice@example.test", stdin="pw two\n")[0] == 0
    assert verify(passwd, "Alice@example.test", "pw two") is True
    assert verify(passwd, "Alice@example.test", "pw one") is False
    code, _, err = run("-c", cfg, "user", "passwd", "carol@example.test", stdin="x\n")
    assert code == 1 and "no such user: carol@example.test" in err

    code, out, _ = run("-c", cfg, "user", "del", "bob@EXAMPLE.org")
    assert code == 0 and out.startswith("deleted bob@example.org; mail kept in ")
    assert run("-c", cfg, "user", "list")[1] == "Alice@example.test\n"
    code, _, err = run("-c", cfg, "user", "del", "bob@example.org")
    assert code == 1 and "no such user" in err


def test_add_refuses_foreign_domain_and_bad_addresses(cfg, tmp_path):
    code, out, err = run("-c", cfg, "user", "add", "eve@elsewhere.test", stdin="x\n")
    assert code == 1
    assert "elsewhere.test is not a local domain" in err
    assert "server.domains" in err and str(cfg) in err and "example.test, example.org" in err
    for bad in ("nobody", "@example.test", "a:b@example.test", "../x@example.test"):
        code, _, err = run("-c", cfg, "user", "add", bad, stdin="x\n")
        assert code == 1 and "not a usable mailbox address" in err, bad
    assert not (tmp_path / "data" / "passwd").exists()


def test_password_rules(cfg):
    code, _, err = run("-c", cfg, "user", "add", "a@example.test", stdin="\n")
    assert code == 1 and "empty password" in err
    code, _, err = run("-c", cfg, "user", "add", "a@example.test", stdin="")
    assert code == 1 and "empty password" in err


def test_prompts_twice_on_a_terminal(cfg, tmp_path):
    code, _, err = run("-c", cfg, "user", "add", "a@example.test", tty_answers=["one", "two"])
    assert code == 1 and "do not match" in err
    assert run("-c", cfg, "user", "add", "a@example.test", tty_answers=["same", "same"])[0] == 0
    assert verify(tmp_path / "data" / "passwd", "a@example.test", "same") is True


def test_config_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nhostnam = "x"\n[auth]\ncleartext = "sometimes"\n')
    code, out, err = run("--config", bad, "user", "list")
    assert code == 2 and out == ""
    assert str(bad) in err and "server.hostnam" in err and "auth.cleartext" in err
    code, _, err = run("--config", tmp_path / "missing.toml", "user", "list")
    assert code == 2 and "cannot read" in err


def test_default_config_when_none_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        "user", "add", "x@example.test", stdin="pw\n", environ={}, system_config=tmp_path / "no"
    )
    assert code == 0
    assert (tmp_path / "data" / "passwd").read_text().startswith("x@example.test:")
    assert out == f"added x@example.test to {tmp_path / 'data' / 'passwd'}\n"
    assert "built-in default" in err and str(tmp_path / "data") in err


def test_config_named_by_environment_from_another_folder(cfg, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MAILSRV_CONFIG", str(cfg))
    code, out, err = run("user", "add", "a@example.test", stdin="pw\n")
    passwd = tmp_path / "data" / "passwd"
    named = cfg.parent / ".." / "data" / "passwd"  # as the config gives it
    assert (code, out, err) == (0, f"added a@example.test to {named}\n", "")
    assert verify(passwd, "a@example.test", "pw") is True
    assert not (elsewhere / "data").exists()


def test_config_found_in_order(tmp_path, monkeypatch):
    """--config, else MAILSRV_CONFIG, else the system file when it exists, else the default."""
    monkeypatch.chdir(tmp_path)
    configs = {}
    for name in ("option", "env", "system"):
        configs[name] = tmp_path / name / "mailsrv.toml"
        configs[name].parent.mkdir()
        configs[name].write_text('[server]\ndata_dir = "data"\n')
    env = {"MAILSRV_CONFIG": str(configs["env"])}

    def added_to(*args, **where) -> str:
        code, out, _ = run(*args, "user", "add", "u@example.test", stdin="pw\n", **where)
        assert code == 0
        return out.split(" to ", 1)[1].strip()

    system = configs["system"]
    assert added_to("-c", configs["option"], environ=env, system_config=system) == str(
        tmp_path / "option" / "data" / "passwd"
    )
    assert added_to(environ=env, system_config=system) == str(tmp_path / "env/data/passwd")
    assert added_to(environ={}, system_config=system) == str(tmp_path / "system/data/passwd")
    assert added_to(environ={"MAILSRV_CONFIG": ""}, system_config=tmp_path / "none") == str(
        tmp_path / "data" / "passwd"
    )


def test_usage_errors(cfg, capsys):
    assert run("-c", cfg)[0] == 2
    assert run("-c", cfg, "user")[0] == 2
    assert run("-c", cfg, "user", "add")[0] == 2
    assert run("-c", cfg, "frobnicate")[0] == 2
    assert run("--help")[0] == 0
    assert "user" in capsys.readouterr().out


def test_queue_commands_hooked_in(cfg):
    pytest.importorskip("mailsrv.outbound.admin")
    code, out, err = run("-c", cfg, "queue", "list")
    assert code == 0, err
    assert "queue is empty" in out.lower()


def test_running_server_sees_new_user_without_restart(cfg, tmp_path):
    server_side = PasswordFile(tmp_path / "data" / "passwd")
    assert not server_side.has_user("new@example.test")
    run("-c", cfg, "user", "add", "new@example.test", stdin="pw\n")
    assert server_side.has_user("new@example.test")
    out = []
    server_side.verify("new@example.test", "pw").addBoth(out.append)
    assert out == [True]


def test_console_command_in_a_subprocess(cfg, tmp_path):
    cmd = [sys.executable, "-m", "mailsrv", "--config", str(cfg), "user"]
    r = subprocess.run(
        cmd + ["add", "sub@example.test"],
        input="secret\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    passwd = cfg.parent / ".." / "data" / "passwd"
    assert (r.returncode, r.stdout, r.stderr) == (0, f"added sub@example.test to {passwd}\n", "")
    r = subprocess.run(cmd + ["list"], capture_output=True, text=True, timeout=60)
    assert r.stdout == "sub@example.test\n"
    r = subprocess.run(
        cmd + ["add", "x@nowhere.test"],
        input="secret\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "not a local domain" in r.stderr
    script = Path(sys.executable).with_name("mailsrv")
    if script.exists():  # the console script from pyproject
        r = subprocess.run(
            [str(script), "-c", str(cfg), "user", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.stdout == "sub@example.test\n"


def test_version(capsys):
    from importlib.metadata import version

    assert run("--version")[0] == 0
    assert capsys.readouterr().out == f"mailsrv {version('mailsrv')}\n"
    r = subprocess.run(
        [sys.executable, "-m", "mailsrv", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout) == (0, f"mailsrv {version('mailsrv')}\n")


def test_version_has_one_source(monkeypatch):
    # The package's __version__ is the installed metadata's (pyproject.toml),
    # not a copy of it: what the metadata says, __version__ and --version say.
    import importlib
    from importlib import metadata

    import mailsrv

    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "9.8.7" if name == "mailsrv" else real(name)
    )
    try:
        importlib.reload(mailsrv)
        assert mailsrv.__version__ == "9.8.7"
    finally:
        monkeypatch.undo()
        importlib.reload(mailsrv)
    assert mailsrv.__version__ == real("mailsrv")
    r = subprocess.run(
        [str(Path(sys.executable).with_name("mailsrv")), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout) == (0, f"mailsrv {real('mailsrv')}\n")
