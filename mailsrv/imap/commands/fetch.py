"""
FETCH (RFC 3501 6.4.5): marks what is read \\Seen, then writes the responses
as the client reads them. Items held in memory are formatted on the reactor
thread; the rest is prepared in batches in the thread pool (the next batch
read while this one is written) and large section octets are streamed from
the file. Envelopes and MIME structures are cached across sessions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer

from mailsrv.imap import binary, condstore
from mailsrv.imap.account import SessionMailbox
from mailsrv.imap.commands.base import CommandBase, command
from mailsrv.imap.fetch import FetchRequest, Stream
from mailsrv.imap.fetchindex import IndexFetch
from mailsrv.imap.fetchitems import (
    Refusal,
    prepare_batch,
)
from mailsrv.imap.parsing import CommandParser, SeqSet, resolve
from mailsrv.imap.responses import flag_list
from mailsrv.interfaces import SEEN
from mailsrv.session import OutputFlow
from mailsrv.spool import disk_full

# Messages a FETCH of index items only formats between two turns of the reactor.
INDEX_BATCH = 2000


class BoundedCache:
    """A least-recently-used map with a size bound (envelopes, MIME structures)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._limit:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class FetchCommand(CommandBase):
    """FETCH and UID FETCH."""

    def do_FETCH(self, tag: bytes, messages: SeqSet, req: FetchRequest, uid: int = 0) -> None:
        self._fetch(tag, messages, req, uid)

    select_FETCH = (do_FETCH, CommandParser.arg_seqset, CommandParser.arg_fetchatt)  # type: ignore[assignment]

    @command
    def _fetch(self, tag: bytes, messages: SeqSet, req: FetchRequest, uid: int = 0) -> Any:
        mbox = self.mbox
        seqs = resolve(messages, mbox.uids, bool(uid))
        items: list[Any] = list(req.order)
        if uid and "UID" not in items:
            items.insert(0, "UID")
        mods = req.modifiers
        if mods.vanished and not uid:
            self.sendBadResponse(tag, b"VANISHED only with UID FETCH")  # RFC 7162 3.2.6
            return
        if mods.vanished and not self.qresync:
            self.sendBadResponse(tag, b"QRESYNC not enabled")  # as Dovecot
            return
        if "MODSEQ" in items:  # RFC 7162 3.1: a CONDSTORE enabling command
            self.transport.write(condstore.enable(self))
        if mods.changed_since is not None:
            seqs = yield self._changed_since(mbox, seqs, mods.changed_since)
            if mods.vanished:
                yield self._vanished_since(mbox, messages, mods.changed_since)
            if mbox is not self.mbox or self._lost:
                return
        seen_now: set[int] = set()
        if req.marks_seen and mbox.is_writeable():
            unseen = []
            for seq in seqs:
                info = mbox.infos[seq - 1]
                if SEEN not in info.flags:
                    unseen.append(info.uid)
            if unseen:
                try:
                    # on the flags as they are now, with other sessions' changes
                    now = yield mbox.folder.change_flags(unseen, (SEEN,))
                except Exception as e:
                    if not disk_full(e):
                        raise
                    # The message is still read on a full disk, only not marked \Seen.
                    self.log.warn("FETCH: cannot set \\Seen: {error}", error=str(e))
                else:
                    seen_now = set(now)
                    self.transport.write(self._flags_news(now.values()))
                mbox.reload()
        try:
            missing = yield self._fetch_loop(mbox, seqs, items, req, seen_now)
        except Exception:
            # Part of a response may be on the wire: the session cannot go on.
            self.log.failure("FETCH failed mid-response; closing the connection")
            if not self._lost:
                self.sendLine(b"* BYE Internal error")
                self.transport.loseConnection()
            return
        if self._lost:
            return
        # RFC 7162 3.2: MODSEQ told past an expunge not told yet
        told = (mbox.infos[s - 1].modseq for s in seqs) if "MODSEQ" in items or seen_now else ()
        delayed = yield condstore.delayed_expunge_line(self, mbox, told)
        if mbox is not self.mbox or self._lost:
            return
        self.transport.write(delayed)
        if isinstance(missing, Refusal):
            self.sendNegativeResponse(tag, missing.text)
        elif missing:
            self.sendNegativeResponse(tag, b"[EXPUNGEISSUED] Some messages no longer exist")
        else:
            self.sendPositiveResponse(tag, b"FETCH completed")

    @defer.inlineCallbacks
    def _changed_since(self, mbox: SessionMailbox, seqs: Sequence[int], modseq: int) -> Any:
        """
        CHANGEDSINCE (RFC 7162 3.1.4.1): those of C{seqs} whose modseq in the
        view is above C{modseq}, found from the store's changes (work in
        proportion to them, not to the folder).
        """
        changed = yield mbox.folder.changed_since(modseq)
        wanted = seqs if isinstance(seqs, range) else set(seqs)
        out = []
        for u, _modseq, _flags in changed:
            seq = mbox.seq_of(u)
            if seq is not None and seq in wanted and mbox.infos[seq - 1].modseq > modseq:
                out.append(seq)
        return sorted(out)

    @defer.inlineCallbacks
    def _vanished_since(self, mbox: SessionMailbox, messages: SeqSet, modseq: int) -> Any:
        """
        UID FETCH's VANISHED modifier (RFC 7162 3.2.6): C{* VANISHED (EARLIER)}
        for the UIDs of the set expunged since C{modseq}; those the store no
        longer knows of are all the set's UIDs the view does not hold.
        """
        expunged = yield mbox.folder.vanished_since(modseq)
        uids = mbox.uids
        # RFC 7162 3.2.6: not a message appended since the view caught up
        top = max(self.view_uid_next - 1, uids[-1] if uids else 0)
        within = condstore.normal_ranges(messages, top)
        gone = condstore.vanished_earlier(uids, expunged, within, below=top + 1)
        line = condstore.vanished_line(gone, True)
        if line and not self._lost:
            self.transport.write(line)

    @defer.inlineCallbacks
    def _fetch_loop(
        self,
        mbox: SessionMailbox,
        seqs: Sequence[int],
        items: list[Any],
        req: FetchRequest,
        seen_now: set[int],
    ) -> Any:
        factory = self.factory
        flow = OutputFlow()
        self.transport.registerProducer(flow, True)
        missing = 0
        key = (self._user, mbox.folder.name, mbox.folder.uid_validity)
        pending: Any = None
        try:
            if not req.needs_disk:
                # Only the index is read (nothing is marked \\Seen: only sections do that).
                lines = IndexFetch(items)
                for start in range(0, len(seqs), INDEX_BATCH):
                    chunk = seqs[start : start + INDEX_BATCH]
                    self.transport.write(lines.lines(mbox.infos, chunk, mbox.recent))
                    yield flow.wait()
                    if self._lost or flow.stopped:
                        return missing
                    if start + INDEX_BATCH < len(seqs):
                        yield factory.cooperate()
                return missing
            need_structure = req.needs_structure
            batch = 200 if need_structure or req.sections else 500
            its = items
            if seen_now:
                its = items + self._seen_extra(items)
            memory_only = not need_structure and not req.sections

            def submit(start: int) -> tuple[list[Any], defer.Deferred]:
                job = []
                for seq in seqs[start : start + batch]:
                    info = mbox.infos[seq - 1]
                    env = factory.envelopes.get(key + (info.uid,))
                    root = factory.structures.get(key + (info.uid,)) if need_structure else None
                    job.append((seq, info, flag_list(mbox.flags_of(info)), env, root))
                if memory_only and all(j[3] is not None for j in job):
                    # Everything is cached: format here, no trip to a thread.
                    return job, factory.cooperate().addCallback(
                        lambda _: prepare_batch(mbox.folder, job, its, False)
                    )
                return job, self._run(prepare_batch, mbox.folder, job, its, need_structure)

            # The next batch is read while this one is written.
            pending = submit(0) if seqs else None
            for start in range(0, len(seqs), batch):
                job, d = pending
                results = yield d
                pending = submit(start + batch) if start + batch < len(seqs) else None
                if self._lost:
                    return missing
                buf: list[bytes] = []
                for (_seq, info, *_), result in zip(job, results, strict=True):
                    if result is None:
                        missing += 1
                        continue
                    pieces, new_env, new_root = result
                    if new_env is not None:
                        factory.envelopes.put(key + (info.uid,), new_env)
                    if new_root is not None:
                        factory.structures.put(key + (info.uid,), new_root)
                    for piece in pieces:
                        if isinstance(piece, Refusal):
                            # RFC 3516 4.2: the command ends here with a NO.
                            self.transport.write(b"".join(buf))
                            return piece
                        if isinstance(piece, Stream):
                            self.transport.write(b"".join(buf))
                            buf = []
                            yield self._stream(mbox.folder, piece, flow)
                            if self._lost or flow.stopped:
                                return missing
                        else:
                            buf.append(piece)
                self.transport.write(b"".join(buf))
                yield flow.wait()
                if self._lost or flow.stopped:
                    return missing
            return missing
        finally:
            if pending is not None:
                pending[1].addErrback(lambda _: None)  # abandoned read-ahead
            if not self._lost:
                self.transport.unregisterProducer()

    def _seen_extra(self, items: list[Any]) -> list[str]:
        """
        The items a message made \\Seen by this FETCH gets too: FLAGS, and
        once CONDSTORE is enabled MODSEQ (RFC 7162 3.1), after QRESYNC UID (3.2.4).
        """
        extra = [i for i in ("FLAGS",) if i not in items]
        if self.condstore and "MODSEQ" not in items:
            extra.append("MODSEQ")
        if self.qresync and "UID" not in items:
            extra.insert(0, "UID")
        return extra

    def _stream(self, folder: Any, s: Stream, flow: OutputFlow) -> defer.Deferred:
        if s.blocks is not None:
            blocks = list(s.blocks)
            opener = lambda: binary.open_section(folder, s.uid, blocks)  # noqa: E731
        else:
            opener = lambda: folder.open_message(s.uid)  # noqa: E731
        return self._send_file_range(opener, s.start, s.end - s.start, flow)  # type: ignore[no-any-return]
