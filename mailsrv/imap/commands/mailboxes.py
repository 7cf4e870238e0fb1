"""
Commands on mailboxes, valid once logged in (RFC 3501 6.3): SELECT, EXAMINE,
CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB, STATUS, APPEND
(with UIDPLUS's APPENDUID, RFC 4315).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from mailsrv.imap import mutf7, twistedcompat
from mailsrv.imap.commands.base import CommandBase, command
from mailsrv.imap.commands.quota import quota_refuses
from mailsrv.imap.parsing import CommandParser, mailbox_name, parse_date_time, parse_flags
from mailsrv.imap.responses import flag_list, list_lines
from mailsrv.imap.utf8append import arg_append_data
from mailsrv.interfaces import SEEN, FolderError, NotSelectable
from mailsrv.session import OutputFlow
from mailsrv.store.infos import flag_sets
from mailsrv.store.names import DELIMITER, INBOX

_LIST_PIECE = 500  # LIST/LSUB lines written at a time
# The LIST wildcards (RFC 3501 6.3.8) in a name would make it one that no
# pattern can name alone: refused, as RFC 3501 5.1 advises.
_WILDCARD_REFUSED = b"[CANNOT] Mailbox names must not contain the wildcards % and *"
_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")

arg_astring = CommandParser.arg_astring
arg_finalastring = CommandParser.arg_finalastring


def _has_wildcard(name: str) -> bool:
    return "%" in name or "*" in name


class MailboxCommands(CommandBase):
    """SELECT, EXAMINE, CREATE, DELETE, RENAME, (UN)SUBSCRIBE, LIST, LSUB, STATUS, APPEND."""

    @command
    def do_SELECT(self, tag: bytes, name: bytes, rw: bool = True) -> Any:
        self._close_mailbox()
        self.state = twistedcompat.AUTH
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
        mbox.folder.add_listener(self._folder_changed)
        yield self._claim_recent(mbox)
        flags = self._defined_flags(mbox)
        first_unseen = next(
            (i for i, f in enumerate(flag_sets(mbox.infos), 1) if SEEN not in f), None
        )
        self.sendUntaggedResponse(b"FLAGS " + flag_list(flags))
        permanent = [*flags, "\\*"] if mbox.is_writeable() else []
        self.sendUntaggedResponse(
            b"OK [PERMANENTFLAGS " + flag_list(permanent) + b"] Flags permitted"
        )
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.message_count())
        self.sendUntaggedResponse(b"%d RECENT" % mbox.recent_count())
        if first_unseen is not None:
            self.sendUntaggedResponse(b"OK [UNSEEN %d] First unseen" % first_unseen)
        self.sendUntaggedResponse(b"OK [UIDVALIDITY %d] UIDs valid" % mbox.uid_validity())
        self.sendUntaggedResponse(b"OK [UIDNEXT %d] Predicted next UID" % mbox.uid_next())
        self.state = twistedcompat.SELECTED
        mode = b"[READ-WRITE]" if mbox.is_writeable() else b"[READ-ONLY]"
        self.sendPositiveResponse(tag, mode + (b" SELECT" if rw else b" EXAMINE") + b" completed")

    def do_EXAMINE(self, tag: bytes, name: bytes) -> None:
        self.do_SELECT(tag, name, False)

    auth_SELECT = select_SELECT = (do_SELECT, arg_astring)  # type: ignore[assignment]
    auth_EXAMINE = select_EXAMINE = (do_EXAMINE, arg_astring)  # type: ignore[assignment]

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
    def do_LIST(self, tag: bytes, ref: bytes, pattern: bytes, lsub: bool = False) -> Any:
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
        lines: Iterable[bytes] = list_lines(cmd, boxes, None)
        # Tens of thousands of lines go out a piece at a time, as the client reads.
        flow = OutputFlow()
        self.transport.registerProducer(flow, True)
        try:
            it = iter(lines)
            while piece := list(itertools.islice(it, _LIST_PIECE)):
                self.transport.write(b"".join(b"* " + line + b"\r\n" for line in piece))
                yield flow.wait()
                if self._lost or flow.stopped:
                    return
                yield self.factory.cooperate()
        finally:
            if not self._lost:
                self.transport.unregisterProducer()
        self.sendPositiveResponse(tag, cmd + b" completed")

    def do_LSUB(self, tag: bytes, ref: bytes, pattern: bytes) -> None:
        self.do_LIST(tag, ref, pattern, True)

    auth_LIST = select_LIST = (do_LIST, arg_astring, arg_finalastring)  # type: ignore[assignment]
    auth_LSUB = select_LSUB = (do_LSUB, arg_astring, arg_finalastring)  # type: ignore[assignment]

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
        }
        items = b" ".join(b"%s %d" % (n.encode(), values[n]) for n in wanted)
        self.sendUntaggedResponse(b"STATUS " + self.encode_name(folder) + b" (" + items + b")")
        self.sendPositiveResponse(tag, b"STATUS completed")

    auth_STATUS = select_STATUS = (do_STATUS, arg_astring, twistedcompat.arg_plist)  # type: ignore[assignment]

    @command
    def do_APPEND(
        self, tag: bytes, name: bytes, flags: list[Any] | None, date: bytes | None, message: Any
    ) -> Any:
        source, _ = message if isinstance(message, tuple) else (message, b"")
        try:
            error = getattr(source, "error", None)
            if error is not None:
                raise error  # the literal could not be spooled (a full disk)
            folder_name = mailbox_name(name)
            flag_set = parse_flags(flags or [])
            when = None if date is None else parse_date_time(date)
            selected = self.mbox is not None and self.mbox.folder.name == folder_name
            if selected:
                target = self.mbox.folder
            else:
                try:
                    target = yield self.factory.store.open_folder(self._user, folder_name)
                except NotSelectable as e:
                    self.sendNegativeResponse(tag, str(e).encode())
                    return
                except FolderError:
                    self.sendNegativeResponse(tag, b"[TRYCREATE] Mailbox doesn't exist")
                    return
            try:
                if (yield quota_refuses(self, tag, source.size)):  # RFC 9208 4.3
                    return
                uid = yield target.append(source, frozenset(flag_set), when)
                validity = target.uid_validity
            finally:
                if not selected:
                    target.close()
        finally:
            source.discard()
        self.log.info(
            "imap append {user} {folder} uid {uid}", user=self._user, folder=folder_name, uid=uid
        )
        if selected:
            yield self._sync()
        self.sendPositiveResponse(tag, b"[APPENDUID %d %d] APPEND completed" % (validity, uid))

    auth_APPEND = select_APPEND = (  # type: ignore[assignment]
        do_APPEND,
        arg_astring,
        twistedcompat.opt_plist,
        twistedcompat.opt_datetime,
        arg_append_data,  # a literal, or RFC 6855 4's UTF8 (literal8)
    )
