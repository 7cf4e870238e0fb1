"""
Who the ``mailsrv`` admin command runs as. Run as root, it becomes the
server's account (C{[server] user} and C{group}, else the owner of the data
folder when that is not root) for good, before it touches the data folder:
setgroups (the account's own groups), setgid, setuid, and the server's
umask 077. So every file it creates there (the passwd file and its lock,
queue marks, DKIM keys, aliases) is the account's from the start, and a
symlink the account planted in its own folder gets only the account's
rights, never root's. No command needs root after that: the config is
read before the switch; files outside the data folder that a command
writes (an aliases file or a DKIM key under /etc) must be writable by the
account, as the server must be able to read them.

A data folder that does not exist yet is made for the account first, as
the server makes it (L{mailsrv.privileges.prepare_data_dir}). Run as
anyone else, the command stays who it is.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex

from mailsrv.config import Config
from mailsrv.privileges import UMASK, Account, account, prepare_data_dir
from mailsrv.startup import StartupError


def admin_account(config: Config, euid: int) -> Account | None:
    """
    The account the command becomes when run as root (C{euid} 0), or None:
    not root, or neither C{[server] user} nor a data folder owned by another
    user names one. An unknown user or group is a L{mailsrv.startup.StartupError}.
    """
    if euid != 0:
        return None
    run_as = account(config)
    if run_as is None:
        try:
            st = os.stat(config.server.data_dir)
        except FileNotFoundError:
            return None
        if st.st_uid == 0:
            return None
        run_as = Account(st.st_uid, st.st_gid, _user_name(st.st_uid), _group_name(st.st_gid))
    return None if run_as.uid == 0 else run_as


def become(config: Config, run_as: Account) -> None:
    """
    For good: C{run_as}'s groups, group and user, and the server's umask. A
    data folder that is not C{run_as}'s (made by an earlier run as root) is a
    L{StartupError} naming the fix, as at the server's start, rather than a
    bare "Permission denied" from whatever the command touches first.
    """
    prepare_data_dir(config, run_as)
    data_dir = config.server.data_dir
    if os.lstat(data_dir).st_uid != run_as.uid:
        raise StartupError(
            config.path,
            "server.data_dir",
            data_dir,
            f"not owned by {run_as.user}, who the server and this command run as; fix with: "
            f"chown -R {run_as.owner} {shlex.quote(str(data_dir))}",
        )
    try:
        groups = os.getgrouplist(run_as.user, run_as.gid)
    except (KeyError, OSError):
        groups = [run_as.gid]  # a uid without a passwd entry: its group alone
    os.setgroups(groups)
    os.setgid(run_as.gid)
    os.setuid(run_as.uid)
    os.umask(UMASK)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
