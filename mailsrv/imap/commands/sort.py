"""
SORT and THREAD (RFC 5256), SORT=DISPLAY (RFC 5957), ESORT (RFC 5267 3), and
their UID forms. The search runs as SEARCH's does; the header keys of the
matching messages come from the factory's L{SortFieldCache}, and those it
lacks are read from disk in the store's thread pool, where the search and
the ordering run too: the reactor formats the answer only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import compress
from typing import Any

from twisted.mail import imap4

from mailsrv.imap import condstore, twistedcompat
from mailsrv.imap.commands.base import command
from mailsrv.imap.commands.selected import SelectedCommands, matching
from mailsrv.imap.context import CONTEXT_OPTIONS, parse_return, sort_keys
from mailsrv.imap.esearch import (
    SEARCH_RETURN_OPTIONS,
    ReturnSyntaxError,
    answers,
    esearch_line,
)
from mailsrv.imap.parsing import CommandParser, SeqSet
from mailsrv.imap.search import (
    BadCharset,
    Matcher,
    SearchError,
    needs,
    parse,
    uses_modseq,
    uses_recent,
)
from mailsrv.imap.searchmask import Spans
from mailsrv.imap.sort import Entry, Matches, Program, needs_headers, parse_program, sort_positions
from mailsrv.imap.sortfields import MessageKeys, SortFieldCache, collector_paused, message_keys
from mailsrv.imap.thread import ALGORITHMS, ordered_subject, references, thread_list
from mailsrv.interfaces import MessageInfo
from mailsrv.store.infos import InfoList

# The capabilities of this module (RFC 5256 6, RFC 5957 4, RFC 5267 3).
CAPABILITIES = [
    b"SORT",
    b"SORT=DISPLAY",
    b"ESORT",
    b"THREAD=ORDEREDSUBJECT",
    b"THREAD=REFERENCES",
]

# How many messages' keys the factory's cache holds (a few hundred bytes each).
SORT_CACHE_MESSAGES = 500_000

_NO_KEYS = MessageKeys()
_ALL = ("and", [("ALL",)])


def _matches(
    matcher: Matcher, folder: Any, infos: Sequence[MessageInfo], disk: bool
) -> Sequence[int]:
    """The sequence numbers of the messages C{matcher} accepts. Pool thread."""
    if matcher.tree == _ALL:
        return range(1, len(infos) + 1)
    mask = None if disk else matcher.mask(infos)
    if mask is not None:
        return list(compress(range(1, len(infos) + 1), mask))
    return [seq for seq, _ in matching(matcher, folder, infos)]


def _gather(
    folder: Any,
    infos: Sequence[MessageInfo],
    seqs: Sequence[int],
    cached: dict[int, MessageKeys],
    with_keys: bool,
) -> tuple[Matches, dict[int, MessageKeys]]:
    """
    Pool thread: the matched messages as L{Matches}, with their keys from
    C{cached} or read from their headers; and the keys read (for the cache).
    """
    uids: Sequence[int]
    sizes: Sequence[int]
    dates: Sequence[float]
    if isinstance(infos, InfoList):  # its columns, without a MessageInfo per message
        uids, sizes, dates = infos.uids, infos.sizes, infos.dates
    else:
        uids = [i.uid for i in infos]
        sizes = [i.size for i in infos]
        dates = [i.internal_date for i in infos]
    if not (isinstance(seqs, range) and len(seqs) == len(infos)):
        uids = [uids[s - 1] for s in seqs]
        sizes = [sizes[s - 1] for s in seqs]
        dates = [dates[s - 1] for s in seqs]
    if not with_keys:
        return Matches(seqs, uids, sizes, dates, None), {}
    keys: list[Any] = list(map(cached.get, uids))
    new: dict[int, MessageKeys] = {}
    gone = []
    interned: dict[bytes, bytes] = {}
    for i, k in enumerate(keys):
        if k is None:
            try:
                keys[i] = new[uids[i]] = message_keys(folder.read_headers(uids[i]), interned)
            except KeyError:
                gone.append(i)  # gone from the disk; the next refresh tells the client
    if gone:
        kept = sorted(set(range(len(keys))) - set(gone))
        return (
            Matches(
                [seqs[i] for i in kept],
                [uids[i] for i in kept],
                [sizes[i] for i in kept],
                [dates[i] for i in kept],
                [keys[i] for i in kept],
            ),
            new,
        )
    return Matches(seqs, uids, sizes, dates, keys), new


def _numbers(numbers: Sequence[int]) -> bytes:
    """C{b" 3 1 2"}: the numbers of a SORT response (RFC 5256 4), or nothing."""
    return (" " + " ".join(map(str, numbers))).encode("ascii") if numbers else b""


def arg_sort_options(proto: Any, line: bytes | None) -> tuple[frozenset[str] | None, bytes]:
    """
    ESORT's optional C{RETURN (...)} (RFC 5267 3; SAVE: RFC 5182 2.1;
    CONTEXT, UPDATE and PARTIAL: RFC 5267 4.1, CONTEXT=SORT).
    """
    try:
        options, rest = parse_return(line or b"", SEARCH_RETURN_OPTIONS + CONTEXT_OPTIONS)
    except ReturnSyntaxError as e:
        raise imap4.IllegalClientResponse(str(e))
    if options is not None and "UPDATE" in options and proto.update_tag_in_use(proto._current_tag):
        raise imap4.IllegalClientResponse("Duplicate search update tag")  # RFC 5267 4.3
    return options, rest


def arg_sort_program(proto: Any, line: bytes | None) -> tuple[Program, bytes]:
    """The parenthesised sort criteria (RFC 5256 4)."""
    try:
        return parse_program(line or b"")
    except SearchError as e:
        raise imap4.IllegalClientResponse(str(e))


def arg_algorithm(proto: Any, line: bytes | None) -> tuple[str, bytes]:
    """The THREAD algorithm (RFC 5256 4)."""
    name, _, rest = (line or b"").lstrip(b" ").partition(b" ")
    algorithm = name.decode("ascii", "replace").upper()
    if algorithm not in ALGORITHMS:
        raise imap4.IllegalClientResponse(f"Unknown thread algorithm {algorithm}")
    return algorithm, rest


class SortCommands(SelectedCommands):
    """SORT, THREAD, UID SORT and UID THREAD (and the other UID commands, by SelectedCommands)."""

    def _sort_cache(self) -> SortFieldCache:
        return self.factory.sort_fields  # type: ignore[no-any-return]

    def _ordered(
        self,
        charset: bytes,
        tokens: list[Any],
        with_keys: bool,
        order: Callable[[Matches], Any],
    ) -> Any:
        """
        Search, gather the entries of the matches (reading the keys the cache
        lacks) and put them in C{order}, all in the pool; fires with its result.
        """
        mbox = self.mbox
        tree = parse(tokens, charset.decode("ascii", "replace"), self.saved_uids())
        infos = mbox.infos  # replaced, never changed, by a reload: safe to walk in a thread
        last_uid = mbox.uids[-1] if mbox.uids else 0
        matcher = Matcher(
            tree,
            len(infos),
            last_uid,
            set(mbox.recent) if uses_recent(tree) else set(),
            lambda raw, last: Spans(SeqSet(raw).ranges(last)),
            now=self.factory.reactor.seconds(),  # OLDER, YOUNGER (RFC 5032)
        )
        folder = mbox.folder
        cache = self._sort_cache()
        key = (self._user, folder.name, folder.uid_validity)
        cached = cache.folder(key)
        disk = bool(needs(tree))

        def job() -> tuple[Any, dict[int, MessageKeys]]:
            seqs = _matches(matcher, folder, infos, disk)
            with collector_paused():
                matches, new = _gather(folder, infos, seqs, cached, with_keys)
                return order(matches), new

        def done(result: tuple[Any, dict[int, MessageKeys]]) -> Any:
            answer, new = result
            cache.add(key, new, len(infos))
            return answer

        return self._run(job).addCallback(done)

    @command
    def do_SORT(
        self,
        tag: bytes,
        options: frozenset[str] | None,
        program: Program,
        charset: bytes,
        tokens: list[Any],
        uid: int = 0,
    ) -> Any:
        save = options is not None and "SAVE" in options
        update = options is not None and "UPDATE" in options
        mbox = self.mbox

        def order(matches: Matches) -> tuple[list[int], list[int], list[tuple] | None]:
            positions = sort_positions(program, matches)
            shown = matches.uids if uid else matches.seqs
            found = [matches.uids[i] for i in positions] if save else []
            live = sort_keys(program, matches) if update else None  # RFC 5267 4.3
            return [shown[i] for i in positions], found, live

        try:
            numbers, found, live = yield self._ordered(
                charset, tokens, needs_headers(program), order
            )
        except BadCharset:
            if save:  # RFC 5182 2.1: a NO empties "$"
                self._saved_search = None
            raise
        if self._lost:
            return
        modseqs = self._sort_modseqs(charset, tokens, numbers, bool(uid))
        if options is None:
            top = b" (MODSEQ %d)" % max(modseqs) if modseqs else b""  # RFC 7162 3.1.5
            self.sendUntaggedResponse(b"SORT" + _numbers(numbers) + top)
        else:
            if live is not None:  # RFC 5267 4.3: UPDATE, on "$" as the search read it
                tree = parse(tokens, charset.decode("ascii", "replace"), self.saved_uids())
                self._open_context(tag, bool(uid), tree, (), program, live)
            if save:  # RFC 5182 2.4: MIN and MAX as ESORT gives them, in sort order
                self._save_result(mbox, options, found)
            if answers(options):
                self.sendUntaggedResponse(esearch_line(tag, bool(uid), options, numbers, modseqs))
        self.sendPositiveResponse(tag, b"SORT completed")

    def _sort_modseqs(
        self, charset: bytes, tokens: list[Any], numbers: list[int], uid: bool
    ) -> list[int]:
        """
        With a MODSEQ key (RFC 7162 3.1.5, a CONDSTORE enabling command), the
        mod-sequences of the sorted messages, in their order; else none.
        """
        if not uses_modseq(parse(tokens, charset.decode("ascii", "replace"), self.saved_uids())):
            return []
        self.transport.write(condstore.enable(self))
        mbox = self.mbox
        seqs = [mbox.seq_of(n) or 0 for n in numbers] if uid else numbers
        return [mbox.infos[s - 1].modseq for s in seqs if s]

    select_SORT = (  # type: ignore[assignment]
        do_SORT,
        arg_sort_options,
        arg_sort_program,
        CommandParser.arg_astring,
        CommandParser.arg_searchkeys,
    )

    @command
    def do_THREAD(
        self, tag: bytes, algorithm: str, charset: bytes, tokens: list[Any], uid: int = 0
    ) -> Any:
        build = ordered_subject if algorithm == "ORDEREDSUBJECT" else references

        def order(matches: Matches) -> bytes:
            number: Callable[[Entry], int] = (lambda e: e.uid) if uid else (lambda e: e.seq)
            return thread_list(build(matches.entries()), number)

        threads = yield self._ordered(charset, tokens, True, order)
        if self._lost:
            return
        self.sendUntaggedResponse(b"THREAD " + threads if threads else b"THREAD")
        self.sendPositiveResponse(tag, b"THREAD completed")

    select_THREAD = (  # type: ignore[assignment]
        do_THREAD,
        arg_algorithm,
        CommandParser.arg_astring,
        CommandParser.arg_searchkeys,
    )

    def do_UID(self, tag: bytes, command: bytes, line: bytes) -> None:
        if command.upper() in (b"SORT", b"THREAD"):
            self.dispatchCommand(tag, command.upper(), line, uid=1)
            return
        super().do_UID(tag, command, line)

    select_UID = (do_UID, twistedcompat.arg_atom, twistedcompat.arg_line)  # type: ignore[assignment]
