"""
What the octets of an IMAP URL's message part are (RFC 5092 5, RFC 4467
3.3): the message, or its ;SECTION= as FETCH BODY.PEEK[section] reads it,
cut to ;PARTIAL=offset[.length] (RFC 5550 URL-PARTIAL). L{locate} runs in
the thread pool and answers with a small section's bytes or the byte range
of the message file to stream, so a large message is never read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailsrv.imap import mime
from mailsrv.imap.fetch import FetchSyntaxError, Section, parse_fetch, section_bytes


class BadSection(ValueError):
    """The URL's ;SECTION= is not a section FETCH knows."""


@dataclass(frozen=True)
class Octets:
    """A URL's data: C{data} in memory, or C{start}..C{end} of message C{uid}'s file."""

    uid: int
    data: bytes | None = None
    start: int = 0
    end: int = 0

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.end - self.start


def section(text: str | None) -> Section:
    """The FETCH section of a URL's ;SECTION= text (RFC 5092 5: a FETCH section-spec)."""
    spec = (text or "").encode("utf-8")
    try:
        req = parse_fetch(b"BODY.PEEK[" + spec + b"]")
    except FetchSyntaxError as e:
        raise BadSection(str(e)) from None
    if len(req.sections) != 1 or req.sections[0].partial is not None:
        raise BadSection("not one section")
    return req.sections[0]


def locate(
    folder: Any, uid: int, size: int, sec: Section, partial: tuple[int, int | None] | None
) -> Octets | None:
    """
    The octets of message C{uid}'s section C{sec}, cut to C{partial}
    (offset, length or None for the rest); None if the section does not
    exist (a part number past the last). KeyError if the message is gone.
    Blocks: pool thread only.
    """
    root = None
    if sec.path:
        with folder.open_message(uid) as f:
            root = mime.scan(f)
    data, rng = section_bytes(folder, uid, size, sec, root, None)
    if data is None and rng is None:
        return None
    if partial is not None:
        off, length = partial
        if data is not None:
            data = data[off:] if length is None else data[off : off + length]
        elif rng is not None:
            start = min(rng[0] + off, rng[1])
            rng = (start, rng[1] if length is None else min(start + length, rng[1]))
    if data is not None:
        return Octets(uid, data)
    assert rng is not None
    return Octets(uid, None, rng[0], rng[1])
