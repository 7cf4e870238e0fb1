"""
Commands on the selected mailbox (RFC 3501 6.4) but FETCH: CHECK, CLOSE,
UNSELECT (RFC 3691), EXPUNGE, STORE, COPY, MOVE (RFC 6851), SEARCH and UID,
with UIDPLUS's COPYUID and UID EXPUNGE (RFC 4315), ESEARCH's RETURN options
(RFC 4731) and SEARCHRES's saved result C{$} (RFC 5182).
"""

from __future__ import annotations

import functools
import weakref
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4

from mailsrv.imap import condstore, rev2, twistedcompat
from mailsrv.imap.account import SessionMailbox
from mailsrv.imap.commands.base import command
from mailsrv.imap.commands.context import ContextCommands
from mailsrv.imap.commands.quota import quota_refuses
from mailsrv.imap.context import CONTEXT_OPTIONS
from mailsrv.imap.context import parse_return as parse_context_return
from mailsrv.imap.esearch import (
    SEARCH_RETURN_OPTIONS,
    ReturnSyntaxError,
    answers,
    esearch_line,
    saved_part,
)
from mailsrv.imap.parsing import (
    CommandParser,
    SavedResult,
    SeqSet,
    mailbox_name,
    parse_flags,
    resolve,
)
from mailsrv.imap.responses import flag_list, number_list, uid_set
from mailsrv.imap.search import BadCharset, Matcher, parse, uses_modseq, uses_recent
from mailsrv.imap.searchmask import Spans, columns, pick
from mailsrv.interfaces import DELETED, FolderError, MessageInfo, NotSelectable
from mailsrv.spool import SpooledSource
from mailsrv.store.infos import flag_sets

# A message up to this size is searched (BODY, TEXT) whole, a bigger one in chunks.
SEARCH_WHOLE_UP_TO = 4 * 1024 * 1024

# A search of the index over a view this small runs at once; a bigger one in the
# thread pool, so that other sessions are answered meanwhile.
SEARCH_INLINE_UP_TO = 1000

arg_seqset = CommandParser.arg_seqset
arg_finalastring = CommandParser.arg_finalastring


def arg_search_return(proto: Any, line: bytes | None) -> tuple[frozenset[str] | None, bytes]:
    """
    SEARCH's optional C{RETURN (...)} (RFC 4731 3.1, SAVE: RFC 5182 2.1,
    CONTEXT, UPDATE and PARTIAL: RFC 5267 4).
    """
    try:
        options, rest = parse_context_return(line or b"", SEARCH_RETURN_OPTIONS + CONTEXT_OPTIONS)
    except ReturnSyntaxError as e:
        raise imap4.IllegalClientResponse(str(e))
    if options is not None and "UPDATE" in options and proto.update_tag_in_use(proto._current_tag):
        raise imap4.IllegalClientResponse("Duplicate search update tag")  # RFC 5267 4.3
    return options, rest.lstrip(b" ")


class SelectedCommands(ContextCommands):
    """CHECK, CLOSE, UNSELECT, EXPUNGE, STORE, COPY, MOVE, SEARCH, UID."""

    # The SEARCHRES result (RFC 5182): the selection it was saved in, and its UIDs.
    _saved_search: tuple[weakref.ref, Sequence[int]] | None = None

    @command
    def do_CHECK(self, tag: bytes) -> Any:
        yield self._sync()
        self.sendPositiveResponse(tag, b"CHECK completed")

    select_CHECK = (do_CHECK,)

    @command
    def do_CLOSE(self, tag: bytes) -> Any:
        mbox = self.mbox
        if mbox.is_writeable():
            # RFC 3501 6.4.2: what is \Deleted now, not what this session last saw
            # (another session may have cleared the flag); no untagged EXPUNGE here.
            yield mbox.folder.refresh()
            mbox.reload()
            uids = _deleted_uids(mbox)
            if uids:
                yield mbox.folder.expunge(uids)
        self._close_mailbox()
        self.state = twistedcompat.AUTH
        self.sendPositiveResponse(tag, b"CLOSE completed")

    select_CLOSE = (do_CLOSE,)

    def do_UNSELECT(self, tag: bytes) -> None:
        self._close_mailbox()
        self.state = twistedcompat.AUTH
        self.sendPositiveResponse(tag, b"UNSELECT completed")

    select_UNSELECT = (do_UNSELECT,)

    @command
    def do_EXPUNGE(self, tag: bytes, uids_named: SeqSet | None = None) -> Any:
        mbox = self.mbox
        if not mbox.is_writeable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        # RFC 3501 6.4.3: catch up first, so a \Deleted flag another session has
        # since cleared does not get its message removed.
        yield self._sync()
        if mbox is not self.mbox or self._lost or self.transport.disconnecting:
            return  # e.g. UIDVALIDITY changed: the UIDs seen no longer name the same mail
        uids = _deleted_uids(mbox)
        if uids_named is not None:
            last = mbox.uids[-1] if mbox.uids else 0
            uids = [u for u in uids if uids_named.contains(u, last)]
        removed = yield mbox.folder.expunge(uids) if uids else defer.succeed([])
        out = self._expunged_lines(removed)
        mbox.reload()
        if out:
            self.transport.write(out)
        yield self._sync()
        self.sendPositiveResponse(tag, self._highest_code(mbox) + b"EXPUNGE completed")

    def _highest_code(self, mbox: SessionMailbox) -> bytes:
        """
        After ENABLE QRESYNC, the HIGHESTMODSEQ an EXPUNGE or MOVE led to, for
        its tagged OK (as Dovecot; RFC 7162 3.2.10 lets the client store it).
        """
        if not self.qresync or mbox is not self.mbox:
            return b""
        return b"[HIGHESTMODSEQ %d] " % self.view_modseq

    select_EXPUNGE = (do_EXPUNGE,)

    @command
    def do_STORE(
        self,
        tag: bytes,
        messages: SeqSet,
        unchanged_since: int | None,
        mode: bytes,
        flags: list[bytes],
        uid: int = 0,
    ) -> Any:
        mbox = self.mbox
        m = mode.upper()
        silent = m.endswith(b".SILENT")
        base = m[: -len(b".SILENT")] if silent else m
        if base not in (b"FLAGS", b"+FLAGS", b"-FLAGS"):
            self.sendBadResponse(tag, b"Invalid STORE mode")
            return
        new = parse_flags(flags)
        seqs = resolve(messages, mbox.uids, bool(uid))
        if not mbox.is_writeable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        out = []
        if unchanged_since is not None:  # RFC 7162 3.1: a CONDSTORE enabling command
            out.append(condstore.enable(self))
        uids = [mbox.uids[seq - 1] for seq in seqs]
        before = {u: mbox.infos[seq - 1].modseq for u, seq in zip(uids, seqs, strict=True)}
        failed: frozenset[int] = frozenset()
        if not uids:
            now: dict[int, frozenset[str]] = {}
        elif base == b"FLAGS" and unchanged_since is None:
            now = {u: frozenset(new) for u in uids}
            yield mbox.folder.set_flags(now)
        else:
            # RFC 3501 6.4.6: on the flags as they are now, with other sessions' changes.
            add, remove = (new, ()) if base != b"-FLAGS" else ((), new)
            # FLAGS under UNCHANGEDSINCE: a replacement of the flags as they are, with
            # the test, in one step of the folder's order
            result = yield mbox.folder.change_flags(
                uids, add, remove, unchanged_since, replace=base == b"FLAGS"
            )
            now = result
            failed = condstore.store_failed(uids, result, unchanged_since)
        if uids:
            mbox.reload()
        out.append(self._flags_news(now.values()))
        for seq, u in zip(seqs, uids, strict=True):
            if u in failed:
                continue
            info = mbox.infos[seq - 1]
            if self.condstore:
                if silent:
                    # RFC 7162 3.1.3: MODSEQ of the messages changed, even when silent
                    if info.modseq != before[u]:
                        out.append(
                            condstore.modseq_fetch(seq, u, info.modseq, bool(uid) or self.qresync)
                        )
                    continue
            elif silent:
                continue
            flags_now = flag_list(mbox.flags_of(info))
            out.append(
                condstore.flags_fetch(
                    seq, u, info.modseq, flags_now, bool(uid) or self.qresync, self.condstore
                )
            )
        out.append((yield self._context_updates((), (mbox.infos[s - 1] for s in seqs))))
        told = (
            mbox.infos[s - 1].modseq for s, u in zip(seqs, uids, strict=True) if u not in failed
        )
        delayed = yield condstore.delayed_expunge_line(self, mbox, told)  # RFC 7162 3.2
        if mbox is not self.mbox or self._lost:
            return
        self.transport.write(b"".join(out) + delayed)
        if failed:
            # RFC 7162 3.1.3: the messages that failed the test, by number or by UID
            named = sorted(
                u if uid else seq for seq, u in zip(seqs, uids, strict=True) if u in failed
            )
            self.sendPositiveResponse(
                tag, b"[MODIFIED %s] Conditional store failed" % uid_set(named)
            )
            return
        self.sendPositiveResponse(tag, b"STORE completed")

    select_STORE = (  # type: ignore[assignment]
        do_STORE,
        arg_seqset,
        condstore.arg_store_modifiers,
        twistedcompat.arg_atom,
        twistedcompat.arg_flaglist,
    )

    @command
    def do_COPY(
        self, tag: bytes, messages: SeqSet, name: bytes, uid: int = 0, move: bool = False
    ) -> Any:
        mbox = self.mbox
        if move and not mbox.is_writeable():
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        folder_name = mailbox_name(name)
        seqs = resolve(messages, mbox.uids, bool(uid))
        try:
            target = yield self.factory.store.open_folder(self._user, folder_name)
        except NotSelectable as e:  # a name that holds only folders: creating it would not help
            self.sendNegativeResponse(tag, str(e).encode())
            return
        except FolderError:
            self.sendNegativeResponse(tag, b"[TRYCREATE] Mailbox doesn't exist")
            return
        src_uids, dst_uids = [], []
        try:
            size = sum(mbox.infos[seq - 1].size for seq in seqs)
            if not move and (yield quota_refuses(self, tag, size)):  # RFC 9208 4.3
                return
            for seq in seqs:
                info = mbox.infos[seq - 1]
                try:
                    source = yield self._run(
                        _crlf_to_lf_source, mbox.folder, info.uid, self.factory.spool_dir
                    )
                except KeyError:
                    continue
                try:
                    new_uid = yield target.append(source, info.flags, info.internal_date)
                finally:
                    source.discard()
                src_uids.append(info.uid)
                dst_uids.append(new_uid)
            validity = target.uid_validity
            into_selected = target.name == mbox.folder.name
        finally:
            target.close()
        code = b""
        if src_uids:
            code = b"[COPYUID %d %s %s] " % (validity, uid_set(src_uids), uid_set(dst_uids))
        if move:
            if code:
                self.sendUntaggedResponse(b"OK " + code + b"Moved")
            removed = yield mbox.folder.expunge(src_uids) if src_uids else defer.succeed([])
            out = self._expunged_lines(removed)
            mbox.reload()
            if out:
                self.transport.write(out)
            if into_selected or self.qresync:
                # the copies: EXISTS before the client may name them; after QRESYNC,
                # the view caught up, so that the HIGHESTMODSEQ told covers nothing untold
                yield self._sync()
            self.sendPositiveResponse(tag, self._highest_code(mbox) + b"MOVE completed")
        else:
            if into_selected:
                # RFC 3501 6.4.7 and 7.3.1: EXISTS (and RECENT) before the client may name them
                yield self._sync()
            self.sendPositiveResponse(tag, code + b"COPY completed")
        self._filed(mbox.folder.name, folder_name, dst_uids)

    def _filed(self, source: str, target: str, uids: list[int]) -> None:
        """After the answer: into or out of Junk trains the spam filter (mailsrv.filter.learn)."""
        training = self.factory.training
        if training is not None and uids and self._user is not None:
            training.filed(self._user, source, target, uids)

    def do_MOVE(self, tag: bytes, messages: SeqSet, name: bytes, uid: int = 0) -> None:
        self.do_COPY(tag, messages, name, uid, True)

    select_COPY = (do_COPY, arg_seqset, arg_finalastring)  # type: ignore[assignment]
    select_MOVE = (do_MOVE, arg_seqset, arg_finalastring)

    @command
    def do_SEARCH(
        self,
        tag: bytes,
        options: frozenset[str] | None,
        charset: str,
        tokens: list[Any],
        uid: int = 0,
    ) -> Any:
        mbox = self.mbox
        options = rev2.search_options(self, options)  # RFC 9051 6.4.4: ESEARCH
        save = options is not None and "SAVE" in options
        try:
            tree = parse(tokens, charset, self.saved_uids())
        except BadCharset:
            if save:  # RFC 5182 2.1: a SEARCH with SAVE answered NO empties "$"
                self._saved_search = None
            raise
        infos = mbox.infos  # replaced, never changed, by a reload: safe to walk in a thread
        last_uid = mbox.uids[-1] if mbox.uids else 0
        matcher = Matcher(
            tree,
            len(infos),
            last_uid,
            # \\Recent: RECENT, NEW, OLD (a copy: the thread reads it; 100k where all are new)
            set(mbox.recent) if uses_recent(tree) else set(),
            lambda raw, last: Spans(SeqSet(raw).ranges(last)),
        )
        folder = mbox.folder
        with_modseq = uses_modseq(tree)
        if with_modseq:  # RFC 7162 3.1: a CONDSTORE enabling command
            self.transport.write(condstore.enable(self))

        def run() -> tuple[array, array, array]:
            return found(matcher, folder, infos, bool(uid), save, with_modseq)

        if len(infos) > SEARCH_INLINE_UP_TO or not matcher.index_only:
            # a pool thread: the matcher and C{infos} are this search's own
            hits, hit_uids, modseqs = yield self._run(run)
        else:
            hits, hit_uids, modseqs = run()
        if self._lost:
            return
        if save and options is not None:
            self._save_result(mbox, options, hit_uids)
        if options is not None and "UPDATE" in options:  # RFC 5267 4.3
            self._open_context(
                tag, bool(uid), tree, hits if uid else [mbox.uids[s - 1] for s in hits]
            )
        if options is None:
            # RFC 7162 3.1.5: the highest mod-sequence of the found messages ends it
            top = b" (MODSEQ %d)" % max(modseqs) if modseqs else b""
            self.sendUntaggedResponse(b"SEARCH" + number_list(hits) + top)
        elif answers(options):
            self.sendUntaggedResponse(esearch_line(tag, bool(uid), options, hits, modseqs))
        self.sendPositiveResponse(tag, b"SEARCH completed")

    select_SEARCH = (  # type: ignore[assignment]
        do_SEARCH,
        arg_search_return,
        CommandParser.opt_charset,
        CommandParser.arg_searchkeys,
    )

    def _save_result(
        self, mbox: SessionMailbox, options: frozenset[str], found: Sequence[int]
    ) -> None:
        """
        SAVE (RFC 5182 2.1): keep the UIDs C{found} in C{mbox} (or, 2.4, those
        MIN/MAX name) as "$", for that selection of the mailbox only.
        """
        self._saved_search = (weakref.ref(mbox), sorted(saved_part(options, found)))

    def saved_uids(self) -> Sequence[int]:
        """The UIDs C{$} names (ascending): those saved in the mailbox as now selected."""
        saved = self._saved_search
        if saved is None or self.mbox is None or saved[0]() is not self.mbox:
            return ()  # RFC 5182 2.1: empty before a SAVE and after SELECT or EXAMINE
        return saved[1]

    def saved_result(self) -> SavedResult:
        """C{$} as a sequence set (L{SavedResult})."""
        return SavedResult(self.saved_uids())

    def do_UID(self, tag: bytes, command: bytes, line: bytes) -> None:
        command = command.upper()
        if command == b"EXPUNGE":
            seqset, rest = self.arg_seqset(line)
            if rest:
                raise imap4.IllegalClientResponse("Too many arguments")
            self.do_EXPUNGE(tag, seqset)
            return
        if command not in (b"COPY", b"FETCH", b"STORE", b"SEARCH", b"MOVE"):
            raise imap4.IllegalClientResponse("Invalid UID command")
        self.dispatchCommand(tag, command, line, uid=1)

    select_UID = (do_UID, twistedcompat.arg_atom, twistedcompat.arg_line)  # type: ignore[assignment]


def _crlf_to_lf_source(folder: Any, uid: int, spool_dir: Any) -> SpooledSource:
    """Copy a stored message (CRLF) into a new spooled source (LF). Runs in a thread."""
    source = SpooledSource(spool_dir)
    carry = b""
    with folder.open_message(uid) as f:
        while True:
            chunk = f.read(256 * 1024)
            if not chunk:
                break
            chunk = carry + chunk
            carry = b""
            if chunk.endswith(b"\r"):
                chunk, carry = chunk[:-1], b"\r"
            source.write(chunk.replace(b"\r\n", b"\n"))
    if carry:
        source.write(carry)
    source.finish()
    return source


def found(
    matcher: Matcher,
    folder: Any,
    infos: Sequence[MessageInfo],
    by_uid: bool,
    save: bool,
    with_modseq: bool,
) -> tuple[array, array, array]:
    """
    The numbers (UIDs if C{by_uid}) of the messages of C{infos} that C{matcher}
    accepts, their UIDs if C{save}, their mod-sequences if C{with_modseq}
    (8 bytes a hit, not an int object each). A program that needs only the
    index is evaluated over the whole view at once (L{Matcher.mask}).
    """
    mask = matcher.mask(infos)
    if mask is not None:
        cols = columns(infos)
        return (
            pick(mask, cols.uids if by_uid else None),
            pick(mask, cols.uids) if save else array("q"),
            pick(mask, cols.modseqs) if with_modseq else array("q"),
        )
    hits, hit_uids, modseqs = array("q"), array("q"), array("q")
    for seq, info in matching(matcher, folder, infos):
        hits.append(info.uid if by_uid else seq)
        if save:
            hit_uids.append(info.uid)
        if with_modseq:
            modseqs.append(info.modseq)
    return hits, hit_uids, modseqs


def matching(matcher: Any, folder: Any, infos: Sequence[MessageInfo]) -> Iterator[tuple[int, Any]]:
    """
    (sequence number, info) of each message C{matcher} accepts, reading its
    header and body from C{folder} only when the search needs them (a pool
    thread then); a message gone from the disk is skipped (the next refresh
    tells the client).
    """
    if matcher.index_only:
        test = matcher.test
        for seq, info in enumerate(infos, 1):
            if test(seq, info, None):
                yield seq, info
        return
    for seq, info in enumerate(infos, 1):
        try:
            if matcher.match(
                seq,
                info,
                functools.partial(folder.read_headers, info.uid),
                functools.partial(_search_body, folder, info),
            ):
                yield seq, info
        except KeyError:
            continue


def _search_body(folder: Any, info: MessageInfo) -> Any:
    """The message for BODY/TEXT search: bytes if small, else a chunk-iterator factory."""
    if info.size <= SEARCH_WHOLE_UP_TO:
        return _read_all(folder, info.uid)

    def chunks() -> Any:
        with folder.open_message(info.uid) as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    return
                yield chunk

    return chunks


def _read_all(folder: Any, uid: int) -> bytes:
    with folder.open_message(uid) as f:
        return f.read()


def _deleted_uids(mbox: SessionMailbox) -> list[int]:
    """UIDs of the messages flagged \\Deleted (without making a MessageInfo for each)."""
    return [u for u, f in zip(mbox.uids, flag_sets(mbox.infos), strict=True) if DELETED in f]
