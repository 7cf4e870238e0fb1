"""
Contexts (RFC 5267 4) in the session: SEARCH and SORT with UPDATE leave a
live result (L{mailsrv.imap.context}) for the selected mailbox, told of
the messages that arrive, change flags or go; CANCELUPDATE ends one.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet import defer

from mailsrv.imap import mime, twistedcompat
from mailsrv.imap.commands.base import CommandBase
from mailsrv.imap.context import (
    LiveResult,
    LiveResults,
    LiveSortResult,
    depends_on_time,
    pin_numbers,
)
from mailsrv.imap.parsing import SeqSet, SeqSetMembers
from mailsrv.imap.search import Matcher, needs
from mailsrv.imap.sort import Program
from mailsrv.interfaces import MessageInfo

# RFC 5267 4.1 (the return options) and 4.3.5 (CANCELUPDATE).
CAPABILITIES = [b"CONTEXT=SEARCH", b"CONTEXT=SORT"]


class ContextCommands(CommandBase):
    """The live results of the selected mailbox, and CANCELUPDATE."""

    # The live results, and the selection of the mailbox they belong to.
    _live: tuple[weakref.ref, LiveResults] | None = None

    def _live_results(self, create: bool = False) -> LiveResults | None:
        """The live results of the mailbox as now selected (None: none)."""
        live, mbox = self._live, self.mbox
        if live is not None and mbox is not None and live[0]() is mbox:
            return live[1]
        self._live = None  # another selection's, or none
        if not create or mbox is None:
            return None
        results = LiveResults()
        self._live = (weakref.ref(mbox), results)
        return results

    def update_tag_in_use(self, tag: bytes | None) -> bool:
        """RFC 5267 4.3: an UPDATE under the tag of a live result is a BAD."""
        live = self._live_results()
        return live is not None and tag is not None and tag in live

    def _open_context(
        self,
        tag: bytes,
        uid: bool,
        tree: tuple,
        members: Sequence[int],
        program: Program | None = None,
        keys: list[tuple] | None = None,
    ) -> None:
        """
        UPDATE (RFC 5267 4.3): keep the result of a searching command
        (C{members}: its UIDs; for SORT, C{keys} from L{context.sort_keys})
        live, or refuse with an untagged NO [NOUPDATE] (4.3.1), which the
        other return options do not change.
        """
        mbox = self.mbox
        live = self._live_results(create=True)
        assert live is not None
        size = len(keys) if keys is not None else len(members)
        if not live.room_for(size):
            self.sendUntaggedResponse(b"NO [NOUPDATE " + mime.nstring(tag) + b"] Too many contexts")
            return
        if depends_on_time(tree):  # its result changes as time passes, with no change to tell
            self.sendUntaggedResponse(
                b"NO [NOUPDATE " + mime.nstring(tag) + b"] Search depends on time"
            )
            return
        uids = mbox.uids
        pinned = pin_numbers(tree, uids, lambda raw: SeqSet(raw).ranges(len(uids)))
        matcher = Matcher(
            pinned,
            len(uids),
            uids[-1] if uids else 0,
            mbox.recent,  # the session's own set: it grows as messages arrive
            lambda raw, last: SeqSetMembers(SeqSet(raw), last),
        )
        disk = bool(needs(pinned))
        result: LiveResult
        if program is not None and keys is not None:
            result = LiveSortResult(tag, uid, matcher, disk, program, keys)
        else:
            result = LiveResult(tag, uid, matcher, disk, members)
        live.add(result)

    def _context_removed(self, uids: Iterable[int]) -> bytes:
        live = self._live_results()
        if live is None:
            return b""
        return live.removed(uids, self._number)

    def _context_updates(
        self, added: Iterable[MessageInfo], changed: Iterable[MessageInfo]
    ) -> defer.Deferred:
        live = self._live_results()
        if live is None or not len(live):
            return defer.succeed(b"")  # before C{changed} is walked: it may be long
        mbox = self.mbox
        d = live.changed([*added, *changed], mbox.folder, mbox.seq_of, self._run)

        def failed(failure: Any) -> bytes:
            # The session goes on; the live results may miss this change.
            self.log.failure(
                "updating live search results in {folder}", failure, folder=mbox.folder.name
            )
            return b""

        return d.addErrback(failed)

    def _number(self, uid: int) -> int:
        return self.mbox.seq_of(uid) or 0

    def do_CANCELUPDATE(self, tag: bytes, line: bytes | None) -> None:
        # RFC 5267 5: "CANCELUPDATE" 1*(SP quoted)
        tags = _quoted_list(line or b"")
        if not tags:
            self.sendBadResponse(tag, b"Invalid parameters")
            return
        live = self._live_results()
        for t in tags:
            # As Dovecot: the ones before an unknown tag stay cancelled.
            if live is None or not live.cancel(t):
                self.sendNegativeResponse(tag, b"Unknown tag")
                return
        self.sendPositiveResponse(tag, b"Updates cancelled")

    select_CANCELUPDATE = (do_CANCELUPDATE, twistedcompat.arg_line)


def _quoted_list(line: bytes) -> list[bytes]:
    """The quoted strings of C{line}, space separated; [] if it is anything else."""
    out = []
    rest = line.strip(b" ")
    while rest:
        if rest[:1] != b'"':
            return []
        buf = bytearray()
        i = 1
        while i < len(rest) and rest[i : i + 1] != b'"':
            if rest[i : i + 1] == b"\\":
                i += 1
            buf += rest[i : i + 1]
            i += 1
        if i >= len(rest):
            return []
        out.append(bytes(buf))
        rest = rest[i + 1 :]
        if rest and rest[:1] != b" ":
            return []
        rest = rest.lstrip(b" ")
    return out
