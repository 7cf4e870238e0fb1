"""
Commands on mailboxes, valid once logged in (RFC 3501 6.3): SELECT, EXAMINE,
CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST (with LIST-EXTENDED and
LIST-STATUS, RFC 5258 and 5819: L{mailsrv.imap.listext}), LSUB, STATUS
(APPEND: L{mailsrv.imap.commands.append}).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer

from mailsrv.imap import condstore, listext, mutf7, rev2, twistedcompat
from mailsrv.imap.account import list_pattern
from mailsrv.imap.commands.base import CommandBase, command
from mailsrv.imap.condstore import SelectParams
from mailsrv.imap.listext import ListRequest
from mailsrv.imap.parsing import CommandParser, mailbox_name
from mailsrv.imap.responses import flag_list, list_lines
from mailsrv.interfaces import SEEN, FolderError, NotSelectable
from mailsrv.session import OutputFlow
from mailsrv.store.infos import flag_sets
from mailsrv.store.names import DELIMITER, INBOX

_LIST_PIECE = 500  # LIST/LSUB lines written at a time
# The LIST wildcards (RFC 3501 6.3.8) in a name would make it one that no
# pattern can name alone: refused, as RFC 3501 5.1 advises.
_WILDCARD_REFUSED = b"[CANNOT] Mailbox names must not contain the wildcards % and *"
_STATUS_ITEMS = listext.STATUS_ITEMS

arg_astring = CommandParser.arg_astring
arg_finalastring = CommandParser.arg_finalastring


def _has_wildcard(name: str) -> bool:
    return "%" in name or "*" in name


class MailboxCommands(CommandBase):
    """SELECT, EXAMINE, CREATE, DELETE, RENAME, (UN)SUBSCRIBE, LIST, LSUB, STATUS."""

    @command
    def do_SELECT(
        self, tag: bytes, name: bytes, params: SelectParams | None = None, rw: bool = True
    ) -> Any:
        if self.mbox is not None:
            # RFC 7162 3.2.11: what follows is of the mailbox now selected (sent
            # whenever one is replaced, as Dovecot does, ENABLE QRESYNC or not)
            self._close_mailbox()
            self.sendUntaggedResponse(b"OK [CLOSED] Previous mailbox closed.")
        self.state = twistedcompat.AUTH
        qresync = params.qresync if params is not None else None
        if qresync is not None and not self.qresync:
            self.sendBadResponse(tag, b"QRESYNC not enabled")  # RFC 7162 3.2.5
            return
        folder_name = mailbox_name(name)
        try:
            mbox = yield self.account.select(folder_name, rw)
        except NotSelectable as e:
            self.sendNegativeResponse(tag, str(e).encode())
            return
        except FolderError:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] Mailbox doesn't exist")
            return
        if self._lost:
            mbox.close()
            return
        self.mbox = mbox
        # RFC 7162 3.1.2.1: the HIGHESTMODSEQ of the view just taken, read before
        # anything waits (the store may move on meanwhile; the view does not)
        view_modseq, view_uid_next = mbox.folder.highest_modseq, mbox.folder.uid_next
        mbox.folder.add_listener(self._folder_changed)
        yield self._claim_recent(mbox)
        flags = self._defined_flags(mbox)
        first_unseen = next(
            (i for i, f in enumerate(flag_sets(mbox.infos), 1) if SEEN not in f), None
        )
        if params is not None and params.condstore:
            self.condstore = True  # RFC 7162 3.1.8
        listed = b""
        if self.rev2:  # RFC 9051 6.3.2
            listed = yield rev2.select_list(self, mbox.folder.name)
            if mbox is not self.mbox or self._lost:
                return
        resync = b""
        if qresync is not None:
            resync = yield condstore.resync(
                mbox, qresync, lambda info: flag_list(mbox.flags_of(info)), view_uid_next
            )
            if mbox is not self.mbox or self._lost:
                return
        self.sendUntaggedResponse(b"FLAGS " + flag_list(flags))
        permanent = [*flags, "\\*"] if mbox.is_writeable() else []
        self.sendUntaggedResponse(
            b"OK [PERMANENTFLAGS " + flag_list(permanent) + b"] Flags permitted"
        )
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.message_count())
        if not self.rev2:  # RFC 9051 7.4: RECENT is obsolete in rev2
            self.sendUntaggedResponse(b"%d RECENT" % mbox.recent_count())
        if first_unseen is not None and not self.rev2:  # RFC 9051 6.3.2: not in rev2
            self.sendUntaggedResponse(b"OK [UNSEEN %d] First unseen" % first_unseen)
        self.sendUntaggedResponse(b"OK [UIDVALIDITY %d] UIDs valid" % mbox.uid_validity())
        self.sendUntaggedResponse(b"OK [UIDNEXT %d] Predicted next UID" % mbox.uid_next())
        self.transport.write(listed)
        # RFC 7162 3.1.2.1: with every successful SELECT or EXAMINE
        self.view_modseq, self.view_uid_next = view_modseq, view_uid_next
        self.transport.write(condstore.highest_line(self.view_modseq) + resync)
        self.state = twistedcompat.SELECTED
        mode = b"[READ-WRITE]" if mbox.is_writeable() else b"[READ-ONLY]"
        self.sendPositiveResponse(tag, mode + (b" SELECT" if rw else b" EXAMINE") + b" completed")

    def do_EXAMINE(self, tag: bytes, name: bytes, params: SelectParams | None = None) -> None:
        self.do_SELECT(tag, name, params, False)

    auth_SELECT = select_SELECT = (do_SELECT, arg_astring, condstore.arg_select_params)  # type: ignore[assignment]
    auth_EXAMINE = select_EXAMINE = (do_EXAMINE, arg_astring, condstore.arg_select_params)  # type: ignore[assignment]

    @command
    def do_CREATE(self, tag: bytes, name: bytes) -> Any:
        folder = mailbox_name(name)
        # RFC 3501 6.3.3: a trailing delimiter declares that the name is to
        # hold names below it; the store makes it one that holds only those.
        base = folder[:-1] if folder.endswith(DELIMITER) else folder
        if base.upper() == INBOX:
            self.sendNegativeResponse(tag, b"[ALREADYEXISTS] INBOX always exists")
            return
        if _has_wildcard(base):
            self.sendNegativeResponse(tag, _WILDCARD_REFUSED)
            return
        refused = rev2.refused_name(self, base)
        if refused is not None:
            self.sendNegativeResponse(tag, refused)
            return
        yield self.account.create(folder)
        self.sendPositiveResponse(tag, b"CREATE completed")

    auth_CREATE = select_CREATE = (do_CREATE, arg_finalastring)  # type: ignore[assignment]

    @command
    def do_DELETE(self, tag: bytes, name: bytes) -> Any:
        folder = mailbox_name(name)
        if folder == INBOX:
            self.sendNegativeResponse(tag, b"INBOX cannot be deleted")
            return
        if self.mbox is not None and self.mbox.folder.name == folder:
            self._close_mailbox()
            self.state = twistedcompat.AUTH
        yield self.account.delete(folder)
        self.sendPositiveResponse(tag, b"DELETE completed")

    auth_DELETE = select_DELETE = (do_DELETE, arg_finalastring)  # type: ignore[assignment]

    @command
    def do_RENAME(self, tag: bytes, old: bytes, new: bytes) -> Any:
        src, dst = mailbox_name(old), mailbox_name(new)
        if dst == INBOX:
            self.sendNegativeResponse(tag, b"Cannot rename to INBOX")
            return
        if _has_wildcard(dst):
            self.sendNegativeResponse(tag, _WILDCARD_REFUSED)
            return
        refused = rev2.refused_name(self, dst)
        if refused is not None:
            self.sendNegativeResponse(tag, refused)
            return
        if src != INBOX and (dst == src or dst.startswith(src + DELIMITER)):
            # RFC 3501 6.3.5: a mailbox cannot become its own inferior (INBOX
            # can: its messages move, its inferiors stay). RFC 5530 3: CANNOT.
            self.sendNegativeResponse(tag, b"[CANNOT] Cannot rename a mailbox into itself")
            return
        yield self.account.rename(src, dst)
        self.sendPositiveResponse(tag, b"RENAME completed")

    auth_RENAME = select_RENAME = (do_RENAME, arg_astring, arg_finalastring)  # type: ignore[assignment]

    @command
    def do_SUBSCRIBE(self, tag: bytes, name: bytes) -> Any:
        yield self.account.subscribe(mailbox_name(name))
        self.sendPositiveResponse(tag, b"SUBSCRIBE completed")

    auth_SUBSCRIBE = select_SUBSCRIBE = (do_SUBSCRIBE, arg_finalastring)  # type: ignore[assignment]

    @command
    def do_UNSUBSCRIBE(self, tag: bytes, name: bytes) -> Any:
        yield self.account.unsubscribe(mailbox_name(name))
        self.sendPositiveResponse(tag, b"UNSUBSCRIBE completed")

    auth_UNSUBSCRIBE = select_UNSUBSCRIBE = (do_UNSUBSCRIBE, arg_finalastring)  # type: ignore[assignment]

    @command
    def do_LIST(self, tag: bytes, request: ListRequest) -> Any:
        request = rev2.list_request(self, request)
        if request.extended:
            yield self._list_extended(tag, request)
        else:
            yield self._list(tag, request.ref, request.patterns[0], False)

    @command
    def do_LSUB(self, tag: bytes, ref: bytes, pattern: bytes) -> Any:
        yield self._list(tag, ref, pattern, True)

    auth_LIST = select_LIST = (do_LIST, listext.arg_list)  # type: ignore[assignment]
    auth_LSUB = select_LSUB = (do_LSUB, arg_astring, arg_finalastring)  # type: ignore[assignment]

    @defer.inlineCallbacks
    def _list(self, tag: bytes, ref: bytes, pattern: bytes, lsub: bool) -> Any:
        """LIST and LSUB of RFC 3501 (6.3.8, 6.3.9)."""
        cmd = b"LSUB" if lsub else b"LIST"
        try:
            ref_s, pat_s = mutf7.decode(ref), mutf7.decode(pattern)
        except mutf7.InvalidName:
            # RFC 3501 5.1.3: no mailbox has a name that is not modified
            # UTF-7, so nothing matches (a legal astring is never a BAD).
            self.sendPositiveResponse(tag, cmd + b" completed")
            return
        if not pat_s and not lsub:
            # RFC 3501 6.3.8: the delimiter and root name.
            self.sendUntaggedResponse(b'LIST (\\Noselect) "/" ""')
            self.sendPositiveResponse(tag, b"LIST completed")
            return
        if lsub:
            # As the file has them now: other sessions of the user may have
            # changed them since this one last read or wrote it.
            boxes = yield self.account.lsub_entries(ref_s, pat_s)
        else:
            boxes = yield self.account.listMailboxes(ref_s, pat_s)
        if self._lost:
            return
        lines = list_lines(cmd, boxes, None, self.encode_name)
        if (yield self._write_lines(lines)):
            self.sendPositiveResponse(tag, cmd + b" completed")

    @defer.inlineCallbacks
    def _write_lines(self, lines: Iterable[bytes], status: Any = None) -> Any:
        """
        Write the untagged lines (without "* ") a piece at a time, as the
        client reads (tens of thousands of them); each piece first goes
        through C{status} (a piece -> Deferred of the piece), if given.
        Fires with whether the session is still there to be answered.
        """
        flow = OutputFlow()
        self.transport.registerProducer(flow, True)
        try:
            it = iter(lines)
            while piece := list(itertools.islice(it, _LIST_PIECE)):
                if status is not None:
                    piece = yield status(piece)
                    if self._lost:
                        return False
                self.transport.write(b"".join(b"* " + line + b"\r\n" for line in piece))
                yield flow.wait()
                if self._lost or flow.stopped:
                    return False
                yield self.factory.cooperate()
        finally:
            if not self._lost:
                self.transport.unregisterProducer()
        return True

    @defer.inlineCallbacks
    def _list_extended(self, tag: bytes, request: ListRequest) -> Any:
        """LIST with selection or return options or several patterns (RFC 5258, 5819, 6154)."""
        patterns = []
        for raw in request.patterns:
            try:
                patterns.append(list_pattern(mutf7.decode(request.ref) + mutf7.decode(raw)))
            except mutf7.InvalidName:
                continue  # RFC 3501 5.1.3: no name matches it
        entries: list[listext.ListEntry] = []
        if patterns:
            account = self.account
            if request.want_subscribed:
                yield account.subscriptions.load()  # as other sessions left them
            folders = yield self.factory.store.list_folders(self._user)
            special = {n: use for n in account.special_folders if (use := account.special_use(n))}
            entries = yield self._run(
                listext.select_entries,
                request,
                patterns,
                folders,
                set(account.subscriptions.names),
                special,
                bool(self.factory.store.mail_folders_hold_folders),
            )
        if self._lost:
            return
        lines = (
            b"LIST "
            + flag_list(list(e.flags))
            + b' "/" '
            + self.encode_name(e.name)
            + listext.childinfo_data(e)
            for e in entries
        )
        by_line = iter(entries)

        def with_status(piece: list[bytes]) -> defer.Deferred:
            return self._with_status(request, piece, [next(by_line) for _ in piece])

        if (yield self._write_lines(lines, with_status if request.status else None)):
            self.sendPositiveResponse(tag, b"LIST completed")

    @defer.inlineCallbacks
    def _with_status(
        self, request: ListRequest, piece: list[bytes], entries: list[listext.ListEntry]
    ) -> Any:
        """
        The LIST lines of C{piece} each followed by its mailbox's STATUS line
        (RFC 5819 2), from the store's STATUS (the folder's index where it is
        up to date); none for a name that cannot be selected, or whose status
        cannot be had now (RFC 5819 2: it MAY be left out).
        """
        store = self.factory.store

        def one(entry: listext.ListEntry) -> defer.Deferred:
            if not entry.selectable:
                return defer.succeed(None)
            d = defer.maybeDeferred(store.folder_status, self._user, entry.name)
            return d.addErrback(lambda f: None if f.check(FolderError) else f)

        found = yield defer.gatherResults([one(e) for e in entries], consumeErrors=True)
        out = []
        for line, entry, st in zip(piece, entries, found, strict=True):
            out.append(line)
            if st is not None:
                items = listext.status_items(request, st)
                out.append(b"STATUS " + self.encode_name(entry.name) + b" (" + items + b")")
        return out

    @command
    def do_STATUS(self, tag: bytes, name: bytes, names: list[Any]) -> Any:
        folder = mailbox_name(name)
        wanted = [
            n.decode("ascii", "replace").upper() if isinstance(n, bytes) else str(n).upper()
            for n in names
        ]
        bad = [n for n in wanted if n not in _STATUS_ITEMS]
        if bad or not wanted:
            self.sendBadResponse(tag, b"Unknown STATUS item")
            return
        if "HIGHESTMODSEQ" in wanted:  # RFC 7162 3.1: a CONDSTORE enabling command
            self.transport.write(condstore.enable(self))
        try:
            st = yield self.factory.store.folder_status(self._user, folder)
        except NotSelectable as e:
            self.sendNegativeResponse(tag, str(e).encode())
            return
        except FolderError:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] Mailbox doesn't exist")
            return
        values = {
            "MESSAGES": st["messages"],
            "RECENT": st["recent"],
            "UIDNEXT": st["uid_next"],
            "UIDVALIDITY": st["uid_validity"],
            "UNSEEN": st["unseen"],
            "HIGHESTMODSEQ": st["highest_modseq"],  # RFC 7162 3.1.6
            "DELETED": st["deleted"],  # RFC 9051 6.3.11
            "SIZE": st["size"],  # RFC 9051 6.3.11, RFC 8438
        }
        items = b" ".join(b"%s %d" % (n.encode(), values[n]) for n in wanted)
        self.sendUntaggedResponse(b"STATUS " + self.encode_name(folder) + b" (" + items + b")")
        self.sendPositiveResponse(tag, b"STATUS completed")

    auth_STATUS = select_STATUS = (do_STATUS, arg_astring, twistedcompat.arg_plist)  # type: ignore[assignment]
