"""
``mailsrv check-config``: check a config file and print the settings in
force, as Postfix's ``postconf -n`` and Dovecot's ``doveconf -n`` do.

By default only the settings that differ from the built-in defaults are
printed, as TOML (``[section]`` then ``key = value``, the values as the file
gives them) that can be pasted back: loaded again from the same folder it
gives the same settings. ``--all`` prints every setting with the value in
force, paths made absolute and derived values filled in, after comments
naming the config file, where that choice came from, and the folders the
server derives from ``data_dir``. Passwords are shown as a comment unless
``--show-secrets`` (doveconf's ``-P``).

A config that cannot be used prints every problem, one a line, as
``FILE:LINE: key: problem`` where the key's line is found, and exits 2 (the
exit code of every ``mailsrv`` command given a bad config). Beyond what
loading checks, ``check-config`` also checks what the server would stop on
at its start: the account of ``[server] user`` and ``group``, and the TLS
certificate, key and DKIM key files; problems of the aliases file are
printed as warnings, as the server logs them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from mailsrv.addresses.edit import AliasEditError, list_aliases
from mailsrv.config import Config, ConfigError
from mailsrv.config.loading import DEFAULT_CONFIG, schema, validate
from mailsrv.privileges import account
from mailsrv.startup import StartupError

HANDLER = "handler"

# Shown only with --show-secrets.
SECRETS = frozenset({("relay", "smarthost_password"), ("filter", "rspamd_password")})

# Settings whose value in force is not the text given: relative paths made
# absolute, and values derived from others when not set.
_EFFECTIVE: dict[tuple[str, str], Callable[[Config], Any]] = {
    ("server", "data_dir"): lambda c: str(c.server.data_dir),
    ("tls", "certificate"): lambda c: c.tls.certificate and str(c.tls.certificate),
    ("tls", "key"): lambda c: c.tls.key and str(c.tls.key),
    ("auth", "passwd_file"): lambda c: str(c.auth.passwd_file),
    ("addresses", "aliases"): lambda c: str(c.addresses.aliases),
    ("addresses", "srs_domain"): lambda c: c.addresses.srs_domain,
    ("dkim", "keys"): lambda c: {d: str(p) for d, p in c.dkim.keys.items()},
    ("filter", "rspamd_controller"): lambda c: c.filter and c.filter.rspamd_controller,
    ("policy", "deny_file"): lambda c: c.policy.deny_file and str(c.policy.deny_file),
    ("policy", "allow_file"): lambda c: c.policy.allow_file and str(c.policy.allow_file),
}

_HEADER = re.compile(r"\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")
_PROBLEM = re.compile(r"\[?([A-Za-z0-9_-]+)\]?(?:\.([A-Za-z0-9_-]+))?:")
_TOML_LINE = re.compile(r"at line (\d+)")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def add_check_config_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``check-config [-a|--all] [--show-secrets]`` to C{subparsers}."""
    p = subparsers.add_parser(
        "check-config",
        help="check the config and print the settings that differ from the defaults",
        description=(
            "Check the config file (exit 2 with every problem, FILE:LINE: key: problem) and "
            "print the settings in force as TOML: those that differ from the built-in "
            "defaults, or with --all every one (like postconf -n / doveconf -n)."
        ),
    )
    p.add_argument("-a", "--all", action="store_true", help="every setting, defaults included")
    p.add_argument("--show-secrets", action="store_true", help="print passwords too")
    p.set_defaults(**{HANDLER: check_config})
    return p


def source_line(text: str, section: str, key: str | None) -> int | None:
    """The line (from 1) where C{[section]} sets C{key}, or its header; None if not found."""
    current = None
    header = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            if current == section and header is None:
                header = number
            continue
        if current == section and key is not None:
            name = line.split("=", 1)[0].strip().strip("\"'") if "=" in line else None
            if name == key:
                return number
    return header


def problem_lines(error: ConfigError, text: str | None) -> list[str]:
    """Each problem of C{error} as C{FILE:LINE: problem}, or C{FILE: problem} without a line."""
    out = []
    for problem in error.errors:
        line = None
        toml = _TOML_LINE.search(problem) if problem.startswith("not valid TOML") else None
        if toml:
            line = int(toml.group(1))
        elif text is not None and (m := _PROBLEM.match(problem)):
            line = source_line(text, m.group(1), m.group(2))
        out.append(f"{error.path}:{line}: {problem}" if line else f"{error.path}: {problem}")
    return out


def non_default(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The settings of C{raw} (a parsed file) whose value differs from the built-in default."""
    given, _ = validate(raw)
    defaults, _ = validate({})
    out: dict[str, dict[str, Any]] = {}
    for section, keys in given.items():
        for key, value in keys.items():
            if value != defaults[section][key]:
                out.setdefault(section, {})[key] = raw[section][key]
    return out


def every_setting(config: Config, raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every setting: as given, else its default; paths absolute, derived values filled in."""
    out: dict[str, dict[str, Any]] = {}
    for section, keys in schema().items():
        given = raw.get(section, {})
        values = out.setdefault(section, {})
        for key, (_, default) in keys.items():
            effective = _EFFECTIVE.get((section, key))
            if effective is not None:
                values[key] = effective(config)
            else:
                values[key] = given.get(key, default)
    return out


def to_toml(settings: Mapping[str, Mapping[str, Any]], show_secrets: bool = False) -> str:
    """C{settings} as TOML, a table per section; an unset value as a comment."""
    blocks = []
    for section, keys in settings.items():
        lines = [f"[{section}]"]
        for key, value in keys.items():
            name = _key(key)
            if value is None:
                lines.append(f"# {name} is not set")
            elif (section, key) in SECRETS and not show_secrets:
                lines.append(f"# {name} = (hidden; --show-secrets prints it)")
            else:
                lines.append(f"{name} = {_value(value)}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _value(v: Any) -> str:
    """A TOML value (JSON's string escapes are TOML's basic string escapes)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items())
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(v, Iterable):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML date or time: not one of ours


def config_text(config: Config) -> str:
    """The TOML text C{config} was parsed from (the built-in default's for it)."""
    return config.source or DEFAULT_CONFIG


def check_config(args: argparse.Namespace, config: Config, out: TextIO | None = None) -> int:
    """
    Print the settings (the config loaded without error: main reports the
    errors, with L{problem_lines}); 0.
    """
    out = out or sys.stdout
    problems = start_problems(config)
    if problems:
        for line in problem_lines(ConfigError(config.path, problems), config_text(config)):
            print(f"mailsrv: {line}", file=sys.stderr)
        return 2
    for warning in alias_warnings(config):
        print(f"mailsrv: warning: {warning}", file=sys.stderr)
    raw = tomllib.loads(config_text(config))
    if args.all:
        origin = getattr(args, "config_origin", None) or "?"
        print(f"# config: {config.path} (from {origin})", file=out)
        print(f"# mail folders: {config.mail_dir}", file=out)
        print(f"# index: {config.index_dir}", file=out)
        print(f"# queue: {config.queue_dir}", file=out)
        print(f"# spool: {config.spool_dir}", file=out)
        if config.base_dir is not None:
            print(f"# relative paths from: {config.base_dir}", file=out)
        print("", file=out)
        settings = every_setting(config, raw)
    else:
        settings = non_default(raw)
    print(to_toml(settings, args.show_secrets), end="", file=out)
    return 0


def source_of(path: Path | None) -> str | None:
    """The text of the config file at C{path} (None: unreadable, or the built-in default)."""
    if path is None:
        return DEFAULT_CONFIG
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def start_problems(config: Config) -> list[str]:
    """What the server would refuse to start with, though the config loads."""
    problems = []
    try:
        account(config)
    except StartupError as e:
        problems.append(f"{e.key}: {e.value}: {e.reason}")
    files = [("tls.certificate", config.tls.certificate), ("tls.key", config.tls.key)]
    files += [("dkim.keys", path) for path in config.dkim.keys.values()]
    for key, path in files:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            problems.append(f"{key}: cannot read {path}: {e.strerror}")
    return problems


def alias_warnings(config: Config) -> list[str]:
    """The problems of the aliases file, each naming its file and line."""
    try:
        return list(list_aliases(config.addresses.aliases).problems)
    except AliasEditError as e:
        return [str(e)]
