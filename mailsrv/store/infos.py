"""
A compact list of L{MessageInfo}: parallel arrays (UID, size, internal date,
modseq) and a list of (shared) flag sets, 40 bytes a message instead of ~150 for a
list of objects. Items are made when asked for. Copies share the arrays until
one of them is changed (copy on write), so handing a session its own view of
a 100,000-message folder costs nothing.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from mailsrv.interfaces import MessageInfo


class InfoList(Sequence):
    """A list of L{MessageInfo} in UID order (append, item assignment, copy)."""

    __slots__ = ("uids", "sizes", "dates", "flag_sets", "modseqs", "_shared")

    def __init__(
        self,
        uids: array | None = None,
        sizes: array | None = None,
        dates: array | None = None,
        flag_sets: list | None = None,
        shared: bool = False,
        modseqs: array | None = None,
    ) -> None:
        self.uids = array("q") if uids is None else uids
        self.sizes = array("q") if sizes is None else sizes
        self.dates = array("d") if dates is None else dates
        self.flag_sets: list[frozenset[str]] = [] if flag_sets is None else flag_sets
        # RFC 7162 modseqs; all 0 if not given (a store that keeps none)
        self.modseqs = array("q", bytes(8 * len(self.uids))) if modseqs is None else modseqs
        self._shared = shared  # the arrays may be someone else's too: copy before changing

    @classmethod
    def of(cls, infos: Iterable[MessageInfo]) -> InfoList:
        out = cls()
        for info in infos:
            out.append(info)
        return out

    def __len__(self) -> int:
        return len(self.uids)

    @overload
    def __getitem__(self, i: int) -> MessageInfo: ...

    @overload
    def __getitem__(self, i: slice) -> InfoList: ...

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return InfoList(
                self.uids[i],
                self.sizes[i],
                self.dates[i],
                self.flag_sets[i],
                modseqs=self.modseqs[i],
            )
        return MessageInfo(
            self.uids[i], self.sizes[i], self.flag_sets[i], self.dates[i], self.modseqs[i]
        )

    def __iter__(self) -> Iterator[MessageInfo]:
        return map(MessageInfo, self.uids, self.sizes, self.flag_sets, self.dates, self.modseqs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, InfoList):
            return (
                self.uids == other.uids
                and self.sizes == other.sizes
                and self.dates == other.dates
                and self.flag_sets == other.flag_sets
                and self.modseqs == other.modseqs
            )
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"InfoList({list(self)!r})"

    def _own(self) -> None:
        if self._shared:
            self.uids = array("q", self.uids)
            self.sizes = array("q", self.sizes)
            self.dates = array("d", self.dates)
            self.flag_sets = list(self.flag_sets)
            self.modseqs = array("q", self.modseqs)
            self._shared = False

    def copy(self) -> InfoList:
        """Another list with the same items (shares storage until either changes)."""
        self._shared = True
        return InfoList(
            self.uids, self.sizes, self.dates, self.flag_sets, shared=True, modseqs=self.modseqs
        )

    def append(self, info: MessageInfo) -> None:
        self._own()
        self.uids.append(info.uid)
        self.sizes.append(info.size)
        self.dates.append(info.internal_date)
        self.flag_sets.append(info.flags)
        self.modseqs.append(info.modseq)

    def __setitem__(self, i: int, info: MessageInfo) -> None:
        self._own()
        self.uids[i] = info.uid
        self.sizes[i] = info.size
        self.dates[i] = info.internal_date
        self.flag_sets[i] = info.flags
        self.modseqs[i] = info.modseq

    def set_flags(self, i: int, flags: frozenset[str], modseq: int | None = None) -> None:
        """Give message C{i} C{flags} (and C{modseq}, if given)."""
        self._own()
        self.flag_sets[i] = flags
        if modseq is not None:
            self.modseqs[i] = modseq


def flag_sets(infos: Sequence[MessageInfo]) -> Sequence[frozenset[str]]:
    """The flags of each message of C{infos}, without making L{MessageInfo}s if it is an InfoList."""
    if isinstance(infos, InfoList):
        return infos.flag_sets
    return [i.flags for i in infos]


def uids_of(infos: Sequence[MessageInfo]) -> Sequence[int]:
    """The UIDs of C{infos} (an array shared with an InfoList: do not change it)."""
    if isinstance(infos, InfoList):
        return infos.uids
    return [i.uid for i in infos]
