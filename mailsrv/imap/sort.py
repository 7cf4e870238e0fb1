"""
SORT (RFC 5256 3, RFC 5957 3): the sort program parsed from the command and
the messages put in its order. Equal messages keep their mailbox order
(RFC 5256 3: "sorted according to the order in which they appear in the
mailbox"), REVERSE included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from mailsrv.imap.search import SearchError
from mailsrv.imap.sortfields import MessageKeys


class Entry(NamedTuple):
    """One message to sort or thread: sequence number, UID, size, INTERNALDATE, header keys."""

    seq: int
    uid: int
    size: int
    internal_date: float
    keys: MessageKeys


def sent_date(e: Entry) -> float:
    """RFC 5256 2.2: the sent date; the INTERNALDATE when the Date field is missing or invalid."""
    sent = e.keys.sent
    return e.internal_date if sent is None else sent


# RFC 5256 3 (ARRIVAL ... TO) and RFC 5957 3 (DISPLAYFROM, DISPLAYTO).
SORT_KEYS: dict[str, Callable[[Entry], Any]] = {
    "ARRIVAL": lambda e: e.internal_date,
    "CC": lambda e: e.keys.cc_mailbox,
    "DATE": sent_date,
    "FROM": lambda e: e.keys.from_mailbox,
    "SIZE": lambda e: e.size,
    "SUBJECT": lambda e: e.keys.subject,
    "TO": lambda e: e.keys.to_mailbox,
    "DISPLAYFROM": lambda e: e.keys.from_display,
    "DISPLAYTO": lambda e: e.keys.to_display,
}

# The keys that need nothing from the header (the index has them).
INDEX_KEYS = frozenset({"ARRIVAL", "SIZE"})

Program = list[tuple[str, bool]]


def parse_program(line: bytes) -> tuple[Program, bytes]:
    """
    A parenthesised sort program at the start of C{line}: [(key, reverse)],
    and the rest of the line. RFC 5256 4: sort-criteria = "(" sort-criterion
    *(SP sort-criterion) ")"; sort-criterion = ["REVERSE" SP] sort-key.
    """
    line = line.lstrip(b" ")
    if line[:1] != b"(":
        raise SearchError("Missing sort criteria")
    end = line.find(b")")
    if end < 0:
        raise SearchError("Unbalanced parentheses in sort criteria")
    words = line[1:end].upper().split()
    program: Program = []
    reverse = False
    for w in words:
        name = w.decode("ascii", "replace")
        if name == "REVERSE" and not reverse:
            reverse = True
            continue
        if name not in SORT_KEYS:
            raise SearchError(f"Unknown sort key {name}")
        program.append((name, reverse))
        reverse = False
    if reverse or not program:
        raise SearchError("Incomplete sort criteria")
    return program, line[end + 1 :].lstrip(b" ")


def needs_headers(program: Program) -> bool:
    """Whether the program compares anything the header holds."""
    return any(name not in INDEX_KEYS for name, _ in program)


def sort_entries(program: Program, entries: Sequence[Entry]) -> list[Entry]:
    """The entries (given in mailbox order) in the program's order; ties keep mailbox order."""
    out = list(entries)
    # Stable sorts from the last key to the first: a later key breaks an earlier one's ties.
    for name, reverse in reversed(program):
        out.sort(key=SORT_KEYS[name], reverse=reverse)
    return out
