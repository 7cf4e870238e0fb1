"""
The ``mailsrv`` command run as root becomes the server's account before it
touches the data folder: every file it creates there is the account's, and
a symlink the account planted gives it only the account's rights.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsrv.outbound.envelope import Envelope, Recipient, new_queue_id
from mailsrv.outbound.queue import QueueStore

try:
    NOBODY = pwd.getpwnam("nobody")
    NOGROUP = grp.getgrgid(NOBODY.pw_gid)
except KeyError:  # pragma: no cover
    NOBODY = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None, reason="needs root and the nobody account"
)


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder the account can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="mailsrv-cli-account-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def write_config(base: Path, server: str = 'user = "nobody"\n') -> Path:
    path = base / "mailsrv.toml"
    path.write_text(
        f'[server]\nhostname = "mail.example.test"\ndomains = ["example.test"]\n'
        f'data_dir = "data"\n{server}[addresses]\naliases = "data/aliases"\n'
    )
    return path


def mailsrv(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailsrv", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def owners(top: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            st = os.lstat(Path(folder, name))
            out[str(Path(folder, name).relative_to(top))] = (st.st_uid, st.st_gid)
    return out


def test_what_the_command_creates_is_the_accounts(base: Path) -> None:
    config = write_config(base)  # no data folder yet: made for the account
    r = mailsrv(config, "user", "add", "alice@example.test", stdin="a good password\n")
    assert r.returncode == 0, r.stderr
    assert mailsrv(config, "alias", "add", "postmaster", "alice").returncode == 0
    store = QueueStore(base / "data" / "queue")
    env = Envelope(new_queue_id(1.0), "a@example.test", [Recipient("b@remote.test")], 0.0, 0.0)
    store.store(env, b"Subject: x\n\nbody\n")
    for path in (base / "data", store.dir, store.tmp_dir, store.message_path(env.id)):
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)  # as the server makes them
    r = mailsrv(config, "queue", "hold", env.id)
    assert r.returncode == 0, r.stderr
    account = (NOBODY.pw_uid, NOGROUP.gr_gid)
    found = owners(base / "data")
    assert {"passwd", "passwd.lock", "aliases", "aliases.lock", f"queue/{env.id}.hold"} <= set(
        found
    )
    assert set(found.values()) == {account}, found
    assert os.stat(base / "data").st_uid == NOBODY.pw_uid
    assert (os.stat(base / "data" / "passwd").st_mode & 0o777) == 0o600


def test_a_planted_symlink_gets_only_the_accounts_rights(base: Path) -> None:
    config = write_config(base)
    data = base / "data"
    data.mkdir(mode=0o700)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    roots = base / "roots"  # stands for /etc: root's, the account cannot write there
    roots.mkdir(mode=0o755)
    # What the account can do in its own folder: point the lock at a file of root's.
    os.symlink(roots / "nologin", data / "aliases.lock")
    r = mailsrv(config, "alias", "add", "postmaster", "alice@example.test")
    assert r.returncode == 1
    assert "Permission denied" in r.stderr
    assert not (roots / "nologin").exists(), "root created a file where the symlink pointed"
    assert not (data / "aliases").exists()


def test_without_a_user_the_data_folders_owner_is_the_account(base: Path) -> None:
    config = write_config(base, server="")
    data = base / "data"
    data.mkdir(mode=0o700)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    r = mailsrv(config, "user", "add", "alice@example.test", stdin="a good password\n")
    assert r.returncode == 0, r.stderr
    assert mailsrv(config, "alias", "add", "postmaster", "alice").returncode == 0
    found = owners(data)
    assert {"passwd", "aliases", "aliases.lock"} <= set(found)
    assert {uid for uid, _ in found.values()} == {NOBODY.pw_uid}, found


def test_a_root_data_folder_without_a_user_stays_root(base: Path) -> None:
    config = write_config(base, server="")
    r = mailsrv(config, "user", "add", "alice@example.test", stdin="a good password\n")
    assert r.returncode == 0, r.stderr
    assert os.stat(base / "data" / "passwd").st_uid == 0


def test_a_data_folder_left_by_root_names_the_fix(base: Path) -> None:
    (base / "data").mkdir(mode=0o700)  # an earlier run as root, before [server] user
    config = write_config(base)
    r = mailsrv(config, "user", "add", "alice@example.test", stdin="a good password\n")
    assert r.returncode == 2
    assert r.stderr == (
        f"mailsrv: {config}:4: server.data_dir: {base / 'data'}: not owned by nobody, who the "
        f"server and this command run as; fix with: chown -R nobody:{NOGROUP.gr_name} "
        f"{base / 'data'}\n"
    )
    assert not (base / "data" / "passwd").exists()


def test_an_unknown_account_is_refused_before_anything_is_touched(base: Path) -> None:
    config = write_config(base, server='user = "no-such-user-here"\n')
    r = mailsrv(config, "user", "add", "alice@example.test", stdin="a good password\n")
    assert r.returncode == 2
    assert r.stderr == (
        f"mailsrv: {config}:5: server.user: no-such-user-here: no such user on this system\n"
    )
    assert not (base / "data").exists()


def test_backup_as_root_runs_as_the_account_and_says_where_it_may_write(base: Path) -> None:
    config = write_config(base)
    data = base / "data"
    data.mkdir(mode=0o700)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    secret = base / "etc"  # a root-only folder named by the config, as /etc/mailsrv may be
    secret.mkdir(mode=0o700)
    (secret / "tls.key").write_text("root's key\n")
    with open(config, "a") as f:
        f.write(f'[tls]\ncertificate = "{secret}/tls.crt"\nkey = "{secret}/tls.key"\n')
    (secret / "tls.crt").write_text("cert\n")
    backups = base / "backups"  # root's, as /var/backups
    backups.mkdir(mode=0o755)
    r = mailsrv(config, "backup", str(backups / "one"))
    assert r.returncode == 1
    assert f"runs as {NOBODY.pw_name}" in r.stderr, r.stderr
    assert f"install -d -o {NOBODY.pw_name} -m 700 {backups}" in r.stderr, r.stderr
    os.chown(backups, NOBODY.pw_uid, NOBODY.pw_gid)
    r = mailsrv(config, "backup", str(backups / "one"))
    assert r.returncode == 0, r.stderr
    assert f"skipped {secret}/tls.key: not readable by {NOBODY.pw_name}" in r.stderr
    assert "skipped" in (backups / "one" / "BACKUP-COMPLETE").read_text()
    assert (backups / "one" / "root" / str(config).lstrip("/")).exists()
    assert os.stat(backups / "one").st_uid == NOBODY.pw_uid
