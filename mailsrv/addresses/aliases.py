"""
The aliases file, in the classic C{/etc/aliases} syntax as Postfix's
aliases(5) describes it, and its expansion of a recipient address into the
final recipients.

    # comment
    postmaster: root
    sales: alice, "bob", carol@example.net
    staff: :include:staff.list
    info@example.org: bob@example.test,
        dave

A bare name (C{sales}) applies to every local domain; a full address
(C{info@example.org}) to that domain only. A bare target is a local part of
the domain the alias was reached in. Targets are local users, other aliases,
or external addresses (kept as they are, for the outbound queue). Commands
(C{|prog}) and file targets (C{/path}) are not supported: such an entry is
reported and skipped.

Bad lines are reported (C{file:line: why}) and skipped whole: an entry with
one bad target is not applied at all. Parsing reads files and belongs off the
reactor thread; L{AliasTable.expand} is a dict lookup per hop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mailsrv.addresses.domains import DomainError, normalise_domain

#: How deep C{:include:} files may nest (an include loop stops here too).
MAX_INCLUDE_DEPTH = 5
#: How many alias hops an expansion may take before it gives up.
MAX_EXPANSION_DEPTH = 20
#: How many addresses one expansion may visit (aliases that fan out again and
#: again grow without a cycle; Postfix bounds this as virtual_alias_expansion_limit).
MAX_EXPANSION_STEPS = 10_000
INCLUDE = ":include:"

#: (local part, domain) with the local part case-folded; domain None = every local domain.
AliasKey = tuple[str, "str | None"]


class AliasSyntaxError(ValueError):
    """One entry or target of an aliases file that cannot be used (the message says why)."""


def _domain(domain: str) -> str:
    """L{normalise_domain}, its error reported as an aliases file's."""
    try:
        return normalise_domain(domain)
    except DomainError as e:
        raise AliasSyntaxError(str(e)) from None


def split_address(address: str) -> tuple[str, str | None]:
    """
    C{local@domain} -> (local, normalised domain); a bare local part ->
    (local, None). A quoted local part (C{"a b"@example.net}) is unquoted.
    """
    address = address.strip()
    whole = address.startswith('"') and address.endswith('"') and address.count('"') == 2
    if whole:
        address = address[1:-1]  # aliases(5): a whole name or target may be quoted
        if "@" not in address:
            if not address:
                raise AliasSyntaxError("empty local part")
            return address, None
    local, at, domain = address.rpartition("@")
    if not at:
        local, dom = address, None
    else:
        dom = _domain(domain)
    quoted = whole or (len(local) >= 2 and local[0] == local[-1] == '"')
    if quoted and not whole:
        local = local[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if not local:
        raise AliasSyntaxError(f"empty local part in {address!r}")
    if not quoted and any(c in _SPECIALS for c in local):
        raise AliasSyntaxError(f"bad address {address!r}")
    return local, dom


#: Characters a local part may hold only when quoted (RFC 5321 4.1.2 Atom vs Quoted-string).
_SPECIALS = frozenset(' \t"(),:;<>@[\\]')


def _split_parsed(target: str) -> tuple[str, str | None]:
    """Split a target L{format_address} wrote (its domain is already normalised)."""
    if target.endswith('"'):
        return target[1:-1].replace('\\"', '"').replace("\\\\", "\\"), None
    local, at, domain = target.rpartition("@")
    if not at:
        return target, None
    if local.endswith('"'):
        local = local[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return local, domain


def format_address(local: str, domain: str | None) -> str:
    """
    C{local@domain}, the local part quoted when RFC 5321 4.1.2 requires it
    (a character outside atext, or dots where a Dot-string cannot have them).
    """
    if (
        any(c in _SPECIALS for c in local)
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
    ):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return local if domain is None else f"{local}@{domain}"


def _split_unquoted(text: str, separators: str) -> list[str]:
    """Split C{text} at any of C{separators} outside double quotes."""
    parts, current, quoted = [], [], False
    escaped = False
    for c in text:
        if escaped:
            current.append(c)
            escaped = False
        elif c == "\\" and quoted:
            current.append(c)
            escaped = True
        elif c == '"':
            quoted = not quoted
            current.append(c)
        elif c in separators and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    if quoted:
        raise AliasSyntaxError("unterminated quote")
    parts.append("".join(current))
    return parts


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """
    aliases(5): blank lines and lines whose first non-blank character is
    C{#} are ignored; a line that starts with whitespace continues the
    logical line before it. Yields (first line number, logical line).
    """
    start = 0
    parts: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if parts:
                parts.append(line.strip())
                continue
            yield number, line  # a continuation with nothing before it: reported by the caller
            continue
        if parts:
            yield start, " ".join(parts)
        start, parts = number, [line.strip()]
    if parts:
        yield start, " ".join(parts)


#: (inode, size, modification time) of a file, None when it cannot be found.
FileSignature = tuple[int, int, int] | None


def file_signature(path: Path) -> FileSignature:
    """What tells a changed file: its inode, size and modification time (None: absent)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ParsedAliases:
    """What one read of an aliases file gave: entries, problems, and the files it read."""

    entries: dict[AliasKey, tuple[str, ...]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: False when the aliases file itself could not be read.
    readable: bool = True
    #: Each file read, with its signature taken just before it was read.
    files: dict[Path, FileSignature] = field(default_factory=dict)


def settled(parsed: ParsedAliases, now: float, quiet: float) -> bool:
    """
    Whether the files C{parsed} read were whole when read: none changed
    while it was read, and none had been written to in the last C{quiet}
    seconds before (an editor that rewrites a file in place may be half way).
    """
    for path, before in parsed.files.items():
        if file_signature(path) != before:
            return False
        if before is not None and 0 <= now - before[2] / 1e9 < quiet:
            return False
    return True


class _Parser:
    """One read of an aliases file and the C{:include:} files it names."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.result = ParsedAliases()

    def _read(self, path: Path) -> str:
        if path not in self.result.files:
            self.result.files[path] = file_signature(path)
        return path.read_text(encoding="utf-8")

    def parse(self) -> ParsedAliases:
        try:
            text = self._read(self.path)
        except FileNotFoundError:
            # No aliases file: no aliases, not a problem (it is watched and
            # read once it appears); one that vanishes keeps those read before.
            self.result.readable = False
            return self.result
        except (OSError, UnicodeDecodeError) as e:
            self.result.problems.append(f"{self.path}: cannot read: {e}")
            self.result.readable = False
            return self.result
        for number, line in _logical_lines(text):
            where = f"{self.path}:{number}"
            try:
                key, targets = self._entry(line)
            except AliasSyntaxError as e:
                self.result.problems.append(f"{where}: {e}; entry skipped")
                continue
            if key in self.result.entries:
                # Postfix's postalias(1) warns about a duplicate and keeps the first.
                self.result.problems.append(
                    f"{where}: duplicate alias {line.split(':')[0]!r}; skipped"
                )
                continue
            self.result.entries[key] = targets
        return self.result

    def _entry(self, line: str) -> tuple[AliasKey, tuple[str, ...]]:
        if line[0].isspace():
            raise AliasSyntaxError("continuation line with no entry before it")
        name, colon, rest = _split_first_colon(line)
        if not colon:
            raise AliasSyntaxError("no ':' after the name")
        local, domain = split_address(name)
        targets = self._targets(rest, depth=0, chain=(self.path,))
        if not targets:
            raise AliasSyntaxError(f"alias {name.strip()!r} has no targets")
        return (local.lower(), domain), tuple(targets)

    def _targets(self, text: str, depth: int, chain: tuple[Path, ...]) -> list[str]:
        """The targets of one right-hand side, C{:include:} files expanded in place."""
        out: list[str] = []
        for raw in _split_unquoted(text, ","):
            target = raw.strip()
            if not target:
                continue
            if target.startswith(INCLUDE):
                out.extend(self._include(target[len(INCLUDE) :].strip(), depth, chain))
                continue
            if target.lstrip('"').startswith(("|", "/")):
                raise AliasSyntaxError(f"command and file targets are not supported: {target!r}")
            out.append(format_address(*split_address(target)))
        return out

    def _include(self, name: str, depth: int, chain: tuple[Path, ...]) -> list[str]:
        """aliases(5) C{:include:/file}: the targets listed in that file (relative to ours)."""
        if not name:
            raise AliasSyntaxError(":include: without a file name")
        path = Path(name)
        if not path.is_absolute():
            path = self.path.parent / path
        if depth + 1 > MAX_INCLUDE_DEPTH or path in chain:
            raise AliasSyntaxError(f"{INCLUDE}{name} nests too deep (or includes itself)")
        try:
            text = self._read(path)
        except (OSError, UnicodeDecodeError) as e:
            raise AliasSyntaxError(f"cannot read {INCLUDE}{name}: {e}")
        out: list[str] = []
        for number, line in _logical_lines(text):
            try:
                out.extend(self._targets(line, depth + 1, chain + (path,)))
            except AliasSyntaxError as e:
                raise AliasSyntaxError(f"{path}:{number}: {e}")
        return out


def _split_first_colon(line: str) -> tuple[str, str, str]:
    """Split C{name: targets} at the first C{:} outside quotes."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c == ":" and not quoted:
            return line[:i], ":", line[i + 1 :]
    return line, "", ""


def parse_aliases(path: Path) -> ParsedAliases:
    """Read an aliases file (and its C{:include:} files): entries and problems."""
    return _Parser(path).parse()


@dataclass(frozen=True, slots=True)
class Expansion:
    """
    The final recipients of one address, in order and without duplicates;
    C{unknown} lists addresses in a local domain that are neither an alias
    nor a user. C{error} says why there are none when the expansion loops or
    goes too deep (RFC 3463 X.4.6, routing loop detected).
    """

    recipients: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    error: str | None = None


class AliasTable:
    """
    The aliases of a file, kept in memory for L{expand}, and re-read by
    L{maybe_reload} when the file or a file it includes changed (inode, size
    or modification time).
    """

    def __init__(self, path: Path, local_domains: Iterable[str]) -> None:
        self.path = Path(path)
        self.local_domains = frozenset(_domain(d) for d in local_domains)
        self.entries: dict[AliasKey, tuple[str, ...]] = {}
        self.problems: list[str] = []
        self._signatures: dict[Path, FileSignature] = {}
        self._loaded = False
        self.reload()

    def reload(self) -> list[str]:
        """Read the file again; returns the problems found (also kept in C{problems})."""
        return self.install(parse_aliases(self.path))

    def changed(self) -> bool:
        """Whether a file read last time changed since (reads the disk)."""
        return not all(file_signature(p) == sig for p, sig in self._signatures.items())

    def install(self, parsed: ParsedAliases) -> list[str]:
        """Use the aliases C{parsed} (from L{parse_aliases}) from now on."""
        self._signatures = parsed.files
        if not parsed.readable and self._loaded:
            # A file being replaced (or briefly unreadable) must not make every
            # alias unknown: keep what was read last.
            gone = [] if parsed.problems else [f"{self.path}: cannot read: no such file"]
            self.problems = (
                parsed.problems + gone + [f"{self.path}: keeping the aliases read before"]
            )
            return self.problems
        self._loaded = parsed.readable
        self.entries = parsed.entries
        self.problems = parsed.problems
        return self.problems

    def maybe_reload(self) -> bool:
        """Re-read if any file read last time changed; True when it did."""
        if not self.changed():
            return False
        self.reload()
        return True

    def lookup(self, local: str, domain: str) -> tuple[str, ...] | None:
        """
        The targets of C{local@domain}: its own entry first (any domain), else
        a bare name's when the domain is local.
        """
        folded = local.lower()
        targets = self.entries.get((folded, domain))
        if targets is None and domain in self.local_domains:
            targets = self.entries.get((folded, None))
        return targets

    def expand(self, address: str, is_local_user: Callable[[str], bool]) -> Expansion:
        """
        The final recipients of C{address}: aliases followed to local users
        and external addresses, in the order listed, each once. A target
        naming its own alias (C{alice: alice, archive}) is delivered to that
        user, as local(8) does; any other cycle is a loop.
        """
        try:
            local, domain = split_address(address)
        except AliasSyntaxError as e:
            return Expansion(error=str(e))
        if domain is None:
            return Expansion(error=f"no domain in {address!r}")
        recipients: dict[tuple[str, str], str] = {}
        unknown: dict[tuple[str, str], str] = {}
        # Depth-first, iterative: (local, domain, depth, the alias keys on the way
        # here, whether to deliver as is without looking for an alias).
        stack: list[tuple[str, str, int, frozenset[tuple[str, str]], bool]] = [
            (local, domain, 0, frozenset(), False)
        ]
        steps = 0
        while stack:
            steps += 1
            if steps > MAX_EXPANSION_STEPS:
                return Expansion(
                    error=f"aliases expand to more than {MAX_EXPANSION_STEPS} addresses"
                )
            local, domain, depth, path, as_is = stack.pop()
            key = (local.lower(), domain)
            targets = None if as_is else self.lookup(local, domain)
            if targets is not None and key in path:
                return Expansion(error=f"alias loop at {local}@{domain}")
            if targets is None:
                self._final(local, domain, is_local_user, recipients, unknown)
                continue
            if depth >= MAX_EXPANSION_DEPTH:
                return Expansion(error=f"aliases nest deeper than {MAX_EXPANSION_DEPTH}")
            inner = path | {key}
            for target in reversed(targets):
                t_local, t_dom = _split_parsed(target)
                t_domain = domain if t_dom is None else t_dom
                itself = (t_local.lower(), t_domain) == key
                stack.append((t_local, t_domain, depth + 1, inner, itself))
        return Expansion(tuple(recipients.values()), tuple(unknown.values()))

    def _final(
        self,
        local: str,
        domain: str,
        is_local_user: Callable[[str], bool],
        recipients: dict[tuple[str, str], str],
        unknown: dict[tuple[str, str], str],
    ) -> None:
        """Record a final recipient once (local parts of local users compare case-insensitively)."""
        is_local = domain in self.local_domains
        # RFC 5321 2.4: only the local domain may treat local parts as case-insensitive.
        key = (local.lower() if is_local else local, domain)
        address = format_address(local, domain)
        if key in recipients or key in unknown:
            return
        if not is_local or is_local_user(address):
            recipients[key] = address
        else:
            unknown[key] = address
