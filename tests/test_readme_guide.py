"""
The README's deployment guide names only what exists: every ``mailsrv ...``
command in it parses with the admin command's own parser, every config key
it names (`[section] key`, or a TOML snippet) is one the config knows, and
the short table of contents points at it.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from mailsrv.cli import build_parser
from mailsrv.config import ConfigError, parse

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## Deployment guide"


def guide() -> str:
    text = README.read_text()
    assert HEADING in text, "README has no deployment guide"
    rest = text.split(HEADING, 1)[1]
    return rest.split("\n## ", 1)[0]


def code_lines(text: str) -> list[str]:
    """The lines of indented code blocks (four spaces, or six inside a list item)."""
    return [line.strip() for line in text.splitlines() if re.match(r"^( {4}| {6})\S", line)]


def commands(text: str) -> list[str]:
    """The ``mailsrv ...`` commands: code lines, and inline code in the prose."""
    found = [line for line in code_lines(text) if line.startswith("mailsrv ")]
    prose = re.sub(r"\n\s*", " ", text)  # inline code may wrap across lines
    found += re.findall(r"`(mailsrv [^`]+)`", prose)
    return found


def named_keys(text: str) -> set[tuple[str, str]]:
    """Keys named as `[section] key ...` in the prose and in TOML snippets of code blocks."""
    keys = set(re.findall(r"`\[(\w+)\] (\w+)", re.sub(r"\n\s*", " ", text)))
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        stripped = line.strip()
        if re.fullmatch(r"\[\w+\]", stripped) and line.startswith("    "):
            block = [stripped]
        elif block and stripped and line.startswith("    "):
            block.append(stripped)
        elif block:
            for section, table in tomllib.loads("\n".join(block)).items():
                keys.update((section, key) for key in table)
            block = []
    return keys


def unknown(section: str, key: str) -> list[str]:
    """The config's complaints about C{section}.C{key} being unknown (not about its value)."""
    try:
        parse(f'[{section}]\n{key} = "x"\n')
    except ConfigError as e:
        return [line for line in str(e).splitlines() if "unknown" in line]
    return []


GUIDE_COMMANDS = commands(guide()) if HEADING in README.read_text() else []


def test_the_guide_is_in_the_table_of_contents() -> None:
    head = README.read_text().split("\n## ", 1)[0]
    assert "(#deployment-guide)" in head
    for part in ("### DNS records", "### Firewall", "### Backup while running", "### Upgrading"):
        assert part in guide()


def test_the_guide_names_the_commands_it_needs() -> None:
    text = " ".join(commands(guide()))
    assert "mailsrv backup " in text and "mailsrv dkim keygen " in text


@pytest.mark.parametrize("command", GUIDE_COMMANDS)
def test_each_command_parses(command: str) -> None:
    argv = shlex.split(command, comments=True)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{command!r} does not parse: exit {e.code}")
    assert args.command


def test_each_config_key_exists() -> None:
    keys = named_keys(guide())
    assert ("tls", "certificate") in keys and ("log", "syslog") in keys
    problems = {f"[{s}] {k}": unknown(s, k) for s, k in sorted(keys)}
    assert not {k: v for k, v in problems.items() if v}
