"""
The ``mailsrv`` admin command: mailbox owners (``user``), the aliases file
(``alias``), DKIM signing keys (``dkim keygen``), the config check
(``check-config``) and, when the outbound part is installed, the mail queue
(``queue``).

Exit codes: 0 done, 1 refused (unknown user, bad address, ...), 2 bad
command line or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import mailsrv
from mailsrv.addresses.aliases import AliasSyntaxError, AliasTable, format_address, split_address
from mailsrv.addresses.edit import AliasEditError, add_alias, delete_alias, list_aliases
from mailsrv.addresses.resolver import (
    ALIAS_CHECK_INTERVAL,
    AddressRules,
    AddressSettings,
    Resolved,
    address_rules,
)
from mailsrv.addresses.srs import SECRET_FILE, SRSSecretError
from mailsrv.adminaccount import admin_account, become
from mailsrv.auth.passwd import PasswordFile, PasswordFileError, check_address
from mailsrv.checkconfig import add_check_config_command, problem_lines, source_of
from mailsrv.config import CONFIG_ENV, SYSTEM_CONFIG, Config, ConfigError, find_config, load
from mailsrv.dkim.admin import KeygenError, add_dkim_commands
from mailsrv.startup import StartupError
from mailsrv.store.names import split_user, user_dir
from mailsrv.store.quota import storage_used
from mailsrv.store.quotalimits import format_size

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


def _user_quota(args: argparse.Namespace, config: Config, io: _IO) -> int:
    """Each user's storage (the octets of its mbox files) and [quota] limit, as doveadm quota get."""
    passwords = PasswordFile(config.auth.passwd_file)
    addresses = passwords.users()
    if args.addresses:
        found = [passwords.lookup(a) for a in args.addresses]
        unknown = [a for a, f in zip(args.addresses, found, strict=True) if f is None]
        if unknown:
            raise CommandError(f"no such user: {', '.join(unknown)}")
        addresses = [f for f in found if f is not None]
    rows = []
    for address in addresses:
        used, limit = storage_used(config.mail_dir, address), config.quota.limit_of(address)
        share = f"{100 * used // limit}%" if limit else ""
        rows.append((address, format_size(used), format_size(limit) if limit else "none", share))
    width = max((len(r[0]) for r in rows), default=0)
    for address, used_text, limit_text, share in rows:
        line = f"{address:<{width}}  used {used_text:>6}  limit {limit_text:>6}  {share}"
        print(line.rstrip(), file=io.stdout)
    return 0


def _reread_note() -> str:
    return f"the running server reads it again within {ALIAS_CHECK_INTERVAL:g} seconds"


def _report_problems(problems: Sequence[str], io: _IO) -> None:
    for problem in problems:
        print(f"mailsrv: warning: {problem}", file=io.stderr)


def _alias_add(args: argparse.Namespace, config: Config, io: _IO) -> int:
    path = config.addresses.aliases
    try:
        result = add_alias(path, args.name, args.targets, config.is_local_domain)
    except AliasEditError as e:
        raise CommandError(str(e))
    name = args.name.strip()
    if result.already:
        print(f"{name} already has {', '.join(result.already)}", file=io.stdout)
    if result.added:
        what = "added alias" if result.created else "added to alias"
        print(
            f"{what} {name}: {', '.join(result.added)} in {path}; {_reread_note()}",
            file=io.stdout,
        )
    if result.created:
        _note_shadowed_users(config, name, io)
    _report_problems(list_aliases(path).problems, io)
    return 0


def _note_shadowed_users(config: Config, name: str, io: _IO) -> None:
    """An alias comes before a user of the same address: say so when it hides one."""
    local, domain = split_address(name)
    domains = config.server.domains if domain is None else (domain,)
    passwords = PasswordFile(config.auth.passwd_file)
    for d in domains:
        try:
            user = passwords.lookup(format_address(local, d))
        except PasswordFileError:
            return  # the alias is written; this note is only a courtesy
        if user is not None:
            print(
                f"mailsrv: note: mail for the user {user} now follows this alias "
                f"(name {local} among the targets to keep it delivering to the user too)",
                file=io.stderr,
            )


def _alias_del(args: argparse.Namespace, config: Config, io: _IO) -> int:
    path = config.addresses.aliases
    try:
        delete_alias(path, args.name, config.is_local_domain)
    except AliasEditError as e:
        raise CommandError(str(e))
    print(f"deleted alias {args.name.strip()} from {path}; {_reread_note()}", file=io.stdout)
    _report_problems(list_aliases(path).problems, io)
    return 0


def _alias_list(args: argparse.Namespace, config: Config, io: _IO) -> int:
    path = config.addresses.aliases
    try:
        listing = list_aliases(path)
    except AliasEditError as e:
        raise CommandError(str(e))
    if not listing.exists:
        print(f"mailsrv: no aliases file at {path} (mailsrv alias add makes it)", file=io.stderr)
    for line in listing.entries:
        print(line, file=io.stdout)
    _report_problems(listing.problems, io)
    return 0


class _WallClock:
    """The one reactor method the address rules use (SRS time stamps)."""

    @staticmethod
    def seconds() -> float:
        return time.time()


def _rules(config: Config, io: _IO) -> AddressRules:
    """
    The server's address rules. Without an SRS secret yet, the rules without
    SRS: a look must not create the server's secret (as another user); with
    one this command cannot read, the same, and a warning.
    """
    if (config.server.data_dir / SECRET_FILE).exists():
        try:
            return address_rules(config, _WallClock())
        except SRSSecretError as e:
            print(f"mailsrv: warning: {e}: SRS addresses are not checked", file=io.stderr)
    table = AliasTable(config.addresses.aliases, config.server.domains)
    return AddressRules(AddressSettings.from_config(config), aliases=table)


def _alias_show(args: argparse.Namespace, config: Config, io: _IO) -> int:
    address = args.address.strip()
    rules = _rules(config, io)
    _, at, domain = address.rpartition("@")
    try:
        split_address(address)
    except AliasSyntaxError as e:
        raise CommandError(f"{address!r} is not an address: {e}")
    if not at:
        raise CommandError(f"{address!r} is not an address (local@domain)")
    if not rules.is_local_domain(domain) and not rules.is_srs_address(address):
        raise CommandError(f"{domain} is not a local domain of this server")
    result: Resolved = rules.resolve(address, PasswordFile(config.auth.passwd_file))
    if result.temporary:
        raise CommandError(result.temporary)
    if result.error:
        raise CommandError(f"{address}: {result.error}")
    for final in result.finals:
        notes = []
        if not final.local:
            notes.append("forwarded")
        if final.detail:
            notes.append(f"filed in folder {final.detail!r} if it exists")
        if final.mailing_list:
            notes.append(f"list {final.mailing_list}")
        note = f" ({', '.join(notes)})" if notes else ""
        print(f"{final.address}{note}", file=io.stdout)
    if not result.finals:
        itself = format_address(*split_address(address)).casefold()
        others = [u for u in result.unknown if u.casefold() != itself]
        if not others:
            raise CommandError(f"{address}: no such user or alias")
        raise CommandError(f"{address}: no recipients: no such user or alias: {', '.join(others)}")
    for unknown in result.unknown:
        print(f"mailsrv: skipped {unknown}: no such user or alias", file=io.stderr)
    return 0


def _version() -> str:
    """The installed package's version (pyproject.toml's)."""
    return mailsrv.__version__


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``mailsrv [--config FILE] user|alias|queue ...``."""
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
    sub = user.add_subparsers(dest="user_command", metavar="{add,list,del,passwd,quota}")
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
    quota = sub.add_parser("quota", help="show the users' storage use and [quota] limits")
    quota.add_argument("addresses", nargs="*", metavar="ADDRESS", help="these users only")
    quota.set_defaults(**{HANDLER: _user_quota})

    alias = commands.add_parser(
        "alias",
        help="manage the aliases file ([addresses] aliases; the server re-reads it)",
    )
    sub = alias.add_subparsers(dest="alias_command", metavar="{add,del,list,show}")
    sub.required = True
    add = sub.add_parser(
        "add",
        help="add an alias, or add targets to an existing one",
        description=(
            "Add NAME: TARGET, ... to the aliases file. An existing NAME gets the targets it "
            "does not have yet, appended to its entry."
        ),
    )
    add.add_argument(
        "name", help="a bare name (every local domain) or an address in a local domain"
    )
    add.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="a local part, a user, another alias, an external address, or :include:FILE",
    )
    add.set_defaults(**{HANDLER: _alias_add})
    delete = sub.add_parser("del", aliases=["delete"], help="remove an alias")
    delete.add_argument("name")
    delete.set_defaults(**{HANDLER: _alias_del})
    sub.add_parser("list", help="list the aliases and the file's problems").set_defaults(
        **{HANDLER: _alias_list}
    )
    show = sub.add_parser("show", help="the final recipients of an address")
    show.add_argument("address")
    show.set_defaults(**{HANDLER: _alias_show})

    try:
        from mailsrv.outbound.admin import add_queue_commands
    except ImportError:
        pass
    else:
        add_queue_commands(commands)
    add_dkim_commands(commands)
    from mailsrv.status import add_status_command  # the running daemon's status

    add_status_command(commands)
    from mailsrv.backup import add_backup_command

    add_backup_command(commands)  # mailsrv backup DEST
    add_check_config_command(commands)
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
    path, origin = find_config(args.config, environ, system_config)
    args.config_origin = origin  # where the config came from, for check-config --all
    try:
        config = load(path)
    except ConfigError as e:
        for line in problem_lines(e, source_of(path)):
            print(f"mailsrv: {line}", file=io.stderr)
        return 2
    try:  # run as root: the server's account from here on (mailsrv.adminaccount)
        run_as = admin_account(config, os.geteuid())
        if run_as is not None:
            become(config, run_as)
    except StartupError as e:
        problem = ConfigError(config.path, [f"{e.key}: {e.value}: {e.reason}"])
        for line in problem_lines(problem, source_of(path)):
            print(f"mailsrv: {line}", file=io.stderr)
        return 2
    except OSError as e:
        print(f"mailsrv: cannot become the server's account: {e}", file=io.stderr)
        return 2
    if path is None:
        print(
            f"mailsrv: no configuration file (no --config, ${CONFIG_ENV} or {system_config}): "
            f"the built-in default, data in {config.server.data_dir}",
            file=io.stderr,
        )
    handler: Callable[..., int] = getattr(args, HANDLER)
    try:
        if handler in _OWN_HANDLERS:
            return handler(args, config, io)
        return _call_external(handler, args, config, io)
    except (CommandError, KeygenError) as e:
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


_OWN_HANDLERS = frozenset(
    {
        _user_add,
        _user_del,
        _user_list,
        _user_passwd,
        _user_quota,
        _alias_add,
        _alias_del,
        _alias_list,
        _alias_show,
    }
)


def _call_external(
    handler: Callable[..., int], args: argparse.Namespace, config: Config, io: _IO
) -> Any:
    """Another part's subcommand: C{handler(args, config) -> int}, its output to ours."""
    with contextlib.redirect_stdout(io.stdout), contextlib.redirect_stderr(io.stderr):
        return handler(args, config)
