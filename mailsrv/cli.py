"""
The ``mailsrv`` admin command: mailbox owners (``user``) and, when the
outbound part is installed, the mail queue (``queue``).

Exit codes: 0 done, 1 refused (unknown user, bad address, ...), 2 bad
command line or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import mailsrv
from mailsrv.auth.passwd import PasswordFile, PasswordFileError, check_address
from mailsrv.config import CONFIG_ENV, SYSTEM_CONFIG, Config, ConfigError, find_config, load
from mailsrv.store.names import split_user, user_dir

HANDLER = "handler"  # the argparse default naming a subcommand's handler(args, config) -> int


class CommandError(Exception):
    """A command that cannot be done; the text is shown to the administrator."""


class _IO:
    """Where a command reads and writes, so that tests can pass their own."""

    def __init__(
        self, stdin: TextIO, stdout: TextIO, stderr: TextIO, getpass_: Callable[[str], str]
    ) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.getpass = getpass_


def read_password(io: _IO) -> str:
    """One line from standard input when it is not a terminal; else prompt twice."""
    if not io.stdin.isatty():
        line = io.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = io.getpass("Password: ")
        if password != io.getpass("Retype password: "):
            raise CommandError("the passwords do not match")
    if not password:
        raise CommandError("empty password refused")
    if "\n" in password or "\0" in password:
        raise CommandError("the password must be one line without NUL")
    return password


def _local_address(config: Config, address: str) -> str:
    try:
        address = check_address(address)
    except ValueError as e:
        raise CommandError(str(e))
    domain = split_user(address)[1]
    if not config.is_local_domain(domain):
        raise CommandError(
            f"{domain} is not a local domain of this server "
            f"(server.domains in {config.path}: {', '.join(config.server.domains)})"
        )
    return address


def _user_add(args: argparse.Namespace, config: Config, io: _IO) -> int:
    address = _local_address(config, args.address)
    passwords = PasswordFile(config.auth.passwd_file)
    if passwords.has_user(address):
        raise CommandError(f"{address} already exists")
    password = read_password(io)
    try:
        passwords.add_user(address, password)
    except KeyError:
        raise CommandError(f"{address} already exists")
    print(f"added {address} to {config.auth.passwd_file}", file=io.stdout)
    return 0


def _user_passwd(args: argparse.Namespace, config: Config, io: _IO) -> int:
    try:
        address = check_address(args.address)
    except ValueError as e:
        raise CommandError(str(e))
    passwords = PasswordFile(config.auth.passwd_file)
    if not passwords.has_user(address):
        raise CommandError(f"no such user: {address}")
    password = read_password(io)
    try:
        passwords.set_password(address, password)
    except KeyError:
        raise CommandError(f"no such user: {address}")
    print(f"changed the password of {address} in {config.auth.passwd_file}", file=io.stdout)
    return 0


def _user_del(args: argparse.Namespace, config: Config, io: _IO) -> int:
    try:
        address = check_address(args.address)
    except ValueError as e:
        raise CommandError(str(e))
    try:
        address = PasswordFile(config.auth.passwd_file).delete_user(address)
    except KeyError:
        raise CommandError(f"no such user: {address}")
    print(f"deleted {address}; mail kept in {user_dir(config.mail_dir, address)}", file=io.stdout)
    return 0


def _user_list(args: argparse.Namespace, config: Config, io: _IO) -> int:
    for address in PasswordFile(config.auth.passwd_file).users():
        print(address, file=io.stdout)
    return 0


def _version() -> str:
    """The installed package's version (pyproject.toml's)."""
    return mailsrv.__version__


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``mailsrv [--config FILE] user|queue ...``."""
    parser = argparse.ArgumentParser(
        prog="mailsrv",
        description="Administer a mailsrv server (run the server with: twistd -n mailsrv).",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=(
            f"the TOML configuration file (default: ${CONFIG_ENV}, else {SYSTEM_CONFIG} "
            "when it exists, else the built-in default, as twistd mailsrv finds it)"
        ),
    )
    parser.add_argument("--version", action="version", version=f"mailsrv {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    user = commands.add_parser("user", help="manage mailbox owners (login: the full address)")
    sub = user.add_subparsers(dest="user_command", metavar="{add,list,del,passwd}")
    sub.required = True
    add = sub.add_parser(
        "add", help="add a user; the password is read from standard input or prompted for"
    )
    add.add_argument("address", help="local@domain, the domain one of server.domains")
    add.set_defaults(**{HANDLER: _user_add})
    sub.add_parser("list", help="list the users").set_defaults(**{HANDLER: _user_list})
    delete = sub.add_parser("del", aliases=["delete"], help="remove a user (the mail is kept)")
    delete.add_argument("address")
    delete.set_defaults(**{HANDLER: _user_del})
    passwd = sub.add_parser("passwd", help="change a user's password")
    passwd.add_argument("address")
    passwd.set_defaults(**{HANDLER: _user_passwd})

    try:
        from mailsrv.outbound.admin import add_queue_commands
    except ImportError:
        pass
    else:
        add_queue_commands(commands)
    return parser


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    getpass_: Callable[[str], str] = getpass.getpass,
    environ: Mapping[str, str] | None = None,
    system_config: Path = SYSTEM_CONFIG,
) -> int:
    """Run the admin command; return the exit code."""
    io = _IO(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr, getpass_)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return int(e.code or 0)
    path, _ = find_config(args.config, environ, system_config)
    try:
        config = load(path)
    except ConfigError as e:
        for line in str(e).splitlines():
            print(f"mailsrv: {line}", file=io.stderr)
        return 2
    if path is None:
        print(
            f"mailsrv: no configuration file (no --config, ${CONFIG_ENV} or {system_config}): "
            f"the built-in default, data in {config.server.data_dir}",
            file=io.stderr,
        )
    handler: Callable[..., int] = getattr(args, HANDLER)
    try:
        if handler in (_user_add, _user_del, _user_list, _user_passwd):
            return handler(args, config, io)
        return _call_external(handler, args, config, io)
    except CommandError as e:
        print(f"mailsrv: {e}", file=io.stderr)
        return 1
    except PasswordFileError as e:
        print(f"mailsrv: {e}", file=io.stderr)
        return 1
    except OSError as e:
        print(f"mailsrv: {e.filename or ''}: {e.strerror}", file=io.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=io.stderr)
        return 130


def _call_external(
    handler: Callable[..., int], args: argparse.Namespace, config: Config, io: _IO
) -> Any:
    """Another part's subcommand: C{handler(args, config) -> int}, its output to our stdout."""
    with contextlib.redirect_stdout(io.stdout):
        return handler(args, config)
