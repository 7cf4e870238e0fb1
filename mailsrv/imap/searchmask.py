"""
IMAP SEARCH over a whole mailbox view at once, for programs that need only
the index (flags, sizes, dates, UIDs, mod-sequences, message numbers): each
key becomes a mask (one byte, 0 or 1, per message) made from a column of the
view by C-level loops (C{bytes(map(...))}, slices for ranges, a table per
distinct flag set), and AND, OR and NOT combine masks as big integers. On
100,000 messages that takes milliseconds where evaluating the tree per
message took a second. L{mailsrv.imap.search.Matcher.mask} is the entry;
its per-message evaluation stays the reference (what a program means), and
where a key cannot be done this way the caller falls back to it.
"""

from __future__ import annotations

import bisect
import calendar
import re
from array import array
from collections.abc import Callable, Sequence
from itertools import compress
from typing import Any

from mailsrv.interfaces import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN, MessageInfo
from mailsrv.store.infos import InfoList

FLAG_KEYS = {
    "ANSWERED": (ANSWERED, True),
    "UNANSWERED": (ANSWERED, False),
    "DELETED": (DELETED, True),
    "UNDELETED": (DELETED, False),
    "DRAFT": (DRAFT, True),
    "UNDRAFT": (DRAFT, False),
    "FLAGGED": (FLAGGED, True),
    "UNFLAGGED": (FLAGGED, False),
    "SEEN": (SEEN, True),
    "UNSEEN": (SEEN, False),
}

# Internal dates from 1970-01-01 up to the end of 9999: time.gmtime's days map
# to thresholds in seconds exactly there (the index holds no others in practice).
_LAST_DATE = 253402300800.0  # 10000-01-01T00:00:00Z
_DAY = 86400
_RUN = re.compile(b"\x01+")


class NoBulk(Exception):
    """The program has a key this module cannot evaluate at once (evaluate per message)."""


class Spans:
    """
    A set of numbers as sorted, disjoint (lo, hi) spans, for C{in} (a message
    set with C{*} resolved) and for whole ranges at once.
    """

    __slots__ = ("spans", "_los")

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted((min(a, b), max(a, b)) for a, b in ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self.spans = merged
        self._los = [lo for lo, _ in merged]

    def __contains__(self, n: Any) -> bool:
        i = bisect.bisect_right(self._los, n) - 1
        return i >= 0 and bool(n <= self.spans[i][1])


def columns(infos: Sequence[MessageInfo]) -> InfoList:
    """C{infos} as columns (an L{InfoList} as it is; others copied into one)."""
    return infos if isinstance(infos, InfoList) else InfoList.of(infos)


def pick(mask: bytes, column: array | None) -> array:
    """
    The items of C{column} (sequence numbers if None) where C{mask} has a 1:
    a slice a run where the matches come in long runs (ALL, message sets,
    dates in arrival order), else one by one.
    """
    ones = mask.count(1)
    runs = mask.count(b"\x00\x01") + (mask[:1] == b"\x01")
    if runs * 8 > ones:
        return array("q", compress(range(1, len(mask) + 1) if column is None else column, mask))
    out = array("q")
    for m in _RUN.finditer(mask):
        if column is None:
            out.extend(range(m.start() + 1, m.end() + 1))
        else:
            out += column[m.start() : m.end()]
    return out


def spans_of(members: Any) -> list[tuple[int, int]]:
    """The (lo, hi) spans of a parsed message set, if it is one of the kinds known here."""
    if isinstance(members, Spans):
        return members.spans
    if isinstance(members, range) and members.step == 1:
        return [(members.start, members.stop - 1)] if len(members) else []
    raise NoBulk("message set of an unknown kind")


class Evaluation:
    """
    One program over one view: C{mask(tree)} is the int whose byte C{i}
    (little-endian) is 1 when message C{i + 1} matches. C{seq_set(raw)} and
    C{uid_set(arg)} parse a key's message set (raising as the per-message
    evaluation would; the caller checks them all first).
    """

    def __init__(
        self,
        cols: InfoList,
        recent: Any,
        now: int,
        seq_set: Callable[[Any], Any],
        uid_set: Callable[[Any], Any],
    ) -> None:
        self.cols = cols
        self.n = len(cols)
        self.ones = int.from_bytes(b"\x01" * self.n, "little")
        self.recent = recent
        self.now = now
        self.seq_set = seq_set
        self.uid_set = uid_set
        self._flag_kinds: list[frozenset[str]] | None = None
        self._dates_ok: bool | None = None

    def mask(self, t: tuple) -> int:
        k = t[0]
        if k == "and":
            out = self.ones
            for x in t[1]:
                out &= self.mask(x)
                if not out:
                    break
            return out
        if k == "or":
            a = self.mask(t[1])
            return a if a == self.ones else a | self.mask(t[2])
        if k == "not":
            return self.ones ^ self.mask(t[1])
        if k == "ALL":
            return self.ones
        if k in FLAG_KEYS:
            flag, want = FLAG_KEYS[k]
            return self._flags(lambda fs: (flag in fs) == want)
        if k == "KEYWORD":
            return self._flags(lambda fs: t[1] in fs)
        if k == "UNKEYWORD":
            return self._flags(lambda fs: t[1] not in fs)
        if k == "RECENT":
            return self._recent()
        if k == "NEW":
            return self._recent() & self._flags(lambda fs: SEEN not in fs)
        if k == "OLD":
            return self.ones ^ self._recent()
        if k == "MODSEQ":
            return self._bytes(map(t[1].__le__, self.cols.modseqs))
        if k == "LARGER":
            return self._bytes(map(t[1].__lt__, self.cols.sizes))
        if k == "SMALLER":
            return self._bytes(map(t[1].__gt__, self.cols.sizes))
        if k == "seqset":
            return self._positions(spans_of(self.seq_set(t[1])))
        if k == "UID":
            return self._uids(spans_of(self.uid_set(t[1])))
        if k == "saved":
            return self._bytes(map(t[1].__contains__, self.cols.uids))
        if k in ("OLDER", "YOUNGER"):
            self._check_dates()
            # RFC 5032, in whole seconds: int(date) <= now - t, int(date) >= now - t
            if k == "OLDER":
                return self._bytes(map(float(self.now - t[1] + 1).__gt__, self.cols.dates))
            return self._bytes(map(float(self.now - t[1]).__le__, self.cols.dates))
        if k in ("BEFORE", "ON", "SINCE"):
            return self._day(k, t[1])
        raise NoBulk(k)

    def _bytes(self, bools: Any) -> int:
        return int.from_bytes(bytes(bools), "little")

    def _flags(self, test: Callable[[frozenset[str]], bool]) -> int:
        """A flag key: decided once per distinct flag set (the index shares them)."""
        sets = self.cols.flag_sets
        if self._flag_kinds is None:
            try:
                self._flag_kinds = list(set(sets))
            except TypeError:  # unhashable flags: not from the index
                raise NoBulk("flags")
        table = {fs: test(fs) for fs in self._flag_kinds}
        return self._bytes(map(table.__getitem__, sets))

    def _recent(self) -> int:
        if not self.recent:
            return 0
        return self._bytes(map(self.recent.__contains__, self.cols.uids))

    def _positions(self, spans: list[tuple[int, int]]) -> int:
        out = bytearray(self.n)
        for lo, hi in spans:
            lo, hi = max(lo, 1), min(hi, self.n)
            if lo <= hi:
                out[lo - 1 : hi] = b"\x01" * (hi - lo + 1)
        return int.from_bytes(out, "little")

    def _uids(self, spans: list[tuple[int, int]]) -> int:
        """UIDs: the view's are ascending (RFC 3501 2.3.1.1), so each span is a run of positions."""
        uids = self.cols.uids
        runs = []
        for lo, hi in spans:
            a, b = bisect.bisect_left(uids, lo), bisect.bisect_right(uids, hi)
            if a < b:
                runs.append((a + 1, b))
        return self._positions(runs)

    def _check_dates(self) -> None:
        if self._dates_ok is None:
            dates = self.cols.dates
            self._dates_ok = not dates or (min(dates) >= 0 and max(dates) < _LAST_DATE)
        if not self._dates_ok:
            raise NoBulk("internal dates out of range")

    def _day(self, kind: str, ref: tuple[int, int, int]) -> int:
        """
        BEFORE, ON, SINCE (RFC 3501 6.4.4: the internal date's day, in UTC
        here): the first real day at or after C{ref} as a threshold in seconds.
        """
        self._check_dates()
        y, m, d = ref
        if not 1 <= m <= 12:
            raise NoBulk("month")
        exact = True
        if y < 1970:
            start = 0.0  # every date is on a later day
            exact = False
        elif y > 9999:
            start = _LAST_DATE
            exact = False
        else:
            days = calendar.monthrange(y, m)[1]
            if d < 1:
                d, exact = 1, False
            elif d > days:
                y, m, d, exact = (y, m + 1, 1, False) if m < 12 else (y + 1, 1, 1, False)
            start = _LAST_DATE if y > 9999 else float(calendar.timegm((y, m, d, 0, 0, 0)))
        dates = self.cols.dates
        if kind == "SINCE":
            return self._bytes(map(start.__le__, dates))
        if kind == "BEFORE":
            return self._bytes(map(start.__gt__, dates))
        if not exact:
            return 0
        since = self._bytes(map(start.__le__, dates))
        return since & self._bytes(map((start + _DAY).__gt__, dates))
