"""
What the IMAP command handlers share: the L{command} wrapper that runs a
handler and answers its failure, and the selected mailbox's bookkeeping
(closing it, catching up with changes made by other sessions and telling
the client: EXPUNGE, FETCH FLAGS, EXISTS, RECENT; the \\Recent messages it
is given, RFC 3501 2.3.2; the keywords it was told of, RFC 3501 7.2.6). Flow
control for long responses is L{mailsrv.session.OutputFlow}, shared with
SMTP and POP3.

The command groups are mixins over Twisted's L{imap4.IMAP4Server}: Twisted
supplies the line and literal machinery and the dispatch by state, and
every command it implements, but CAPABILITY and LOGOUT, is replaced so that
store calls are asynchronous and responses byte-exact.
"""

from __future__ import annotations

import bisect
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4

from mailsrv.imap import condstore, rev2
from mailsrv.imap.fetch import FetchSyntaxError, skip
from mailsrv.imap.responses import encode_name, expunge_lines, flag_list
from mailsrv.imap.search import BadCharset, SearchError
from mailsrv.interfaces import SYSTEM_FLAGS, FolderError
from mailsrv.logsafe import SafeLogger
from mailsrv.spool import disk_full

# Octets read from a message file at a time for a literal (FETCH, URLFETCH).
LITERAL_CHUNK = 256 * 1024


def command(fn: Callable[..., Any]) -> Callable[..., None]:
    """Run a command handler (a generator: inlineCallbacks) and answer its failures."""
    gen = inspect.isgeneratorfunction(fn)
    run = defer.inlineCallbacks(fn) if gen else fn

    @functools.wraps(fn)
    def wrapper(self: CommandBase, tag: bytes, *args: Any, **kw: Any) -> None:
        pending = self._sync_d
        if pending is not None:
            d = pending.addBoth(lambda _: None).addCallback(lambda _: run(self, tag, *args, **kw))
        else:
            d = defer.maybeDeferred(run, self, tag, *args, **kw)
        d.addErrback(self._command_failed, tag)

    return wrapper


class CommandBase(imap4.IMAP4Server):
    """
    The state of one IMAP session that the command groups share (set up by
    L{mailsrv.imap.server.IMAPServer}), and the helpers they call.
    """

    log = SafeLogger()
    transport: Any
    callLater: Any
    factory: Any  # the IMAPServerFactory
    mbox: Any = None  # the selected SessionMailbox
    account: Any = None  # the logged-in Account
    _lost: bool
    _user: str | None
    _current_tag: bytes | None
    _idle_tag: bytes | None
    _sync_d: defer.Deferred | None
    _sync_again: bool
    _keywords_told: frozenset[str] = frozenset()  # in the FLAGS the client last had
    # RFC 6855 3: after ENABLE UTF8=ACCEPT, names are UTF-8 both ways, not modified UTF-7.
    utf8_accept = False
    utf8_names = False  # names in UTF-8: after UTF8=ACCEPT or IMAP4rev2 (RFC 9051 5.1)
    # RFC 9051: after ENABLE IMAP4rev2 the session follows rev2 (mailsrv.imap.rev2).
    rev2 = False
    # RFC 7162 3.1: after a CONDSTORE enabling command, untagged FETCH carries MODSEQ;
    # after ENABLE QRESYNC (3.2.3) UID too, and expunges are told by VANISHED.
    condstore = False
    qresync = False
    view_modseq = 0  # the folder's HIGHESTMODSEQ when the session's view last caught up
    view_uid_next = 1  # and its UIDNEXT then: a UID below it the view lacks was expunged

    def encode_name(self, name: str) -> bytes:
        """A mailbox name as this session spells it (L{mailsrv.imap.responses.encode_name})."""
        return encode_name(name, self.utf8_names)

    def sendNegativeResponse(self, tag: Any = None, message: bytes = b"") -> None:
        """A tagged NO; in a rev2 session with its response code (L{rev2.refusal})."""
        super().sendNegativeResponse(tag, rev2.refusal(self, message))

    def _command_failed(self, failure: Any, tag: bytes) -> None:
        if self._lost:
            return
        if failure.check(FolderError):
            self.sendNegativeResponse(tag, str(failure.value).encode("utf-8", "replace"))
        elif failure.check(imap4.IllegalClientResponse, SearchError, FetchSyntaxError):
            self.sendBadResponse(tag, str(failure.value).encode("utf-8", "replace"))
        elif failure.check(BadCharset):
            self.sendNegativeResponse(tag, b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        elif disk_full(failure.value):
            self.log.error("IMAP command {tag}: {error}", tag=tag, error=str(failure.value))
            self.sendNegativeResponse(tag, b"[OVERQUOTA] Not enough disk space")  # RFC 5530
        else:
            self.log.failure("IMAP command {tag} failed", failure, tag=tag)
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")

    def _run(self, f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        return self.factory.run(f, *args, **kw)  # type: ignore[no-any-return]

    def _close_mailbox(self) -> None:
        mbox, self.mbox = self.mbox, None
        if mbox is not None:
            try:
                mbox.folder.remove_listener(self._folder_changed)
                mbox.close()
            except Exception:
                self.log.failure("closing folder")

    def _expunged_lines(self, removed: Iterable[int]) -> bytes:
        """
        The EXPUNGE lines for C{removed} (after ENABLE QRESYNC, the VANISHED
        line, RFC 7162 3.2.10); they are no longer recent to the session.
        """
        removed = list(removed)
        self.mbox.recent.difference_update(removed)
        context = self._context_removed(removed)
        if self.qresync:
            return context + condstore.vanished_lines(self.mbox.uids, removed)
        return context + expunge_lines(self.mbox.uids, removed)

    # --- live search results (RFC 5267; commands.context holds them) ---------

    def _context_removed(self, uids: Iterable[int]) -> bytes:
        """The ESEARCH REMOVEFROM lines for messages about to be told expunged."""
        return b""

    def _context_updates(self, added: Any, changed: Any) -> defer.Deferred:
        """Fires with the ESEARCH lines for new messages and messages with new flags."""
        return defer.succeed(b"")

    # --- literals from the message file ------------------------------------

    @defer.inlineCallbacks
    def _send_file_range(
        self, open_file: Callable[[], Any], start: int, size: int, flow: Any
    ) -> Any:
        """
        Send C{size} octets from C{start} of the file C{open_file} opens (in the
        pool; KeyError: the message is gone) as the client reads them (C{flow},
        an L{OutputFlow}); what cannot be read is sent as spaces, keeping the
        literal's promised length.
        """
        left = size
        try:
            f = yield self._run(open_file)
        except KeyError:
            f = None
        try:
            if f is not None:
                yield self._run(skip, f, start)
            while left > 0 and f is not None:
                chunk = yield self._run(f.read, min(left, LITERAL_CHUNK))
                if not chunk or self._lost:
                    break
                self.transport.write(chunk)
                left -= len(chunk)
                yield flow.wait()
                if flow.stopped:
                    return
            if left > 0 and not self._lost:
                self.transport.write(b" " * left)  # keep the literal's promised length
        finally:
            if f is not None:
                f.close()

    # --- \Recent and keywords ----------------------------------------------

    @defer.inlineCallbacks
    def _claim_recent(self, mbox: Any) -> Any:
        """
        Take the messages of the session's view no session has had as \\Recent
        (RFC 3501 2.3.2; after EXAMINE, only see them, L{IFolder.claim_recent}).
        A rev2 session takes none (RFC 9051 2.3.2: \\Recent is obsolete).
        """
        if self.rev2:
            return
        try:
            first, upto = yield mbox.folder.claim_recent()
        except Exception:  # the session goes on; what it was not given stays for others
            self.log.failure("claiming \\Recent in {folder} failed", folder=mbox.folder.name)
            return
        uids = mbox.uids
        i, j = bisect.bisect_left(uids, first), bisect.bisect_left(uids, upto)
        mbox.recent.update(uids[i:j])

    def _defined_flags(self, mbox: Any) -> list[str]:
        """The flags of SELECT's FLAGS response; the keywords among them are told."""
        flags: list[str] = mbox.defined_flags()
        self._keywords_told = frozenset(flags) - SYSTEM_FLAGS
        return flags

    def _flags_news(self, flag_sets: Iterable[frozenset[str]]) -> bytes:
        """
        The FLAGS and PERMANENTFLAGS responses to send before a FETCH shows any
        of C{flag_sets}, if they hold a keyword the client was not told of
        (RFC 3501 7.2.6); else nothing.
        """
        told = self._keywords_told
        new: set[str] = set()
        for flags in flag_sets:
            if not flags <= told:
                new.update(flags - told - SYSTEM_FLAGS)
        if not new:
            return b""
        self._keywords_told = told = told | new
        defined = [*sorted(SYSTEM_FLAGS), *sorted(told)]
        permanent = [*defined, "\\*"] if self.mbox.is_writeable() else []
        return b"* FLAGS %s\r\n* OK [PERMANENTFLAGS %s] Flags permitted\r\n" % (
            flag_list(defined),
            flag_list(permanent),
        )

    # --- changes by others -------------------------------------------------

    def _folder_changed(self) -> None:
        if self._notify_selected_changed():
            return  # NOTIFY (RFC 5465) tells the client now (commands.notify)
        if self._idle_tag is not None and not self._lost:
            self._start_sync()

    def _notify_selected_changed(self) -> bool:
        """Whether NOTIFY takes a change of the selected mailbox (L{commands.notify})."""
        return False

    def _start_sync(self) -> None:
        if self._sync_d is not None:
            self._sync_again = True
            return
        d = self._sync()
        if not d.called:
            self._sync_d = d

            def done(_: Any) -> None:
                self._sync_d = None
                if self._sync_again:
                    self._sync_again = False
                    if self._idle_tag is not None:
                        self._start_sync()

            d.addBoth(done)

    @defer.inlineCallbacks
    def _sync(self) -> Any:
        """
        Catch up with the folder; tell the client what changed: EXPUNGE, the
        keywords new to it (FLAGS), FETCH FLAGS, EXISTS and RECENT.
        """
        mbox = self.mbox
        if mbox is None:
            return
        try:
            changes = yield mbox.folder.refresh()
        except FolderError as e:
            # Deleted or renamed by another session meanwhile: the session keeps
            # the view it has; what it can no longer read is reported as such.
            self.log.info("refresh of {folder}: {error}", folder=mbox.folder.name, error=e)
            return
        except Exception:
            self.log.failure("refresh failed")
            return
        if mbox is not self.mbox or self._lost:
            return
        if changes.uid_validity_changed:
            self.sendLine(b"* BYE [UIDVALIDITY changed] Mailbox changed; reconnect")
            self.transport.loseConnection()
            return
        lines = [self._expunged_lines(changes.expunged)]
        recent_before = len(mbox.recent)
        mbox.reload()
        self.view_modseq, self.view_uid_next = mbox.folder.highest_modseq, mbox.folder.uid_next
        if changes.added:
            yield self._claim_recent(mbox)
            if mbox is not self.mbox or self._lost:
                return
        lines.append(self._flags_news(i.flags for i in (*changes.added, *changes.flags)))
        for info in changes.flags:
            seq = mbox.seq_of(info.uid)
            if seq is not None:
                flags = flag_list(mbox.flags_of(info))
                lines.append(
                    condstore.flags_fetch(
                        seq, info.uid, info.modseq, flags, self.qresync, self.condstore
                    )
                )
        if changes.added or changes.expunged:
            lines.append(b"* %d EXISTS\r\n" % mbox.message_count())
        if changes.added and len(mbox.recent) != recent_before:
            lines.append(b"* %d RECENT\r\n" % len(mbox.recent))
        lines.append((yield self._context_updates(changes.added, changes.flags)))
        out = b"".join(lines)
        if out:
            self.transport.write(out)
