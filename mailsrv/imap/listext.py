"""
LIST-EXTENDED (RFC 5258) with SPECIAL-USE selection (RFC 6154) and
LIST-STATUS (RFC 5819): the command's extended syntax, read into a
L{ListRequest}, and the choice of names and attributes it answers with.

Where the RFCs leave a choice, the answers are Dovecot's: in the extended
form, children (\\HasChildren, \\HasNoChildren) and special-use attributes
only when asked for; \\Subscribed first among the attributes; STATUS items
in a fixed order; CHILDINFO (its tag an atom) on every listed name with a subscribed
descendant; an unknown option, STATUS item or RECURSIVEMATCH alone a BAD.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4

from mailsrv.imap.account import list_entries
from mailsrv.imap.listmatch import ListPattern
from mailsrv.imap.parsing import utf8_name
from mailsrv.store.names import DELIMITER

SUBSCRIBED = "SUBSCRIBED"
REMOTE = "REMOTE"
RECURSIVEMATCH = "RECURSIVEMATCH"
SPECIAL_USE = "SPECIAL-USE"
CHILDREN = "CHILDREN"
STATUS = "STATUS"

# RFC 5258 3, RFC 6154 3.
SELECTION_OPTIONS = frozenset({SUBSCRIBED, REMOTE, RECURSIVEMATCH, SPECIAL_USE})
# RFC 5258 3, RFC 6154 3, RFC 5819 2.
RETURN_OPTIONS = frozenset({SUBSCRIBED, CHILDREN, SPECIAL_USE, STATUS})
# The STATUS items (RFC 3501 6.3.10), in the order the answer gives them.
# RFC 3501 6.3.10, RFC 7162 3.1.6, RFC 9051 6.3.11 (DELETED, SIZE)
STATUS_ITEMS = (
    "MESSAGES",
    "RECENT",
    "UIDNEXT",
    "UIDVALIDITY",
    "UNSEEN",
    "HIGHESTMODSEQ",
    "DELETED",
    "SIZE",
)

_CHILD_FLAGS = frozenset({"\\HasChildren", "\\HasNoChildren"})
_NOT_SELECTABLE = frozenset({"\\Noselect", "\\NonExistent"})


@dataclass(frozen=True)
class ListRequest:
    """
    A LIST command's arguments: the reference, the patterns (raw, modified
    UTF-7), and, for the extended form (C{extended}), its options.
    """

    ref: bytes
    patterns: tuple[bytes, ...]
    extended: bool = False
    selection: frozenset[str] = frozenset()
    returns: frozenset[str] = frozenset()
    status: tuple[str, ...] = ()

    @property
    def want_subscribed(self) -> bool:
        """Whether \\Subscribed is shown (RFC 5258 3: SUBSCRIBED selection implies the return option)."""
        return SUBSCRIBED in self.selection or SUBSCRIBED in self.returns

    @property
    def want_special_use(self) -> bool:
        """Whether special-use attributes are shown (RFC 6154 3: the selection option implies it)."""
        return not self.extended or SPECIAL_USE in self.selection or SPECIAL_USE in self.returns

    @property
    def want_children(self) -> bool:
        """Whether \\HasChildren and \\HasNoChildren are shown (RFC 5258 4)."""
        return not self.extended or CHILDREN in self.returns


@dataclass(frozen=True)
class ListEntry:
    """One name to answer with: its attributes and whether it carries CHILDINFO."""

    name: str
    flags: tuple[str, ...]
    childinfo: tuple[str, ...] = ()

    @property
    def selectable(self) -> bool:
        return not _NOT_SELECTABLE.intersection(self.flags)


def _bad(text: str) -> imap4.IllegalClientResponse:
    return imap4.IllegalClientResponse(text)


def _paren_atoms(line: bytes, what: str) -> tuple[list[str], bytes]:
    """C{(A B C) rest} -> (["A", "B", "C"], rest); atoms only, upper-cased."""
    end = line.find(b")")
    if not line.startswith(b"(") or end < 0:
        raise _bad("Missing ')'")
    inner = line[1:end]
    if b"(" in inner or b'"' in inner or b"{" in inner:
        raise _bad(f"{what} must be atoms")
    try:
        atoms = [a.decode("ascii").upper() for a in inner.split()]
    except UnicodeDecodeError:
        raise _bad(f"{what} must be atoms") from None
    return atoms, line[end + 1 :]


def parse_selection(line: bytes) -> tuple[frozenset[str] | None, bytes]:
    """The selection options at the start of C{line} (None if there are none) and the rest."""
    if not line.startswith(b"("):
        return None, line
    atoms, rest = _paren_atoms(line, "Selection options")
    options = frozenset(atoms)
    unknown = options - SELECTION_OPTIONS
    if unknown:
        # RFC 5258 3: an option the server does not know is a BAD.
        raise _bad("Unknown selection option " + sorted(unknown)[0])
    if RECURSIVEMATCH in options and not options - {RECURSIVEMATCH, REMOTE}:
        # RFC 5258 3: RECURSIVEMATCH modifies another selection option.
        raise _bad("RECURSIVEMATCH must not be the only selection option")
    if rest and not rest.startswith(b" "):
        raise _bad("Missing space after selection options")
    return options, rest[1:]


def parse_return(line: bytes) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """
    The return options (RFC 5258 3) of C{line}, what follows the patterns:
    (options, STATUS items), or None if there are none. A second STATUS
    replaces the first, as in Dovecot.
    """
    line = line.strip(b" ")
    if not line:
        return None
    keyword, _, rest = line.partition(b" ")
    if keyword.upper() != b"RETURN" or not rest.startswith(b"("):
        raise _bad("Extra arguments")
    body = rest[1:]
    options: set[str] = set()
    status: tuple[str, ...] = ()
    while True:
        body = body.lstrip(b" ")
        if body.startswith(b")"):
            body = body[1:]
            break
        if not body:
            raise _bad("Missing ')'")
        word = body.split(b" ", 1)[0].split(b")", 1)[0].split(b"(", 1)[0]
        if not word:
            raise _bad("Return options must be atoms")
        body = body[len(word) :]
        name = word.decode("ascii", "replace").upper()
        if name not in RETURN_OPTIONS:
            raise _bad("Unknown return option " + name)
        options.add(name)
        if name == STATUS:
            items, body = _paren_atoms(body.lstrip(b" "), "STATUS items")
            if not items:
                raise _bad("Empty STATUS item list")
            unknown = [i for i in items if i not in STATUS_ITEMS]
            if unknown:
                raise _bad("Unknown STATUS item " + unknown[0])
            status = tuple(i for i in STATUS_ITEMS if i in items)
    if body.strip(b" "):
        raise _bad("Extra arguments")
    return frozenset(options), status


def _list_string(line: bytes) -> tuple[bytes, bytes]:
    """One quoted string or list-mailbox atom at the start of C{line}, in a pattern list."""
    if line.startswith(b'"'):
        buf = bytearray()
        i = 1
        while i < len(line) and line[i : i + 1] != b'"':
            if line[i : i + 1] == b"\\":
                i += 1
            buf += line[i : i + 1]
            i += 1
        if i >= len(line):
            raise _bad("Unmatched quotes")
        return bytes(buf), line[i + 1 :]
    end = len(line)
    for stop in (b" ", b")"):
        j = line.find(stop)
        if 0 <= j < end:
            end = j
    atom = line[:end]
    if not atom or any(c in b'"({' or c < 0x20 or c == 0x7F for c in atom):
        raise _bad("Bad mailbox pattern")
    return atom, line[end:]


@defer.inlineCallbacks
def arg_list(proto: Any, line: bytes | None) -> Any:
    """
    The argument parser of LIST (RFC 5258 6): fires with (L{ListRequest}, b"").
    The reference and each pattern may be literals, read through the session's
    own string parser (C{arg_astring}).
    """
    line = (line or b"").lstrip(b" ")
    selection, line = parse_selection(line)
    ref, line = yield defer.maybeDeferred(proto.arg_astring, line)
    line = (line or b"").lstrip(b" ")
    patterns: list[bytes] = []
    multi = line.startswith(b"(")
    if multi:
        line = line[1:]
        while True:
            line = line.lstrip(b" ")
            if line.startswith(b")"):
                line = line[1:]
                break
            if not line:
                raise _bad("Missing ')'")
            if line.startswith(b"{"):
                pattern, line = yield defer.maybeDeferred(proto.arg_astring, line)
                line = line or b""
            else:
                pattern, line = _list_string(line)
                if getattr(proto, "utf8_names", False):
                    pattern, line = utf8_name((pattern, line))  # RFC 6855 3, as arg_astring
            patterns.append(pattern)
            if line and not line.startswith((b" ", b")")):
                raise _bad("Garbage after pattern")
    else:
        pattern, line = yield defer.maybeDeferred(proto.arg_astring, line)
        patterns.append(pattern)
    returned = parse_return(line or b"")
    extended = selection is not None or returned is not None or multi
    options, status = returned or (frozenset(), ())
    request = ListRequest(
        ref=ref,
        patterns=tuple(patterns),
        extended=extended,
        selection=selection or frozenset(),
        returns=options,
        status=status,
    )
    return request, b""


def _ancestors(name: str) -> Iterable[str]:
    i = name.find(DELIMITER)
    while i >= 0:
        yield name[:i]
        i = name.find(DELIMITER, i + 1)


def select_entries(
    request: ListRequest,
    patterns: Sequence[ListPattern],
    folders: Sequence[tuple[str, bool]],
    subscribed: set[str],
    special: dict[str, str],
    nested: bool = True,
) -> list[ListEntry]:
    """
    The answer to an extended LIST (RFC 5258 3), in name order: the folders
    (name, selectable) or, with the SUBSCRIBED selection option, the
    C{subscribed} names (those that do not exist are \\NonExistent), that
    match one of the C{patterns} and, with SPECIAL-USE, have a special use.
    With RECURSIVEMATCH, a name that does not meet the selection criteria
    is listed too when it has a descendant that does but matches no pattern
    (RFC 5258 3.5), and every listed name with a subscribed descendant
    carries CHILDINFO ("SUBSCRIBED"). Runs in the thread pool.
    """
    attrs = {
        name: info.getFlags()
        for name, info in list_entries(folders, ListPattern("*"), special, nested)
    }
    parents: set[str] = set()
    for name in attrs:
        parents.update(_ancestors(name))

    def matches(name: str) -> bool:
        return any(p.match(name) for p in patterns)

    by_subscription = SUBSCRIBED in request.selection
    by_use = SPECIAL_USE in request.selection
    universe = set(attrs) | subscribed if by_subscription else set(attrs)

    def meets(name: str) -> bool:
        if by_subscription and name not in subscribed:
            return False
        return not by_use or name in special

    listed = {n for n in universe if meets(n) and matches(n)}
    with_childinfo: set[str] = set()
    if RECURSIVEMATCH in request.selection and by_subscription:
        for name in universe:
            if not meets(name):
                continue
            hidden = not matches(name)
            for up in _ancestors(name):
                with_childinfo.add(up)
                if hidden and matches(up):
                    listed.add(up)
    out = []
    for name in sorted(listed):
        flags = ["\\Subscribed"] if request.want_subscribed and name in subscribed else []
        if name in attrs:
            own = attrs[name]
        else:
            own = ["\\NonExistent", "\\HasChildren" if name in parents else "\\HasNoChildren"]
        for f in own:
            if f in _CHILD_FLAGS and not request.want_children:
                continue
            if f == special.get(name) and not request.want_special_use:
                continue
            flags.append(f)
        info = (SUBSCRIBED,) if name in with_childinfo else ()
        out.append(ListEntry(name, tuple(flags), info))
    return out


def childinfo_data(entry: ListEntry) -> bytes:
    """The mbox-list-extended part of a LIST line (RFC 5258 6), with its leading space."""
    if not entry.childinfo:
        return b""
    # The tag as an atom, as Dovecot writes it (RFC 5258 6: an astring).
    items = b" ".join(b'"%s"' % i.encode("ascii") for i in entry.childinfo)
    return b" (CHILDINFO (" + items + b"))"


def status_items(request: ListRequest, st: dict[str, int]) -> bytes:
    """C{MESSAGES 3 UNSEEN 1}: the STATUS items asked for, from L{IMailStore.folder_status}."""
    values = {
        "MESSAGES": st["messages"],
        "RECENT": st["recent"],
        "UIDNEXT": st["uid_next"],
        "UIDVALIDITY": st["uid_validity"],
        "UNSEEN": st["unseen"],
        "HIGHESTMODSEQ": st["highest_modseq"],  # RFC 7162 3.1.6
        "DELETED": st["deleted"],  # RFC 9051 6.3.11
        "SIZE": st["size"],  # RFC 9051 6.3.11, RFC 8438
    }
    return b" ".join(b"%s %d" % (n.encode("ascii"), values[n]) for n in request.status)
