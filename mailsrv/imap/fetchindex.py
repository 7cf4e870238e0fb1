"""
FETCH responses (RFC 3501 7.4.2) of the items the index holds: UID, FLAGS,
RFC822.SIZE, INTERNALDATE and MODSEQ (RFC 7162 3.1.4.1). This is what a
full flag synchronisation asks for (C{UID FETCH 1:* (FLAGS)}, mbsync's and
offlineimap's C{(UID FLAGS INTERNALDATE RFC822.SIZE)}), so it is formatted a
batch of messages at a time straight from the index's columns: one
%-template per request, each distinct flag set's list formatted once, each
day's date once. The lines are byte for byte those of
L{mailsrv.imap.fetchitems.simple_response}.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from itertools import chain
from typing import Any

from mailsrv.imap.account import RECENT
from mailsrv.imap.fetch import internal_date
from mailsrv.imap.responses import flag_list
from mailsrv.store.infos import InfoList

# Each item's field, in the template; the message's value goes into the %.
_FIELDS = {
    "UID": b"UID %d",
    "FLAGS": b"FLAGS %s",
    "RFC822.SIZE": b"RFC822.SIZE %d",
    "INTERNALDATE": b"INTERNALDATE %s",
    "MODSEQ": b"MODSEQ (%d)",
}
# The InfoList column and the MessageInfo attribute each item is made from.
_COLUMNS = {
    "UID": ("uids", "uid"),
    "FLAGS": ("flag_sets", "flags"),
    "RFC822.SIZE": ("sizes", "size"),
    "INTERNALDATE": ("dates", "internal_date"),
    "MODSEQ": ("modseqs", "modseq"),
}
INDEX_ITEMS = frozenset(_FIELDS)

_DAY = 86400
# Dates from 1970 to 9999 are formatted from the day's cached start; any
# other goes through L{internal_date} as it is.
_LAST = 253402300800.0


class FlagTexts(dict):
    """
    A flag set -> its flag list as FLAGS shows it (the flags sorted, then
    C{\\Recent} for a message recent to the session, as
    L{mailsrv.imap.account.SessionMailbox.flags_of}), formatted on first use.
    """

    def __init__(self, recent: bool) -> None:
        super().__init__()
        self.recent = recent

    def __missing__(self, flags: frozenset[str]) -> bytes:
        names = sorted(flags)
        if self.recent:
            names.append(RECENT)
        text = self[flags] = flag_list(names)
        return text


# A time of day's "HH:MM:" and "SS +0000" (with the closing quote): INTERNALDATE's tail.
_HOURS_MINUTES = tuple(b"%02d:%02d:" % divmod(m, 60) for m in range(1440))
_SECONDS = tuple(b'%02d +0000"' % s for s in range(60))


class DateTexts:
    """INTERNALDATE values as L{mailsrv.imap.fetch.internal_date} writes them, a day's start cached."""

    def __init__(self) -> None:
        self._days: dict[int, bytes] = {}

    def text(self, ts: float) -> bytes:
        return self.texts([ts])[0]

    def texts(self, values: Sequence[float]) -> list[bytes]:
        """The texts of C{values} (seconds since the epoch), in order."""
        days = self._days
        out: list[bytes] = []
        add = out.append
        for ts in values:
            if not 0.0 <= ts < _LAST:
                add(internal_date(ts))
                continue
            day, rest = divmod(int(ts), _DAY)  # as time.gmtime rounds (down: ts >= 0)
            head = days.get(day)
            if head is None:
                head = days[day] = internal_date(day * _DAY)[:13]  # '"17-Jul-1996 '
            add(head + _HOURS_MINUTES[rest // 60] + _SECONDS[rest % 60])
        return out


class IndexFetch:
    """The FETCH responses of one request whose items are all in L{INDEX_ITEMS}."""

    def __init__(self, items: Sequence[str]) -> None:
        self._items = list(items)
        self._template = b"* %d FETCH (" + b" ".join(_FIELDS[i] for i in items) + b")\r\n"
        self._flags = FlagTexts(False)
        self._recent_flags = FlagTexts(True)
        self._dates = DateTexts()
        self._repeated: dict[int, bytes] = {}

    def lines(self, infos: Sequence[Any], seqs: Sequence[int], recent: AbstractSet[int]) -> bytes:
        """
        The responses of the messages C{seqs} (ascending sequence numbers) of
        C{infos} (the session's view), C{recent} the UIDs recent to it.
        """
        columns = [self._column(item, infos, seqs, recent) for item in self._items]
        # One % for the whole batch: the template repeated once per message.
        template = self._repeated.get(len(seqs))
        if template is None:
            template = self._repeated[len(seqs)] = self._template * len(seqs)
        return template % tuple(chain.from_iterable(zip(seqs, *columns, strict=True)))

    def _column(
        self, item: str, infos: Sequence[Any], seqs: Sequence[int], recent: AbstractSet[int]
    ) -> Sequence[Any]:
        values = _values(infos, seqs, *_COLUMNS[item])
        if item == "FLAGS":
            plain = self._flags
            if not recent:
                return list(map(plain.__getitem__, values))
            marked = self._recent_flags
            uids = _values(infos, seqs, *_COLUMNS["UID"])
            return [
                marked[f] if u in recent else plain[f] for u, f in zip(uids, values, strict=True)
            ]
        if item == "INTERNALDATE":
            return self._dates.texts(values)
        return values


def _values(infos: Sequence[Any], seqs: Sequence[int], column: str, attr: str) -> Sequence[Any]:
    """One column of the index for the messages C{seqs}, without making a MessageInfo for each."""
    if isinstance(infos, InfoList):
        col = getattr(infos, column)
        if isinstance(seqs, range) and seqs.step == 1:
            return col[seqs.start - 1 : seqs.stop - 1]
        return [col[s - 1] for s in seqs]
    return [getattr(infos[s - 1], attr) for s in seqs]
