"""
Contexts (RFC 5267 4): the return options CONTEXT, UPDATE and PARTIAL of
SEARCH and SORT, and the live results an UPDATE keeps.

A live result holds the UIDs its searching command found (for SORT, each
with its key in the sort order) and the search program, with message
numbers turned into the UIDs they named then. When messages arrive, change
flags or go, only those messages are evaluated, and the differences are
told as C{* ESEARCH (TAG "t") REMOVEFROM (...) ADDTO (...)}: the work is
proportional to the change, never a new search of the mailbox.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import defer

from mailsrv.imap import mime
from mailsrv.imap.esearch import ReturnSyntaxError
from mailsrv.imap.responses import uid_set
from mailsrv.imap.sort import Matches, Program
from mailsrv.imap.sortfields import MessageKeys, message_keys
from mailsrv.interfaces import MessageInfo

# RFC 5267 4.3.1: "Servers MUST provide at least one updating context per
# client"; Dovecot allows 10 (CLIENT_MAX_SEARCH_UPDATES), and so do we.
MAX_LIVE_RESULTS = 10
# The messages all live results of one session hold together (8 bytes each
# for SEARCH; a key tuple each for SORT): past this, NOUPDATE.
MAX_LIVE_MESSAGES = 1_000_000

# RFC 5267 4.1: the return options CONTEXT=SEARCH and CONTEXT=SORT add.
CONTEXT_OPTIONS = ("CONTEXT", "UPDATE", "PARTIAL")

# Up to this many messages change a live result one at a time; more, in one pass.
_FEW = 64

_NZ_NUMBER_MAX = 4294967295  # RFC 3501 9: nz-number is a 32-bit number


class ReturnOptions(frozenset):  # type: ignore[type-arg]
    """
    The RETURN options of a SEARCH or SORT (RFC 4731 3.1), with PARTIAL's
    range (RFC 5267 4.4) when one was asked for.
    """

    partial: tuple[int, int] | None

    def __new__(cls, words: Iterable[str], partial: tuple[int, int] | None = None) -> Any:
        self = super().__new__(cls, words)
        self.partial = partial
        return self


def parse_partial_range(raw: bytes) -> tuple[int, int]:
    """
    RFC 5267 5: partial-range = nz-number ":" nz-number; C{500:400} is
    C{400:500} (4.4). No C{*}, no negative numbers (those are RFC 9394's).
    """
    lo, sep, hi = raw.partition(b":")
    if not (sep and lo.isdigit() and hi.isdigit()):
        raise ReturnSyntaxError("PARTIAL range broken")
    a, b = int(lo), int(hi)
    if not (0 < a <= _NZ_NUMBER_MAX and 0 < b <= _NZ_NUMBER_MAX):
        raise ReturnSyntaxError("PARTIAL range broken")
    return min(a, b), max(a, b)


def parse_return(line: bytes, offered: tuple[str, ...]) -> tuple[ReturnOptions | None, bytes]:
    """
    An optional C{RETURN (...)} at the start of C{line}: the options asked
    for, each one of C{offered} (None without RETURN), and the rest of the
    line. RFC 4731 3.1: C{RETURN ()} means ALL; CONTEXT is a hint only (RFC
    5267 4.2), so C{RETURN (CONTEXT)} means ALL too, as in Dovecot. RFC 5267
    4.4: PARTIAL takes a range, once, and never with ALL.
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
    words = rest[1:end].split()
    found: set[str] = set()
    partial = None
    i = 0
    while i < len(words):
        word = words[i].decode("ascii", "replace").upper()
        i += 1
        if word not in offered:
            raise ReturnSyntaxError(f"Unsupported RETURN option {word}")
        if word == "PARTIAL":
            if partial is not None:
                raise ReturnSyntaxError("PARTIAL can be used only once")
            if i >= len(words):
                raise ReturnSyntaxError("PARTIAL range missing")
            partial = parse_partial_range(words[i])
            i += 1
        elif word == "UPDATE" and word in found:
            raise ReturnSyntaxError("Duplicate UPDATE")
        found.add(word)
    if partial is not None and "ALL" in found:
        raise ReturnSyntaxError("PARTIAL conflicts with ALL")
    found.discard("CONTEXT")
    return ReturnOptions(found or ["ALL"], partial), rest[end + 1 :]


# --- what a live result is evaluated with ----------------------------------------


class _UidSpan:
    """Membership in UID ranges: the messages a set of message numbers named then."""

    __slots__ = ("_starts", "_ends")

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self._starts = [lo for lo, _ in merged]
        self._ends = [hi for _, hi in merged]

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        i = bisect.bisect_right(self._starts, uid) - 1
        return i >= 0 and uid <= self._ends[i]


def pin_numbers(tree: tuple, uids: Sequence[int], parse_set: Callable[[bytes], Any]) -> tuple:
    """
    C{tree} with each set of message numbers (a C{seqset} key) replaced by
    the UIDs it names in a mailbox of the messages C{uids}, so that a live
    result keeps meaning the messages the command named, whatever is
    expunged or added after. C{parse_set(raw)} gives the (lo, hi) ranges with
    C{*} resolved to the last number.
    """
    kind = tree[0]
    if kind == "and":
        return ("and", [pin_numbers(t, uids, parse_set) for t in tree[1]])
    if kind == "or":
        return ("or", pin_numbers(tree[1], uids, parse_set), pin_numbers(tree[2], uids, parse_set))
    if kind == "not":
        return ("not", pin_numbers(tree[1], uids, parse_set))
    if kind != "seqset":
        return tree
    spans = []
    for lo, hi in parse_set(tree[1]):
        lo, hi = max(lo, 1), min(hi, len(uids))
        if lo <= hi:  # messages lo..hi held exactly the UIDs from uids[lo-1] to uids[hi-1]
            spans.append((uids[lo - 1], uids[hi - 1]))
    return ("saved", _UidSpan(spans))


def depends_on_time(tree: tuple) -> bool:
    """Whether the search has OLDER or YOUNGER (RFC 5032), whose result time alone changes."""
    kind = tree[0]
    if kind == "and":
        return any(depends_on_time(t) for t in tree[1])
    if kind == "or":
        return depends_on_time(tree[1]) or depends_on_time(tree[2])
    if kind == "not":
        return depends_on_time(tree[1])
    return kind in ("OLDER", "YOUNGER")


class _Descending:
    """A sort key compared the other way round (REVERSE, RFC 5256 3)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Descending) -> bool:
        return other.value < self.value  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)


def sort_keys(program: Program, matches: Matches) -> list[tuple]:
    """
    One key per message of C{matches} that orders them as SORT does
    (L{mailsrv.imap.sort.sort_positions}): the program's keys, REVERSE ones
    turned round, then the UID (equal messages keep mailbox order). Sorted.
    """
    columns = []
    for name, reverse in program:
        column = matches.column(name)
        columns.append([_Descending(v) for v in column] if reverse else column)
    keys = list(zip(*columns, matches.uids, strict=True))
    keys.sort()
    return keys


def _one_key(program: Program, info: MessageInfo, keys: MessageKeys | None) -> tuple:
    """The key of one message, as L{sort_keys} gives it."""
    one = Matches(
        [0], [info.uid], [info.size], [info.internal_date], None if keys is None else [keys]
    )
    return sort_keys(program, one)[0]


# --- live results --------------------------------------------------------------


class LiveResult:
    """
    The result of one SEARCH or UID SEARCH with UPDATE (RFC 5267 4.3): its
    UIDs, ascending; changes are told with context position 0 (4.3.3,
    4.3.4), in mailbox order, as Dovecot tells them.
    """

    program: Program | None = None

    def __init__(self, tag: bytes, uid: bool, matcher: Any, disk: bool, members: Any) -> None:
        self.tag = tag
        self.uid = uid
        self.matcher = matcher  # a Matcher over the pinned tree and the live \\Recent set
        self.disk = disk  # whether evaluating it reads headers or bodies
        self._uids = array("q", sorted(members))

    def __len__(self) -> int:
        return len(self._uids)

    def holds(self, uid: int) -> bool:
        i = bisect.bisect_left(self._uids, uid)
        return i < len(self._uids) and self._uids[i] == uid

    def key_of(self, info: MessageInfo, folder: Any) -> Any:
        """What an added message is placed by (nothing for SEARCH). Pool thread."""
        return None

    def apply(
        self, removed: Sequence[int], added: dict[int, Any], number: Callable[[int], int]
    ) -> bytes:
        """Drop C{removed} and add C{added} (UID -> key); the ESEARCH line that says so."""
        gone = sorted(u for u in set(removed) if self.holds(u))
        if len(gone) > _FEW:  # one pass, not a move of the array per message
            dropped = set(gone)
            self._uids = array("q", (u for u in self._uids if u not in dropped))
        else:
            for u in reversed(gone):
                del self._uids[bisect.bisect_left(self._uids, u)]
        new = sorted(u for u in added if not self.holds(u))
        if len(new) > _FEW:
            self._uids.extend(new)
            self._uids = array("q", sorted(self._uids))
        else:
            for u in new:
                self._uids.insert(bisect.bisect_left(self._uids, u), u)
        items = []
        if gone:
            items.append(b"REMOVEFROM (0 %s)" % uid_set(self._numbers(gone, number)))
        if new:
            items.append(b"ADDTO (0 %s)" % uid_set(self._numbers(new, number)))
        return self._line(items)

    def _numbers(self, uids: Sequence[int], number: Callable[[int], int]) -> list[int]:
        return list(uids) if self.uid else [number(u) for u in uids]

    def _line(self, items: list[bytes]) -> bytes:
        if not items:
            return b""
        head = b"* ESEARCH (TAG " + mime.nstring(self.tag) + b")" + (b" UID" if self.uid else b"")
        return head + b" " + b" ".join(items) + b"\r\n"


class LiveSortResult(LiveResult):
    """
    The result of one SORT or UID SORT with UPDATE (RFC 5267 4.3): its keys
    in sort order; changes are told with their positions in that order
    (4.3.2: "such that the results are maintained in the requested order").
    """

    def __init__(
        self, tag: bytes, uid: bool, matcher: Any, disk: bool, program: Program, keys: list[tuple]
    ) -> None:
        super().__init__(tag, uid, matcher, disk, ())
        self.program = program
        self._keys = keys  # sorted; each ends with its UID
        self._key_of = {k[-1]: k for k in keys}
        self._headers = any(name not in ("ARRIVAL", "SIZE") for name, _ in program)
        self.disk = disk or self._headers

    def __len__(self) -> int:
        return len(self._keys)

    def holds(self, uid: int) -> bool:
        return uid in self._key_of

    def key_of(self, info: MessageInfo, folder: Any) -> Any:
        keys = message_keys(folder.read_headers(info.uid)) if self._headers else None
        return _one_key(self.program or [], info, keys)

    def apply(
        self, removed: Sequence[int], added: dict[int, Any], number: Callable[[int], int]
    ) -> bytes:
        keys = self._keys
        gone = sorted(
            bisect.bisect_left(keys, self._key_of[u]) for u in set(removed) if self.holds(u)
        )
        pairs = []
        before = 0  # RFC 5267 4.3.4: pairs apply in turn; the earlier ones moved this one up
        for run in _runs(gone):
            pairs.append([run[0] - before + 1, *(keys[i][-1] for i in run)])
            before += len(run)
        for i in gone:
            del self._key_of[keys[i][-1]]
        if len(gone) > _FEW:
            self._keys = keys = [k for k in keys if k[-1] in self._key_of]
        else:
            for i in reversed(gone):
                del keys[i]
        items = []
        if pairs:
            items.append(b"REMOVEFROM (%s)" % self._pairs(pairs, number))
        new = [k for u, k in added.items() if k is not None and not self.holds(u)]
        for k in new:
            self._key_of[k[-1]] = k
        if len(new) > _FEW:
            keys.extend(sorted(new))
            keys.sort()  # two sorted runs: merged in linear time
        else:
            for k in new:
                bisect.insort(keys, k)
        at = sorted(bisect.bisect_left(keys, k) for k in new)
        # RFC 5267 4.3.3: inserted in the order given; in ascending positions each
        # one's position is already its final one.
        adds = [[run[0] + 1, *(keys[i][-1] for i in run)] for run in _runs(at)]
        if adds:
            items.append(b"ADDTO (%s)" % self._pairs(adds, number))
        return self._line(items)

    def _pairs(self, pairs: list[list[int]], number: Callable[[int], int]) -> bytes:
        return b" ".join(b"%d %s" % (p[0], uid_set(self._numbers(p[1:], number))) for p in pairs)


def _runs(positions: Sequence[int]) -> list[list[int]]:
    """Ascending positions cut into runs of consecutive ones."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


class LiveResults:
    """
    The live results of one selection of a mailbox, by tag; gone with it
    (RFC 5267 4.3: updates cease when the mailbox is no longer selected).
    """

    def __init__(self) -> None:
        self._by_tag: dict[bytes, LiveResult] = {}

    def __contains__(self, tag: bytes) -> bool:
        return tag in self._by_tag

    def __len__(self) -> int:
        return len(self._by_tag)

    def room_for(self, messages: int) -> bool:
        """Whether one more live result of C{messages} stays within the limits (4.3.1)."""
        held = sum(len(r) for r in self._by_tag.values())
        return len(self._by_tag) < MAX_LIVE_RESULTS and held + messages <= MAX_LIVE_MESSAGES

    def add(self, result: LiveResult) -> None:
        self._by_tag[result.tag] = result

    def cancel(self, tag: bytes) -> bool:
        """CANCELUPDATE of one tag (RFC 5267 4.3.5): whether it was live."""
        return self._by_tag.pop(tag, None) is not None

    def removed(self, uids: Iterable[int], number: Callable[[int], int]) -> bytes:
        """
        The REMOVEFROM lines for messages about to be announced expunged;
        C{number} gives their message numbers as they still are (4.3.4: sent
        before the EXPUNGE, so that those numbers are valid).
        """
        gone = list(uids)
        if not gone:
            return b""
        return b"".join(r.apply(gone, {}, number) for r in list(self._by_tag.values()))

    def changed(
        self,
        infos: Sequence[MessageInfo],
        folder: Any,
        number: Callable[[int], int | None],
        run: Callable[..., defer.Deferred],
    ) -> defer.Deferred:
        """
        Evaluate the messages C{infos} (new, or with new flags) for each live
        result, in the pool when that reads the disk; fires with the ESEARCH
        lines of the changes (ADDTO after EXISTS, 4.3.3: so sent by the caller).
        """
        latest = {i.uid: i for i in infos if number(i.uid) is not None}
        results = list(self._by_tag.values())
        if not latest or not results:
            return defer.succeed(b"")
        batch = [latest[u] for u in sorted(latest)]

        def job() -> list[tuple[list[int], dict[int, Any]]]:
            return [_evaluate(r, folder, batch) for r in results]

        def told(outcomes: list[tuple[list[int], dict[int, Any]]]) -> bytes:
            lines = []
            for r, (dropped, added) in zip(results, outcomes, strict=True):
                if self._by_tag.get(r.tag) is r:  # not cancelled meanwhile
                    lines.append(r.apply(dropped, added, number))  # type: ignore[arg-type]
            return b"".join(lines)

        if any(r.disk for r in results):
            return run(job).addCallback(told)
        return defer.maybeDeferred(job).addCallback(told)


def _evaluate(
    result: LiveResult, folder: Any, infos: Sequence[MessageInfo]
) -> tuple[list[int], dict[int, Any]]:
    """
    Which of C{infos} C{result} no longer holds, and those it gains (UID ->
    key); a message gone from the disk meanwhile is neither (its expunge
    tells). A pool thread when the result reads the disk.
    """
    from mailsrv.imap.commands.selected import matching  # that module builds on this one

    matched = {info.uid: info for _, info in matching(result.matcher, folder, infos)}
    dropped = [i.uid for i in infos if i.uid not in matched and result.holds(i.uid)]
    added: dict[int, Any] = {}
    for uid, info in matched.items():
        if not result.holds(uid):
            try:
                added[uid] = result.key_of(info, folder)
            except KeyError:
                continue
    return dropped, added
