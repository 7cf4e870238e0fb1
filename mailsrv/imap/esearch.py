"""
The ESEARCH response (RFC 4731 3, RFC 5267 3 for ESORT): the return options
a client may ask for, and the untagged line that answers them, for SEARCH,
SORT and their UID forms; and which of the found messages SEARCHRES's SAVE
keeps (RFC 5182 2.4).
"""

from __future__ import annotations

from collections.abc import Sequence

from mailsrv.imap import mime
from mailsrv.imap.responses import uid_set

# RFC 4731 3.1: search-return-opt; the order the result items are written in.
RETURN_OPTIONS = ("MIN", "MAX", "ALL", "COUNT")
# RFC 5182 2.1: SEARCH may also ask for its result to be saved as "$".
SEARCH_RETURN_OPTIONS = (*RETURN_OPTIONS, "SAVE")


class ReturnSyntaxError(Exception):
    """The RETURN options are malformed or name an option not offered (a BAD)."""


def parse_return(
    line: bytes, offered: tuple[str, ...] = RETURN_OPTIONS
) -> tuple[frozenset[str] | None, bytes]:
    """
    An optional C{RETURN (...)} at the start of C{line}: the options asked
    for, each one of C{offered} (None without RETURN; RFC 4731 3.1: C{RETURN
    ()} means ALL) and the rest of the line.
    """
    stripped = line.lstrip(b" ")
    if stripped[:7].upper() != b"RETURN ":
        return None, line
    rest = stripped[7:].lstrip(b" ")
    if rest[:1] != b"(":
        raise ReturnSyntaxError("RETURN needs a parenthesised list")
    end = rest.find(b")")
    if end < 0:
        raise ReturnSyntaxError("Unbalanced parentheses in RETURN")
    words = [w.decode("ascii", "replace") for w in rest[1:end].upper().split()]
    unknown = [w for w in words if w not in offered]
    if unknown:
        raise ReturnSyntaxError(f"Unsupported RETURN option {unknown[0]}")
    return frozenset(words or ["ALL"]), rest[end + 1 :]


def esearch_line(
    tag: bytes,
    uid: bool,
    options: frozenset[str],
    numbers: Sequence[int],
    modseqs: Sequence[int] | None = None,
) -> bytes:
    """
    C{ESEARCH (TAG "t") [UID] MIN a MAX b ALL set COUNT n} without "* ":
    C{numbers} in the order of the answer (ascending for SEARCH, the sort
    order for SORT: MIN and MAX are then its first and last, and ALL keeps
    that order, RFC 5267 3). With no match only COUNT is given (RFC 4731 3.1).
    C{modseqs}: those of the found messages, in the same order, when the
    search had a MODSEQ key (RFC 7162 3.1.5: C{MODSEQ n} ends the line).
    """
    out = [b"ESEARCH (TAG " + mime.nstring(tag) + b")"]
    if uid:
        out.append(b"UID")
    if numbers:
        if "MIN" in options:
            out.append(b"MIN %d" % numbers[0])
        if "MAX" in options:
            out.append(b"MAX %d" % numbers[-1])
        if "ALL" in options:
            out.append(b"ALL " + uid_set(list(numbers)))
    partial = getattr(options, "partial", None)  # mailsrv.imap.context.ReturnOptions
    if partial is not None:  # RFC 5267 4.4: the range asked for, the results in it or NIL
        lo, hi = partial
        part = list(numbers[lo - 1 : hi])
        out.append(b"PARTIAL (%d:%d %s)" % (lo, hi, uid_set(part) if part else b"NIL"))
    if "COUNT" in options:
        out.append(b"COUNT %d" % len(numbers))
    top = returned_modseq(options, modseqs) if modseqs else None
    if top is not None:
        out.append(b"MODSEQ %d" % top)
    return b" ".join(out)


def returned_modseq(options: frozenset[str], modseqs: Sequence[int]) -> int | None:
    """
    RFC 7162 3.1.5: the highest mod-sequence of the messages the answer
    returns: all found with ALL or COUNT, else those MIN and MAX name (as
    Dovecot); None when it returns none.
    """
    if not modseqs:
        return None
    if options & {"ALL", "COUNT"}:
        return max(modseqs)
    picked = []
    if "MIN" in options:
        picked.append(modseqs[0])
    if "MAX" in options:
        picked.append(modseqs[-1])
    return max(picked) if picked else None


def answers(options: frozenset[str]) -> bool:
    """
    Whether a SEARCH with these RETURN options gets an ESEARCH response: not
    when SAVE is all it asks for (RFC 5182 2.1).
    """
    return bool(options - {"SAVE"})


def saved_part(options: frozenset[str], found: Sequence[int]) -> Sequence[int]:
    """
    What SAVE keeps of C{found} (ascending), RFC 5182 2.4: with MIN and/or
    MAX but neither ALL nor COUNT, only the messages they name; else all.
    """
    if not found or options & {"ALL", "COUNT"} or not options & {"MIN", "MAX"}:
        return found
    ends = []
    if "MIN" in options:
        ends.append(found[0])
    if "MAX" in options and found[-1] not in ends:
        ends.append(found[-1])
    return ends
