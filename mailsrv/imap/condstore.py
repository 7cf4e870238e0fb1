"""
CONDSTORE and QRESYNC (RFC 7162), the protocol side: the modifiers of
FETCH, STORE and SELECT/EXAMINE parsed, the session turned to "CONDSTORE
enabled" by the first command that uses it (RFC 7162 3.1), the untagged
responses that carry mod-sequences (FETCH with MODSEQ, HIGHESTMODSEQ,
VANISHED), and the QRESYNC resynchronisation of SELECT (RFC 7162 3.2.5):
from the store's changed_since/vanished_since, in work proportional to the
changes, or from the client's known UIDs when the expunge history is too
short.

The store keeps the mod-sequences (L{mailsrv.interfaces.IFolder}); every
folder has them, so NOMODSEQ is never sent.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.mail import imap4

if TYPE_CHECKING:  # parsing imports commands.base, which imports this module
    from mailsrv.imap.parsing import SeqSet

CAPABILITIES = [b"CONDSTORE", b"QRESYNC"]
CONDSTORE = b"CONDSTORE"
QRESYNC = b"QRESYNC"

# RFC 7162 7: mod-sequence-value = 1*DIGIT, at most 2^63-1.
MAX_MODSEQ = (1 << 63) - 1
_NUMBER = re.compile(rb"\d{1,19}")


def modseq_value(raw: bytes, zero: bool = True) -> int:
    """A mod-sequence-value (C{zero}: mod-sequence-valzer); BAD if it is not one."""
    if not _NUMBER.fullmatch(raw) or int(raw) > MAX_MODSEQ or (not zero and int(raw) == 0):
        raise imap4.IllegalClientResponse("Invalid mod-sequence value")
    return int(raw)


def _paren_group(line: bytes) -> tuple[bytes, bytes]:
    """The inside of the parenthesised group at the start of C{line} and what follows it."""
    depth = 0
    for i, c in enumerate(line):
        if c == 0x28:  # (
            depth += 1
        elif c == 0x29:  # )
            depth -= 1
            if depth == 0:
                return line[1:i], line[i + 1 :]
    raise imap4.IllegalClientResponse("Unbalanced parentheses")


# --- FETCH (RFC 7162 3.1.4, 3.2.6) ---------------------------------------------


def split_fetch_modifiers(line: bytes) -> tuple[bytes, bytes | None]:
    """
    A FETCH's attribute list and its parenthesised modifier list after it
    (None without one): C{(FLAGS) (CHANGEDSINCE 5)}, C{FLAGS (CHANGEDSINCE 5)}.
    """
    s = line.strip()
    if not s.endswith(b")"):
        return s, None
    if s[:1] == b"(":
        depth = 0
        end = len(s)
        for i, c in enumerate(s):
            if c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
    else:
        brackets = 0
        end = len(s)
        for i, c in enumerate(s):
            if c == 0x5B:  # [
                brackets += 1
            elif c == 0x5D:
                brackets -= 1
            elif c == 0x20 and brackets == 0:
                end = i
                break
    rest = s[end:].strip()
    return s[:end], rest or None


@dataclass(frozen=True)
class FetchModifiers:
    """What a FETCH's modifiers ask for: CHANGEDSINCE (RFC 7162 3.1.4), VANISHED (3.2.6)."""

    changed_since: int | None = None
    vanished: bool = False


def parse_fetch_modifiers(text: bytes) -> FetchModifiers:
    """C{(CHANGEDSINCE n [VANISHED])}; L{imap4.IllegalClientResponse} for anything else."""
    if text[:1] != b"(" or text[-1:] != b")":
        raise imap4.IllegalClientResponse("Bad FETCH modifier list")
    words = text[1:-1].split()
    changed_since: int | None = None
    vanished = False
    i = 0
    while i < len(words):
        word = words[i].upper()
        if word == b"CHANGEDSINCE" and changed_since is None and i + 1 < len(words):
            changed_since = modseq_value(words[i + 1])
            i += 2
        elif word == b"VANISHED" and not vanished:
            vanished = True
            i += 1
        else:
            raise imap4.IllegalClientResponse("Unknown FETCH modifier")
    if vanished and changed_since is None:
        # RFC 7162 3.2.6: VANISHED only with CHANGEDSINCE
        raise imap4.IllegalClientResponse("VANISHED needs CHANGEDSINCE")
    return FetchModifiers(changed_since, vanished)


# --- STORE (RFC 7162 3.1.3) ----------------------------------------------------


def arg_store_modifiers(proto: Any, line: bytes | None) -> tuple[int | None, bytes]:
    """STORE's optional C{(UNCHANGEDSINCE n)} before the item name."""
    line = (line or b"").lstrip(b" ")
    if line[:1] != b"(":
        return None, line
    inside, rest = _paren_group(line)
    words = inside.split()
    if len(words) != 2 or words[0].upper() != b"UNCHANGEDSINCE":
        raise imap4.IllegalClientResponse("Unknown STORE modifier")
    return modseq_value(words[1]), rest.lstrip(b" ")


# --- SELECT/EXAMINE (RFC 7162 3.1.8, 3.2.5) --------------------------------------


@dataclass(frozen=True)
class QResync:
    """SELECT's C{QRESYNC (uidvalidity modseq [known-uids [(seqs uids)]])}."""

    uid_validity: int
    modseq: int
    known_uids: SeqSet | None = None
    seq_match: tuple[SeqSet, SeqSet] | None = None


@dataclass(frozen=True)
class SelectParams:
    """The parameters of a SELECT or EXAMINE."""

    condstore: bool = False
    qresync: QResync | None = None


def _uid_set(raw: bytes) -> SeqSet:
    from mailsrv.imap.parsing import SeqSet

    if b"*" in raw:  # RFC 7162 7: known-uids and seq-match-data are sequence-sets of numbers
        raise imap4.IllegalClientResponse("Invalid UID set")
    return SeqSet(raw)


def _qresync(inside: bytes) -> QResync:
    head, sep, tail = inside.partition(b"(")
    words = head.split()
    if not 2 <= len(words) <= 3:
        raise imap4.IllegalClientResponse("Bad QRESYNC parameter")
    validity = words[0]
    if not _NUMBER.fullmatch(validity) or not 0 < int(validity) < 1 << 32:
        raise imap4.IllegalClientResponse("Bad UIDVALIDITY")
    modseq = modseq_value(words[1], zero=False)
    known = _uid_set(words[2]) if len(words) == 3 else None
    match = None
    if sep:
        if known is None:
            raise imap4.IllegalClientResponse("Bad QRESYNC parameter")
        pair, after = _paren_group(b"(" + tail)
        sets = pair.split()
        if len(sets) != 2 or after.strip():
            raise imap4.IllegalClientResponse("Bad QRESYNC sequence match data")
        match = (_uid_set(sets[0]), _uid_set(sets[1]))
    return QResync(int(validity), modseq, known, match)


def arg_select_params(proto: Any, line: bytes | None) -> tuple[SelectParams | None, bytes]:
    """SELECT/EXAMINE's optional parameter list: C{(CONDSTORE)}, C{(QRESYNC (...))}."""
    line = (line or b"").strip(b" ")
    if not line:
        return None, b""
    if line[:1] != b"(":
        raise imap4.IllegalClientResponse("Bad SELECT parameters")
    inside, rest = _paren_group(line)
    if rest.strip():
        raise imap4.IllegalClientResponse("Too many arguments")
    condstore = False
    qresync = None
    body = inside.strip()
    while body:
        word, _, after = body.partition(b" ")
        name = word.upper()
        if name == CONDSTORE and not condstore:
            condstore, body = True, after.strip()
        elif name == QRESYNC and qresync is None and after.lstrip()[:1] == b"(":
            group, body = _paren_group(after.lstrip())
            qresync = _qresync(group)
            body = body.strip()
        else:
            raise imap4.IllegalClientResponse("Unknown SELECT parameter")
    return SelectParams(condstore, qresync), b""


# --- the session ---------------------------------------------------------------


def store_failed(uids: Iterable[int], result: Any, unchanged_since: int | None) -> frozenset[int]:
    """
    The UIDs a STORE names in MODIFIED (RFC 7162 3.1.3): those whose
    mod-sequence is above UNCHANGEDSINCE, and, under the condition, those
    another session expunged meanwhile (the store no longer has them; the
    change cannot have been made), as Dovecot does.
    """
    failed: frozenset[int] = result.failed
    if unchanged_since is None:
        return failed
    return failed | {u for u in uids if u not in result}


@defer.inlineCallbacks
def delayed_expunge_line(session: Any, mbox: Any, told: Iterable[int]) -> Any:
    """
    RFC 7162 3.2: after a command that told the mod-sequences C{told} in
    FETCH (STORE, FETCH: they may not send VANISHED), fires with the
    C{* OK [HIGHESTMODSEQ n]} to send when an expunge with a lower
    mod-sequence is not told yet: n is what the session's view caught up
    to, below every expunge since (as Dovecot). Nothing without QRESYNC or
    when nothing is delayed; the store is asked only when it moved on.
    """
    caught_up = session.view_modseq
    if not session.qresync or mbox.folder.highest_modseq <= caught_up:
        return b""
    if max(told, default=0) <= caught_up:
        return b""
    gone = yield mbox.folder.vanished_since(caught_up)
    if gone is not None and not any(_holds(mbox.uids, u) for u in gone):
        return b""
    return highest_line(caught_up)


def highest_line(modseq: int) -> bytes:
    """C{* OK [HIGHESTMODSEQ n]} (RFC 7162 3.1.2.1), as Dovecot words it."""
    return b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % modseq


def enable(session: Any) -> bytes:
    """
    A CONDSTORE enabling command (RFC 7162 3.1) was given: the session now
    gets MODSEQ in every untagged FETCH. The first one given with a mailbox
    selected is told the mailbox's HIGHESTMODSEQ (what to send before the
    command's answer, as Dovecot): the one its view shows, never one that
    covers a change the client has not been told of yet.
    """
    if session.condstore:
        return b""
    session.condstore = True
    if session.mbox is None:
        return b""
    return highest_line(session.view_modseq)


def flags_fetch(
    seq: int, uid: int, modseq: int, flags: bytes, with_uid: bool, with_modseq: bool
) -> bytes:
    """
    The untagged FETCH that tells of new flags: after CONDSTORE is enabled
    with MODSEQ (RFC 7162 3.1), after QRESYNC with UID too (3.2.4), in
    Dovecot's order C{UID n MODSEQ (m) FLAGS (...)}.
    """
    if not with_modseq:
        if with_uid:
            return b"* %d FETCH (FLAGS %s UID %d)\r\n" % (seq, flags, uid)
        return b"* %d FETCH (FLAGS %s)\r\n" % (seq, flags)
    if with_uid:
        return b"* %d FETCH (UID %d MODSEQ (%d) FLAGS %s)\r\n" % (seq, uid, modseq, flags)
    return b"* %d FETCH (MODSEQ (%d) FLAGS %s)\r\n" % (seq, modseq, flags)


def modseq_fetch(seq: int, uid: int, modseq: int, with_uid: bool) -> bytes:
    """A STORE .SILENT's answer once CONDSTORE is enabled (RFC 7162 3.1.3): MODSEQ only."""
    if with_uid:
        return b"* %d FETCH (UID %d MODSEQ (%d))\r\n" % (seq, uid, modseq)
    return b"* %d FETCH (MODSEQ (%d))\r\n" % (seq, modseq)


# --- VANISHED (RFC 7162 3.2.10) ------------------------------------------------

Ranges = list[tuple[int, int]]


def ranges_of(uids: Iterable[int]) -> Ranges:
    """Ascending UIDs as [first, last] runs."""
    out: list[list[int]] = []
    for u in uids:
        if out and u == out[-1][1] + 1:
            out[-1][1] = u
        elif not out or u > out[-1][1]:
            out.append([u, u])
    return [(a, b) for a, b in out]


def set_text(ranges: Ranges) -> bytes:
    """C{1:3,7}: a uid-set of runs."""
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in ranges)


def vanished_line(ranges: Ranges, earlier: bool) -> bytes:
    """C{* VANISHED [(EARLIER)] uids}, or nothing for no UIDs."""
    if not ranges:
        return b""
    return b"* VANISHED %s%s\r\n" % (b"(EARLIER) " if earlier else b"", set_text(ranges))


def vanished_lines(view_uids: Sequence[int], removed: Iterable[int]) -> bytes:
    """The C{* VANISHED} line (RFC 7162 3.2.10) for the UIDs C{removed} that the view shows."""
    gone = sorted(u for u in removed if _holds(view_uids, u))
    return vanished_line(ranges_of(gone), False)


def _holds(uids: Sequence[int], uid: int) -> bool:
    i = bisect.bisect_left(uids, uid)
    return i < len(uids) and uids[i] == uid


def _inside(ranges: Ranges, uid: int) -> bool:
    i = bisect.bisect_right(ranges, (uid, MAX_MODSEQ))
    return i > 0 and ranges[i - 1][0] <= uid <= ranges[i - 1][1]


def _clip(ranges: Ranges, within: Ranges) -> Ranges:
    """The parts of C{ranges} inside C{within} (both ascending and disjoint)."""
    out = []
    j = 0
    for lo, hi in ranges:
        while j < len(within) and within[j][1] < lo:
            j += 1
        k = j
        while k < len(within) and within[k][0] <= hi:
            a, b = max(lo, within[k][0]), min(hi, within[k][1])
            if a <= b:
                out.append((a, b))
            k += 1
    return out


def normal_ranges(s: SeqSet, last: int) -> Ranges:
    """A set's ranges (C{*} as C{last}) sorted and merged."""
    out: list[list[int]] = []
    for lo, hi in sorted(s.ranges(last)):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def missing(view_uids: Sequence[int], within: Ranges) -> Ranges:
    """The UIDs of C{within} that the view does not hold, as runs: the gaps between its UIDs."""
    out: Ranges = []
    for lo, hi in within:
        i = bisect.bisect_left(view_uids, lo)
        at = lo
        while at <= hi:
            if i < len(view_uids) and view_uids[i] <= hi:
                nxt = view_uids[i]
                if nxt > at:
                    out.append((at, nxt - 1))
                at = nxt + 1
                i += 1
            else:
                out.append((at, hi))
                break
    return out


def vanished_earlier(
    view_uids: Sequence[int],
    known: Iterable[int] | None,
    within: Ranges,
    above: int = 0,
    below: int = MAX_MODSEQ,
) -> Ranges:
    """
    The UIDs of C{within} (above C{above}) to report as VANISHED (EARLIER):
    those the store lists as expunged (C{known}), or, when it no longer
    knows them all (None), every such UID below the view's UIDNEXT
    (C{below}) the view does not hold (RFC 7162 3.2.5.2: the client may be
    told of UIDs it never had, never of a message appended since).
    """
    if above:
        within = _clip(within, [(above + 1, MAX_MODSEQ)])
    if known is None:
        return missing(view_uids, _clip(within, [(1, below - 1)]))
    gone = [u for u in known if not _holds(view_uids, u)]
    return _clip(ranges_of(sorted(gone)), within)


def matched_up_to(seq_match: tuple[SeqSet, SeqSet], view_uids: Sequence[int]) -> int:
    """
    RFC 7162 3.2.5.2: the highest UID the client's sequence match data shows
    unchanged (the message at that sequence number still has that UID; then
    no message with a lower UID was expunged), or 0. The pairs are walked
    lazily and the walk ends at the first mismatch, so the work is bounded
    by the folder's size, not by the width of the ranges (C{1:4294967295}).
    """
    seq_ranges, uid_ranges = seq_match[0].ranges(0), seq_match[1].ranges(0)
    if sum(b - a + 1 for a, b in seq_ranges) != sum(b - a + 1 for a, b in uid_ranges):
        return 0
    seqs = (n for lo, hi in seq_ranges for n in range(lo, hi + 1))
    uids = (n for lo, hi in uid_ranges for n in range(lo, hi + 1))
    best = 0
    for seq, uid in zip(seqs, uids, strict=True):
        if 0 < seq <= len(view_uids) and view_uids[seq - 1] == uid:
            best = max(best, uid)
        else:
            break
    return best


@defer.inlineCallbacks
def resync(mbox: Any, request: QResync, flags_of: Any, uid_next: int) -> Any:
    """
    SELECT's QRESYNC (RFC 7162 3.2.5): fires with the bytes to send after
    HIGHESTMODSEQ: C{* VANISHED (EARLIER)} and the FETCH (UID FLAGS MODSEQ)
    of each message changed since the client's mod-sequence, limited to
    its known UIDs, in work proportional to the changes. C{flags_of(info)}
    formats a message's flags as the session shows them; C{uid_next} is the
    folder's UIDNEXT when the view was taken (a later message is not gone).
    """
    if request.uid_validity != mbox.uid_validity():
        return b""  # RFC 7162 3.2.5: a plain SELECT
    folder = mbox.folder
    uids = mbox.uids
    last = uids[-1] if uids else 0
    known = normal_ranges(request.known_uids, last) if request.known_uids else None
    changed = yield folder.changed_since(request.modseq)
    expunged = yield folder.vanished_since(request.modseq)
    top = max(uid_next - 1, last)
    within = known if known is not None else [(1, top)] if top else []
    above = 0
    if expunged is None and request.seq_match is not None:
        above = matched_up_to(request.seq_match, uids)
    out = [vanished_line(vanished_earlier(uids, expunged, within, above, uid_next), True)]
    for uid, _modseq, _flags in changed:
        if known is not None and not _inside(known, uid):
            continue
        seq = mbox.seq_of(uid)
        if seq is None:
            continue
        info = mbox.infos[seq - 1]
        if info.modseq <= request.modseq:
            continue  # changed after the view was taken: told at the next sync
        out.append(
            b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))\r\n"
            % (seq, uid, flags_of(info), info.modseq)
        )
    return b"".join(out)


def highest_of(modseqs: Sequence[int]) -> int:
    """The highest of the mod-sequences of found messages (0 for none)."""
    return max(modseqs, default=0)
