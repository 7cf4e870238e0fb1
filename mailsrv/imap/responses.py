"""
How IMAP responses are written (RFC 3501 7 and 9): flag lists, mailbox
names, LIST/LSUB lines, literals, EXPUNGE lines, SEARCH number lists and
UIDPLUS uid-sets. Pure functions of what they are given; the FETCH item
formatters are in L{mailsrv.imap.fetchitems}.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from mailsrv.imap import mime
from mailsrv.imap.imapstring import utf8_astring


def flag_list(flags: Iterable[str]) -> bytes:
    """A parenthesized flag list: C{(\\Seen $Label)}."""
    return b"(" + b" ".join(f.encode("utf-8", "replace") for f in flags) + b")"


def encode_name(name: str, utf8: bool = False) -> bytes:
    """
    A mailbox name as an astring: in modified UTF-7 (RFC 3501 5.1.3), or
    with C{utf8} (a session that enabled UTF8=ACCEPT, RFC 6855 3) in UTF-8.
    """
    if utf8:
        return utf8_astring(name)
    return mime.astring(name.encode("imap4-utf-7"))


def literal(label: bytes, data: bytes) -> bytes:
    """C{label {n}CRLF} followed by the C{n} octets (RFC 3501 4.3)."""
    return label + b" {%d}\r\n" % len(data) + data


def literal_head(label: bytes, size: int) -> bytes:
    """C{label {size}CRLF}: the start of a literal whose octets are streamed after it."""
    return label + b" {%d}\r\n" % size


def list_lines(
    cmd: bytes,
    boxes: Iterable[tuple[str, Any]],
    subscribed: set[str] | None,
    encode: Callable[[str], bytes] = encode_name,
) -> Iterator[bytes]:
    """
    The untagged LIST (or, given the subscriptions, LSUB) responses, without
    "* ", with the names spelled by C{encode} (the session's C{encode_name}).
    """
    for name, info in boxes:
        flags = info.getFlags()
        if subscribed is not None:
            if name not in subscribed:
                continue
            flags = [f for f in flags if f == "\\Noselect"]
        yield cmd + b" " + flag_list(flags) + b' "/" ' + encode(name)


def expunge_lines(uids: Sequence[int], removed: Iterable[int]) -> bytes:
    """
    The C{* n EXPUNGE} lines (RFC 3501 7.4.1) for the UIDs C{removed}, in that
    order, from a session that had shown the messages C{uids} (ascending):
    each line's number counts the removals announced before it.
    """
    uids = list(uids)
    lines = []
    for uid in removed:
        i = bisect.bisect_left(uids, uid)
        if i < len(uids) and uids[i] == uid:
            lines.append(b"* %d EXPUNGE\r\n" % (i + 1))
            del uids[i]
    return b"".join(lines)


def number_list(numbers: Sequence[int], piece: int = 4096) -> bytes:
    """C{b" 1 2 3"}: formatted a piece at a time (a 100k-hit SEARCH makes no 100k-item list)."""
    return b"".join(
        b"".join(b" %d" % n for n in numbers[i : i + piece]) for i in range(0, len(numbers), piece)
    )


def uid_set(uids: list[int]) -> bytes:
    """Compress UIDs (in the order given) into an RFC 4315 uid-set, keeping order."""
    runs: list[list[int]] = []
    for u in uids:
        if runs and u == runs[-1][1] + 1:
            runs[-1][1] = u
        else:
            runs.append([u, u])
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in runs)
