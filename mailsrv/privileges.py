"""
Who the server runs as. Started as root, it binds its ports (those below
1024 too) and then runs as the unprivileged account of C{[server] user} and
C{group} (or twistd's C{--uid}/C{--gid}): twistd itself drops to it after
every listener is bound (the application's L{service.IProcess} uid and gid,
set by L{StartupGuard}), with the user's own supplementary groups
(C{initgroups}). Everything the server creates before that (the data
folders, the queue, the self-signed TLS certificate, ...) is created with
the account as its I{effective} user and group (L{acting_as}), so it is the
account's from the start, with the umask C{077}: nothing is chowned after.

The mail services do not run as root: started as root with no account to
run as, the server refuses to start, unless C{MAILSRV_ALLOW_ROOT=1} is in the
environment (a test, or a container whose only user is root) or it runs the
built-in default (loopback and unprivileged ports: the README's one command
to try it, which a fresh machine may run as root). Files in the
data folder that are not the account's (left by an earlier run as root) end
start-up with the C{chown} command that fixes them, rather than an EACCES in
the middle of a delivery.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from mailsrv.config import Config
from mailsrv.startup import StartupError

log = Logger()

ALLOW_ROOT_ENV = "MAILSRV_ALLOW_ROOT"
BUILT_IN = "<default>"  # Config.path of the built-in default (config.load)
# Group and others get nothing of what the server creates: mail is private.
UMASK = 0o077
# The data folder, when the server (as root) makes it for the account.
DATA_DIR_MODE = 0o700
# At most this many files are named in the report of files not the account's.
EXAMPLES = 3


@dataclass(frozen=True)
class Account:
    """The user and group the server runs as once its ports are bound."""

    uid: int
    gid: int
    user: str
    group: str

    @property
    def owner(self) -> str:
        """C{user:group}, as C{chown} takes it."""
        return f"{self.user}:{self.group}"


def _user(value: str | int) -> pwd.struct_passwd:
    if isinstance(value, int):
        return pwd.getpwuid(value)
    return pwd.getpwuid(int(value)) if value.isdigit() else pwd.getpwnam(value)


def _group(value: str | int) -> grp.struct_group:
    if isinstance(value, int):
        return grp.getgrgid(value)
    return grp.getgrgid(int(value)) if value.isdigit() else grp.getgrnam(value)


def account(config: Config, uid: int | None = None, gid: int | None = None) -> Account | None:
    """
    The account to run as: twistd's C{--uid}/C{--gid} (C{uid}, C{gid}) when
    given, else C{[server] user} and C{group}; the group defaults to the
    user's own. None when no user is named. A user or group this system
    does not know is a L{StartupError} naming its key.
    """
    server = config.server
    user_value: str | int | None = uid if uid is not None else server.user
    if user_value is None:
        if gid is not None or server.group is not None:
            value = gid if gid is not None else server.group
            raise StartupError(
                config.path, "server.group", value, "give [server] user too (the account to run as)"
            )
        return None
    key = "--uid" if uid is not None else "server.user"
    try:
        pw = _user(user_value)
    except KeyError:
        raise StartupError(config.path, key, user_value, "no such user on this system")
    group_value: str | int = gid if gid is not None else (server.group or pw.pw_gid)
    key = "--gid" if gid is not None else "server.group"
    try:
        gr = _group(group_value)
    except KeyError:
        raise StartupError(config.path, key, group_value, "no such group on this system")
    return Account(pw.pw_uid, gr.gr_gid, pw.pw_name, gr.gr_name)


def check_not_root(
    config: Config, run_as: Account | None, euid: int, environ: Mapping[str, str]
) -> None:
    """
    Refuse to serve mail as root: started as root, the server needs an
    unprivileged account to run as, unless C{MAILSRV_ALLOW_ROOT=1}.
    Started as anyone else, it can only stay who it is.
    """
    allowed = environ.get(ALLOW_ROOT_ENV) == "1"
    if euid == 0 and run_as is None and not allowed and config.path == BUILT_IN:
        # The built-in default (loopback, unprivileged ports, ./data) is for
        # trying mailsrv with the README's one command, which a fresh machine
        # may run as root: it runs, and says how to deploy it instead.
        log.warn(
            "running as root with the built-in default configuration (loopback only): "
            'for a real deployment write a config file with [server] user = "mailsrv"'
        )
        return
    if euid == 0:
        if run_as is None and not allowed:
            raise StartupError(
                config.path,
                "server.user",
                "",
                "the mail services do not run as root: name an unprivileged account to run as "
                '(for example [server] user = "mailsrv", group = "mailsrv"; twistd\'s --uid '
                f"and --gid also do), or set {ALLOW_ROOT_ENV}=1 in the environment to run as root",
            )
        if run_as is not None and run_as.uid == 0 and not allowed:
            raise StartupError(
                config.path,
                "server.user",
                run_as.user,
                f"that is root: name an unprivileged account (or set {ALLOW_ROOT_ENV}=1)",
            )
    elif run_as is not None and run_as.uid != euid:
        raise StartupError(
            config.path,
            "server.user",
            run_as.user,
            f"the server runs as uid {euid} and cannot become {run_as.user}: start it as root "
            "(it binds its ports, then runs as this account)",
        )


def prepare_data_dir(config: Config, run_as: Account) -> None:
    """
    As root, before anything else: make the data folder (mode 0700) and give
    it to C{run_as}, who then creates everything in it. The folders above it
    stay root's. An existing data folder is left as it is (L{check_owner}).
    """
    data_dir = config.server.data_dir
    if data_dir.exists():
        return
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(mode=DATA_DIR_MODE)
        # the folder just made, never what a name swapped in meanwhile points to
        fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, run_as.uid, run_as.gid)
        finally:
            os.close(fd)
    except OSError as e:
        raise StartupError(config.path, "server.data_dir", data_dir, e.strerror or str(e))


def foreign_files(top: Path, uid: int) -> list[Path]:
    """
    Every file and folder under C{top} (itself included) whose owner is not
    C{uid}; a folder that cannot be read is one. One lstat per entry through
    scandir, without following symlinks: 0.6 s for 140,000 entries (10,000
    users) with a warm cache, at each start.
    """
    found: list[Path] = []
    try:
        if os.lstat(top).st_uid != uid:
            found.append(top)
    except FileNotFoundError:
        return found
    folders = [str(top)]
    while folders:
        folder = folders.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            found.append(Path(folder))
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        found.append(Path(entry.path))
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                except FileNotFoundError:
                    pass
    return found


def check_owner(config: Config, run_as: Account) -> None:
    """
    Files in the data folder that C{run_as} does not own (an earlier run as
    root, a command run as root) end start-up, in one line with the command
    that fixes them: the server would meet them later as an EACCES, in the
    middle of a delivery.
    """
    data_dir = config.server.data_dir
    found = foreign_files(data_dir, run_as.uid)
    if not found:
        return
    examples = []
    for path in found[:EXAMPLES]:
        try:
            owner = _user(os.lstat(path).st_uid).pw_name
        except (KeyError, OSError):
            owner = "?"
        examples.append(f"{path} ({owner})")
    more = f" and {len(found) - EXAMPLES} more" if len(found) > EXAMPLES else ""
    raise StartupError(
        config.path,
        "server.data_dir",
        data_dir,
        f"{len(found)} files are not owned by {run_as.user}, who the server runs as: "
        f"{', '.join(examples)}{more}; fix with: "
        f"chown -R {run_as.owner} {shlex.quote(str(data_dir))}",
    )


def unreadable_config(config: Config) -> str | None:
    """
    Called while acting as the account (L{acting_as}): why a SIGHUP could not
    read the config file again, since the server reads it then as the account
    (None: it can). A file only root may read starts the server, read as root,
    and would refuse every reload.
    """
    if config.path.startswith("<"):  # the built-in default: nothing to read again
        return None
    try:
        with open(config.path, "rb"):
            return None
    except OSError as e:
        return e.strerror or str(e)


@contextmanager
def acting_as(run_as: Account | None) -> Iterator[None]:
    """
    Within: the effective user, group and supplementary groups are
    C{run_as}'s (when the process is root), so that whatever is created is
    its from the start and what it cannot read fails now; afterwards root
    again, to bind the ports before twistd drops privileges for good.
    """
    if run_as is None or os.geteuid() != 0:
        yield
        return
    groups = os.getgroups()
    egid = os.getegid()
    os.setgroups(os.getgrouplist(run_as.user, run_as.gid))
    os.setegid(run_as.gid)
    os.seteuid(run_as.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


def switch_to(
    config: Config,
    uid: int | None,
    gid: int | None,
    environ: Mapping[str, str],
    euid: int | None = None,
) -> Account | None:
    """
    The start-up checks of who the server runs as, and the account twistd
    switches to once the ports are bound (None: the process stays who it
    is). Started as root with an account: its data folder is made for it,
    and files in it that are not its end start-up (L{check_owner}).
    """
    euid = os.geteuid() if euid is None else euid
    run_as = account(config, uid, gid)
    check_not_root(config, run_as, euid, environ)
    if euid != 0 or run_as is None or run_as.uid == 0:
        return None
    prepare_data_dir(config, run_as)
    check_owner(config, run_as)
    return run_as
