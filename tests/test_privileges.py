"""
Who the server runs as (L{mailsrv.privileges}): the account from the config
or twistd's options, the refusal to serve mail as root, the data folder made
for the account, and the files in it the account does not own.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from twisted.application import service

from mailsrv.config import Config, ConfigError, parse
from mailsrv.privileges import (
    ALLOW_ROOT_ENV,
    Account,
    account,
    acting_as,
    check_not_root,
    check_owner,
    foreign_files,
    switch_to,
    unreadable_config,
)
from mailsrv.startup import StartupError, StartupGuard

try:
    NOBODY = pwd.getpwnam("nobody")
    NOGROUP = grp.getgrgid(NOBODY.pw_gid)
except KeyError:  # pragma: no cover - every Debian system has them
    NOBODY = None  # type: ignore[assignment]

needs_nobody = pytest.mark.skipif(NOBODY is None, reason="no nobody user here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing the effective user needs root")


def config(tmp_path: Path, server: str = "") -> Config:
    text = f'[server]\ndata_dir = "data"\n{server}'
    path = tmp_path / "mailsrv.toml"
    path.write_text(text)
    return parse(text, str(path), tmp_path)


def test_keys_default_to_no_account(tmp_path: Path) -> None:
    c = config(tmp_path)
    assert (c.server.user, c.server.group) == (None, None)
    assert account(c) is None


@needs_nobody
def test_account_from_the_config_group_defaults_to_the_users(tmp_path: Path) -> None:
    c = config(tmp_path, 'user = "nobody"\n')
    assert account(c) == Account(NOBODY.pw_uid, NOBODY.pw_gid, "nobody", NOGROUP.gr_name)
    assert account(c, uid=0, gid=0) == Account(0, 0, "root", grp.getgrgid(0).gr_name)


def test_unknown_user_names_the_key(tmp_path: Path) -> None:
    c = config(tmp_path, 'user = "no-such-user-here"\n')
    with pytest.raises(StartupError) as e:
        account(c)
    assert str(e.value) == (
        f'server.user = "no-such-user-here" in {c.path}: no such user on this system'
    )


@needs_nobody
def test_unknown_group_names_the_key(tmp_path: Path) -> None:
    c = config(tmp_path, 'user = "nobody"\ngroup = "no-such-group-here"\n')
    with pytest.raises(StartupError) as e:
        account(c)
    assert e.value.key == "server.group"


def test_group_without_user_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StartupError) as e:
        account(config(tmp_path, 'group = "nogroup"\n'))
    assert e.value.key == "server.group"


def test_empty_user_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, 'user = ""\n')
    assert "server.user" in str(e.value)


def test_root_without_an_account_is_refused(tmp_path: Path) -> None:
    c = config(tmp_path)
    with pytest.raises(StartupError) as e:
        check_not_root(c, None, 0, {})
    assert e.value.key == "server.user"
    assert "the mail services do not run as root" in str(e.value)
    assert ALLOW_ROOT_ENV in str(e.value)
    check_not_root(c, None, 0, {ALLOW_ROOT_ENV: "1"})
    check_not_root(c, None, 1000, {})  # not root: it stays who it is


def test_root_with_the_built_in_default_runs(tmp_path: Path) -> None:
    # The README's one command on a fresh machine may run as root: the built-in
    # default (loopback, unprivileged ports) runs; any config file needs an account.
    from mailsrv.config import load

    check_not_root(load(None), None, 0, {})
    with pytest.raises(StartupError, match="do not run as root"):
        check_not_root(config(tmp_path), None, 0, {})


def test_root_as_the_account_is_refused(tmp_path: Path) -> None:
    root = Account(0, 0, "root", "root")
    with pytest.raises(StartupError) as e:
        check_not_root(config(tmp_path), root, 0, {})
    assert "that is root" in str(e.value)


def test_not_root_cannot_become_another_account(tmp_path: Path) -> None:
    other = Account(4321, 4321, "mailsrv", "mailsrv")
    with pytest.raises(StartupError) as e:
        check_not_root(config(tmp_path), other, 1000, {})
    assert "runs as uid 1000 and cannot become mailsrv" in str(e.value)
    check_not_root(config(tmp_path), Account(1000, 1000, "me", "me"), 1000, {})


def test_files_not_the_accounts_end_start_up_with_the_fix(tmp_path: Path) -> None:
    c = config(tmp_path)
    data = c.server.data_dir
    (data / "mail").mkdir(parents=True)
    (data / "mail" / "INBOX").write_text("")
    me = os.geteuid()
    check_owner(c, Account(me, os.getegid(), "me", "me"))  # all mine: nothing to say
    other = Account(me + 4321, 4321, "mailsrv", "mailsrv")
    assert sorted(foreign_files(data, other.uid)) == [data, data / "mail", data / "mail" / "INBOX"]
    with pytest.raises(StartupError) as e:
        check_owner(c, other)
    text = str(e.value)
    assert e.value.key == "server.data_dir"
    assert "3 files are not owned by mailsrv" in text
    assert text.endswith(f"fix with: chown -R mailsrv:mailsrv {data}")
    assert "\n" not in text


def test_no_data_folder_yet_has_no_foreign_files(tmp_path: Path) -> None:
    assert foreign_files(tmp_path / "data", 1) == []


@needs_root
@needs_nobody
def test_switch_to_makes_the_data_folder_for_the_account(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    c = config(tmp_path, 'user = "nobody"\n')
    run_as = switch_to(c, None, None, {}, euid=0)
    assert run_as is not None and run_as.uid == NOBODY.pw_uid
    st = c.server.data_dir.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        NOBODY.pw_uid,
        NOBODY.pw_gid,
        0o700,
    )
    (c.server.data_dir / "left-by-root").write_text("")
    with pytest.raises(StartupError) as e:
        switch_to(c, None, None, {}, euid=0)
    assert "left-by-root (root)" in str(e.value)


@needs_root
@needs_nobody
def test_acting_as_creates_as_the_account_then_is_root_again(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is root's alone
    os.chown(folder, NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        _create_as_nobody(folder)
    finally:
        shutil.rmtree(folder)


@needs_root
@needs_nobody
def test_a_config_file_the_account_cannot_read_is_reported(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is root's alone
    try:
        folder.chmod(0o755)
        c = config(folder, 'user = "nobody"\n')
        path = Path(c.path)
        run_as = Account(NOBODY.pw_uid, NOBODY.pw_gid, "nobody", NOGROUP.gr_name)
        path.chmod(0o600)
        with acting_as(run_as):
            assert unreadable_config(c) == "Permission denied"
        path.chmod(0o644)
        with acting_as(run_as):
            assert unreadable_config(c) is None
    finally:
        shutil.rmtree(folder)


def _create_as_nobody(tmp_path: Path) -> None:
    groups = os.getgroups()
    run_as = Account(NOBODY.pw_uid, NOBODY.pw_gid, "nobody", NOGROUP.gr_name)
    with acting_as(run_as):
        assert (os.geteuid(), os.getegid()) == (NOBODY.pw_uid, NOBODY.pw_gid)
        (tmp_path / "made").write_text("")
        with pytest.raises(PermissionError):
            os.open("/etc/shadow", os.O_RDONLY)
    assert (os.geteuid(), os.getegid(), os.getgroups()) == (0, 0, groups)
    st = (tmp_path / "made").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)


def test_guard_gives_twistd_the_account(tmp_path: Path) -> None:
    """twistd switches to the application's IProcess uid and gid after privilegedStartService."""
    app = service.Application("mailsrv")
    StartupGuard(config(tmp_path), run_as=(4321, 1234)).setServiceParent(app)
    process = service.IProcess(app)
    assert (process.uid, process.gid) == (4321, 1234)
    given = service.Application("mailsrv", uid=7)
    StartupGuard(config(tmp_path), run_as=(4321, 1234)).setServiceParent(given)
    assert (service.IProcess(given).uid, service.IProcess(given).gid) == (7, 1234)
    plain = service.Application("mailsrv")
    StartupGuard(config(tmp_path)).setServiceParent(plain)
    assert (service.IProcess(plain).uid, service.IProcess(plain).gid) == (None, None)
