"""
`mailsrv user add` run as root in a data folder the server's account owns:
the lock file beside the passwd file must not let that account, by leaving a
symlink in its place, make root give it any file on the system.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailsrv.auth.passwd import PasswordFile, PasswordFileError

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover
    NOBODY = None  # type: ignore[assignment]


@pytest.mark.skipif(os.geteuid() != 0 or NOBODY is None, reason="needs root and nobody")
def test_lock_symlink_does_not_chown_its_target(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)  # the server's account owns it
    victim = tmp_path / "shadow"  # stands for /etc/shadow: root's, 0640
    victim.write_text("root:x:0:0\n")
    os.chmod(victim, 0o640)
    # What the account can do in its own folder:
    os.symlink(victim, data / "passwd.lock")
    hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    passwd = PasswordFile(data / "passwd", hasher=hasher)
    with pytest.raises(PasswordFileError, match="cannot open the lock"):
        passwd.add_user("a@example.test", "secret")  # the admin, as root
    st = os.stat(victim)
    assert (st.st_uid, st.st_gid) == (0, 0), "root chowned the symlink's target to the account"


@pytest.mark.skipif(os.geteuid() != 0 or NOBODY is None, reason="needs root and nobody")
def test_a_new_lock_is_the_folders_owners_and_an_old_one_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    passwd = PasswordFile(data / "passwd", hasher=hasher)
    passwd.add_user("a@example.test", "secret")
    lock = os.stat(data / "passwd.lock")
    assert (lock.st_uid, lock.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    passwd.add_user("b@example.test", "secret")  # the lock is there now: opened, not made
    assert "b@example.test" in (data / "passwd").read_text()


@pytest.mark.skipif(os.geteuid() != 0 or NOBODY is None, reason="needs root and nobody")
def test_a_lock_with_a_second_name_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    victim = data / "other"
    victim.write_text("x")
    os.link(victim, data / "passwd.lock")
    hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    passwd = PasswordFile(data / "passwd", hasher=hasher)
    with pytest.raises(PasswordFileError, match="not a plain file"):
        passwd.add_user("a@example.test", "secret")
