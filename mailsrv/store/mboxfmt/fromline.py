"""
The ``From `` separator line of an mbox message: writing one (envelope
sender and asctime date, UTC) and reading its date back, fast, for the scanner.
"""

from __future__ import annotations

import calendar
import re
import time

_ASCTIME = re.compile(
    rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) +(\d{1,2}) +(\d{1,2}):(\d\d)(?::(\d\d))? +(?:[A-Z]{3,4} +)?(\d{4})"
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        (
            b"Jan",
            b"Feb",
            b"Mar",
            b"Apr",
            b"May",
            b"Jun",
            b"Jul",
            b"Aug",
            b"Sep",
            b"Oct",
            b"Nov",
            b"Dec",
        ),
        1,
    )
}
_SENDER_BAD = re.compile(r"[\s\x00-\x1f\x7f]")


def from_line(sender: str, when: float) -> bytes:
    """The ``From `` separator line for a message: envelope sender and asctime date (UTC)."""
    sender = _SENDER_BAD.sub("_", sender or "") or "MAILER-DAEMON"
    date = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(when))
    return f"From {sender} {date}\n".encode("utf-8", "surrogateescape")


_DAY_CACHE: dict[bytes, int] = {}
_HM_CACHE: dict[bytes, int] = {}


def parse_from_date(line: bytes) -> float:
    """The date of a ``From `` line (asctime, taken as UTC); 0.0 if there is none."""
    # Fast path: "... Www Mmm dd hh:mm:ss yyyy\n", the usual layout.
    t = line[-25:-1]
    if len(t) == 24 and t[13] == 0x3A and t[16] == 0x3A and t[19] == 0x20:
        day = t[4:10] + t[20:24]
        hm = t[11:16]
        base = _DAY_CACHE.get(day)
        sec = _HM_CACHE.get(hm)
        try:
            if base is None:
                base = calendar.timegm(
                    (int(t[20:24]), _MONTHS[t[4:7]], int(t[8:10]), 0, 0, 0, 0, 0, 0)
                )
                if len(_DAY_CACHE) > 10000:
                    _DAY_CACHE.clear()
                _DAY_CACHE[day] = base
            if sec is None:
                sec = _HM_CACHE[hm] = int(t[11:13]) * 3600 + int(t[14:16]) * 60
            return float(base + sec + int(t[17:19]))
        except (KeyError, ValueError, OverflowError):
            pass
    m = _ASCTIME.search(line)
    if m is None:
        return 0.0
    mon, day_s, hh, mm, ss, year = m.groups()
    try:
        return float(
            calendar.timegm(
                (int(year), _MONTHS[mon], int(day_s), int(hh), int(mm), int(ss or 0), 0, 0, 0)
            )
        )
    except (ValueError, OverflowError):
        return 0.0
