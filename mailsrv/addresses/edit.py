"""
Changing the aliases file from the admin command (C{mailsrv alias add|del}),
the way an administrator would with an editor: every other line, comment,
blank line and continuation is kept byte for byte, an entry's own lines are
the only ones touched, and lines with problems stay as they are (they are
reported, never dropped or "fixed").

Names and targets are checked with the parser the server uses
(L{mailsrv.addresses.aliases}), so what is written is what it will read.
A change is made under an exclusive lock on C{FILE.lock} beside the file
(two admins at once never lose each other's edits) and written atomically
(L{mailsrv.atomic.write_atomic}), keeping the file's mode (0644 for a new
file): the running server sees the old file or the new one, never a part.

C{add} of an alias that exists appends the new targets to it, as an admin
editing C{/etc/aliases} by hand would (aliases(5) keeps only the first of
two entries of one name, so a second line would be ignored); a target it
already has is not added twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailsrv.addresses.aliases import (
    INCLUDE,
    AliasKey,
    AliasSyntaxError,
    _Parser,
    _split_first_colon,
    _split_unquoted,
    format_address,
    parse_aliases,
    split_address,
)
from mailsrv.atomic import make_dirs, write_atomic

#: The mode of an aliases file this module creates (readable by the server's user).
NEW_FILE_MODE = 0o644
#: Beyond this width, targets added to an entry go on a continuation line.
LINE_WIDTH = 78
#: Characters that end a line for str.splitlines (and so for the aliases parser).
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


class AliasEditError(Exception):
    """An edit that is refused (bad name or target, unknown alias); the text says why."""


@dataclass
class Entry:
    """One entry of the file as written: its lines, its name, its targets."""

    first: int  # index of its first line
    last: int  # index of its last line that is not blank or a comment
    text: str  # the logical line (continuations joined)
    name: str = ""  # as written
    key: AliasKey | None = None  # None when the name cannot be parsed
    targets: list[str] = field(default_factory=list)  # as written, :include: not expanded
    problem: str | None = None  # why the server skips it

    @property
    def line_number(self) -> int:
        return self.first + 1


def _entries(path: Path, lines: list[str]) -> list[Entry]:
    """The entries of C{lines} (as aliases(5) groups them), each checked by the server's parser."""
    found: list[Entry] = []
    current: Entry | None = None
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and current is not None:
            current.last = i
            current.text += " " + line.strip()
            continue
        current = Entry(i, i, line if line[0].isspace() else line.strip())
        found.append(current)
    for entry in found:
        _check(path, entry)
    return found


def _check(path: Path, entry: Entry) -> None:
    """Fill in C{entry}'s name, key, targets and problem."""
    if entry.text[0].isspace():
        entry.problem = "continuation line with no entry before it"
        return
    name, colon, rest = _split_first_colon(entry.text)
    entry.name = name.strip()
    try:
        local, domain = split_address(name)
        entry.key = (local.lower(), domain)
        entry.targets = [t.strip() for t in _split_unquoted(rest, ",") if t.strip()]
        if not colon:
            raise AliasSyntaxError("no ':' after the name")
        _Parser(path)._entry(entry.text)
    except AliasSyntaxError as e:
        entry.problem = str(e)


def _no_line_breaks(text: str, what: str) -> None:
    if any(c in _LINE_BREAKS or ord(c) < 32 or c == "\x7f" for c in text):
        raise AliasEditError(f"{what} {text!r} holds a control character or a line break")


def check_name(name: str, is_local_domain: Callable[[str], bool]) -> tuple[str, AliasKey]:
    """
    C{name} as it will be written and its key: a bare name (every local
    domain) or a full address in a local domain.
    """
    written = name.strip()
    _no_line_breaks(written, "the name")
    if not written or written.startswith("#") or written.startswith(INCLUDE):
        raise AliasEditError(f"bad alias name {name!r}")
    try:
        local, domain = split_address(written)
    except AliasSyntaxError as e:
        raise AliasEditError(f"bad alias name {name!r}: {e}")
    if domain is not None and not is_local_domain(domain):
        raise AliasEditError(
            f"{domain} is not a local domain of this server: an alias is a name "
            "(every local domain) or an address in a local domain"
        )
    return written, (local.lower(), domain)


def _target_key(path: Path, target: str) -> tuple[str, ...]:
    """What makes two targets the same (local parts compared without case, as delivery does)."""
    if target.startswith(INCLUDE):
        file = Path(target[len(INCLUDE) :].strip())
        return ("include", str(file if file.is_absolute() else path.parent / file))
    local, domain = split_address(target)
    return ("address", format_address(local.lower(), domain))


def check_targets(path: Path, targets: list[str]) -> list[str]:
    """
    The targets to write, one per item (an argument holding commas is split
    as the file would split it), each checked by the server's parser.
    """
    out: list[str] = []
    for arg in targets:
        _no_line_breaks(arg, "the target")
        try:
            pieces = [t.strip() for t in _split_unquoted(arg, ",") if t.strip()]
        except AliasSyntaxError as e:
            raise AliasEditError(f"bad target {arg!r}: {e}")
        for piece in pieces:
            try:
                _Parser(path)._targets(piece, depth=0, chain=(path,))
            except AliasSyntaxError as e:
                raise AliasEditError(f"bad target {piece!r}: {e}")
            out.append(piece)
    if not out:
        raise AliasEditError("no targets given")
    return out


@dataclass(frozen=True)
class AddResult:
    """What L{add_alias} did."""

    created: bool  # a new entry (else targets appended to the existing one)
    added: tuple[str, ...]
    already: tuple[str, ...]  # targets the alias had already


def _newline(lines: list[str]) -> str:
    for line in lines:
        if line.endswith("\r\n"):
            return "\r\n"
        if line.endswith("\n"):
            return "\n"
    return "\n"


def _body(line: str) -> tuple[str, str]:
    """A line without its line break, and the break."""
    stripped = line.rstrip("\r\n")
    return stripped, line[len(stripped) :]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[list[str]]:
    """
    Hold the lock beside C{path} while its lines are read, changed by the
    caller and, when changed, written back atomically. A symbolic link is
    followed: the file it names is replaced, the link kept.
    """
    path = Path(os.path.realpath(path))
    make_dirs(path.parent, 0o755)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = path.read_bytes()
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            raw, mode = b"", NEW_FILE_MODE
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AliasEditError(f"{path} is not UTF-8 ({e}); not changed")
        lines = text.splitlines(keepends=True)
        before = list(lines)
        yield lines
        if lines != before:
            write_atomic(path, "".join(lines).encode("utf-8"), mode, keep_owner=True)
    finally:
        os.close(fd)


def add_alias(
    path: Path, name: str, targets: list[str], is_local_domain: Callable[[str], bool]
) -> AddResult:
    """
    Add C{name: targets} to the aliases file at C{path} (made if missing), or
    append the targets it lacks to the entry C{name} has; see the module
    docstring.
    """
    written, key = check_name(name, is_local_domain)
    new = check_targets(path, targets)
    with _locked(path) as lines:
        entry = next((e for e in _entries(path, lines) if e.key == key), None)
        if entry is not None and entry.problem is not None:
            raise AliasEditError(
                f"{path}:{entry.line_number}: the entry for {entry.name} has a problem "
                f"({entry.problem}); fix it with an editor first"
            )
        have = {_target_key(path, t) for t in (entry.targets if entry else [])}
        added: list[str] = []
        already: list[str] = []
        for target in new:
            k = _target_key(path, target)
            (already if k in have else added).append(target)
            have.add(k)
        if added:
            nl = _newline(lines)
            if entry is None:
                if lines and not lines[-1].endswith(("\n", "\r")):
                    lines[-1] += nl
                lines.append(f"{written}: {', '.join(added)}{nl}")
            else:
                _append_targets(lines, entry.last, added, nl)
        # Check the result as the server will read it.
        text = "".join(lines)
        mine = next(e for e in _entries(path, text.splitlines()) if e.key == key)
        if mine.problem is not None:
            raise AliasEditError(f"the entry would not be usable: {mine.problem}; not changed")
    return AddResult(entry is None, tuple(added), tuple(already))


def _append_targets(lines: list[str], last: int, targets: list[str], nl: str) -> None:
    """Append C{targets} to the entry whose last line is C{lines[last]}."""
    body, end = _body(lines[last])
    body = body.rstrip()
    joined = ", ".join(targets)
    comma = "" if body.endswith(",") else ","
    if len(body) + len(comma) + 1 + len(joined) <= LINE_WIDTH:
        lines[last] = f"{body}{comma} {joined}{end or nl}"
    else:  # aliases(5): a line that starts with white space continues the entry
        lines[last] = f"{body}{comma}{nl}\t{joined}{end or nl}"


def delete_alias(path: Path, name: str, is_local_domain: Callable[[str], bool]) -> int:
    """
    Remove the entry C{name} (and any later duplicate of it, which the server
    ignores anyway) with its continuation lines; returns how many entries
    were removed. L{AliasEditError} when there is none.
    """
    written, key = check_name(name, is_local_domain)
    with _locked(path) as lines:
        entries = _entries(path, lines)
        gone = [e for e in entries if e.key == key]
        if not gone:
            similar = sorted(e.name for e in entries if e.key is not None and e.key[0] == key[0])
            hint = f" (there is: {', '.join(similar)})" if similar else ""
            raise AliasEditError(f"no such alias: {written} in {path}{hint}")
        for entry in reversed(gone):
            del lines[entry.first : entry.last + 1]
    return len(gone)


@dataclass(frozen=True)
class Listing:
    """The usable entries of a file (C{name: target, target}, sorted) and its problems."""

    entries: tuple[str, ...]
    problems: tuple[str, ...]
    exists: bool


def list_aliases(path: Path) -> Listing:
    """The aliases of the file at C{path} as written, and every problem the server reports."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return Listing((), (), False)
    except UnicodeDecodeError as e:
        raise AliasEditError(f"{path} is not UTF-8 ({e})")
    seen: set[AliasKey] = set()
    out: list[tuple[str, str]] = []
    for entry in _entries(path, text.splitlines()):
        if entry.problem is not None or entry.key is None or entry.key in seen:
            continue
        seen.add(entry.key)
        out.append((entry.name.lower(), f"{entry.name}: {', '.join(entry.targets)}"))
    return Listing(
        tuple(line for _, line in sorted(out)), tuple(parse_aliases(path).problems), True
    )
