"""
SORT (RFC 5256 3, RFC 5957 3): the sort program parsed from the command and
the messages put in its order. Equal messages keep their mailbox order
(RFC 5256 3: "sorted according to the order in which they appear in the
mailbox"), REVERSE included.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
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
SORT_KEYS = frozenset(
    {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
)

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


class Matches:
    """
    The messages a command matched, as columns in mailbox order: sequence
    numbers, UIDs, sizes, INTERNALDATEs and header keys (None when the sort
    program needs none). Sorting reorders positions in these columns, with C
    key functions, not objects per message.
    """

    __slots__ = ("seqs", "uids", "sizes", "dates", "keys")

    def __init__(
        self,
        seqs: Sequence[int],
        uids: Sequence[int],
        sizes: Sequence[int],
        dates: Sequence[float],
        keys: Sequence[MessageKeys] | None,
    ) -> None:
        self.seqs = seqs
        self.uids = uids
        self.sizes = sizes
        self.dates = dates
        self.keys = keys

    def __len__(self) -> int:
        return len(self.seqs)

    def column(self, name: str) -> Sequence[Any]:
        """The values of sort key C{name}, one per message."""
        if name == "ARRIVAL":
            return self.dates
        if name == "SIZE":
            return self.sizes
        assert self.keys is not None
        if name == "DATE":  # RFC 5256 2.2: the INTERNALDATE when the Date is not valid
            return [
                d if k.sent is None else k.sent for k, d in zip(self.keys, self.dates, strict=True)
            ]
        return list(map(attrgetter(_KEY_FIELDS[name]), self.keys))

    def entries(self) -> list[Entry]:
        """An L{Entry} per message (for THREAD)."""
        assert self.keys is not None
        return list(map(Entry, self.seqs, self.uids, self.sizes, self.dates, self.keys))


_KEY_FIELDS = {
    "CC": "cc_mailbox",
    "FROM": "from_mailbox",
    "SUBJECT": "subject",
    "TO": "to_mailbox",
    "DISPLAYFROM": "from_display",
    "DISPLAYTO": "to_display",
}


def sort_positions(program: Program, matches: Matches) -> list[int]:
    """The positions of C{matches} in the program's order; ties keep mailbox order."""
    order = list(range(len(matches)))
    # Stable sorts from the last key to the first: a later key breaks an earlier one's ties.
    for name, reverse in reversed(program):
        order.sort(key=matches.column(name).__getitem__, reverse=reverse)
    return order


def sort_entries(program: Program, entries: Sequence[Entry]) -> list[Entry]:
    """The entries (given in mailbox order) in the program's order; ties keep mailbox order."""
    matches = Matches(
        [e.seq for e in entries],
        [e.uid for e in entries],
        [e.size for e in entries],
        [e.internal_date for e in entries],
        [e.keys for e in entries],
    )
    return [entries[i] for i in sort_positions(program, matches)]
