"""
NOTIFY (RFC 5465): the command, and the unsolicited responses it asks for,
sent as the changes happen and never inside another command's response:
between commands, or while the session IDLEs; what comes during a command
waits for its tagged answer.

- The selected mailbox (SELECTED): its EXPUNGE, FETCH FLAGS, EXISTS and
  RECENT are sent at once (the catch-up of L{CommandBase._sync}), then the
  FETCH of MessageNew's attributes for the new messages (RFC 5465 5.2).
  SELECTED-DELAYED sends them while the session IDLEs and, as without
  NOTIFY, at the commands that catch up (NOOP, CHECK, ...), so that an
  EXPUNGE never comes when RFC 3501 7.4.1 forbids it.
- Other mailboxes: C{* STATUS} (RFC 5465 5.1-5.3) from the store's user
  feed (L{IMailStore.add_user_listener}); C{* LIST} for mailboxes created,
  deleted (C{\\NonExistent}) and renamed (OLDNAME, RFC 5465 5.4), and for
  subscriptions (C{\\Subscribed}, RFC 5465 5.5) from the subscriptions'
  feed.
- Cost: at most L{MAX_QUEUED} changes wait per session; past that the
  session gets C{* OK [NOTIFICATIONOVERFLOW]} and NOTIFY NONE (RFC 5465
  5.8). Changes of one mailbox's messages that wait together are told once.

The STATUS items follow Dovecot: at NOTIFY SET STATUS, MESSAGES UIDNEXT
UIDVALIDITY UNSEEN (and HIGHESTMODSEQ with FlagChange where the server
offers CONDSTORE); for a change, the items that changed (MESSAGES UIDNEXT
UNSEEN for new or expunged mail, UNSEEN for \\Seen, all four when
UIDVALIDITY changed or the mailbox was not seen before), HIGHESTMODSEQ
with them once the session has enabled CONDSTORE (L{notify_condstore}).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Any

from twisted.internet import defer

from mailsrv.imap import mutf7, twistedcompat
from mailsrv.imap.account import SubscriptionChange, list_entries, list_pattern
from mailsrv.imap.commands.base import command
from mailsrv.imap.commands.fetch import FetchCommand
from mailsrv.imap.fetch import FetchSyntaxError, parse_fetch
from mailsrv.imap.notify import (
    FLAG_CHANGE,
    MAILBOX_NAME,
    MESSAGE_EVENTS,
    MESSAGE_NEW,
    SUBSCRIPTION_CHANGE,
    BadEvent,
    NotifySpec,
    NotifySyntaxError,
    bad_event_code,
    parse_notify,
)
from mailsrv.imap.parsing import mailbox_name
from mailsrv.imap.responses import flag_list
from mailsrv.interfaces import (
    FOLDER_CREATED,
    FOLDER_DELETED,
    FOLDER_MESSAGES,
    FOLDER_RENAMED,
    FolderError,
    FolderEvent,
)

CAPABILITIES = [b"NOTIFY"]  # RFC 5465 3
MAX_QUEUED = 1000  # changes waiting to be told, per session (RFC 5465 5.8 past that)
STATUS_KNOWN = 1000  # mailboxes whose last told STATUS a session keeps (to tell what changed)

_STATUS_ORDER = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ")
_KEYS = {
    "MESSAGES": "messages",
    "UIDNEXT": "uid_next",
    "UIDVALIDITY": "uid_validity",
    "UNSEEN": "unseen",
    "HIGHESTMODSEQ": "highest_modseq",
}


class NotifyCommands(FetchCommand):
    """NOTIFY, and the unsolicited responses it leads to."""

    _busy: bytes | None  # the tag of the command under way (IMAPServer)
    _notify: NotifySpec | None = None
    _notify_fetch: Any = None  # MessageNew's FetchRequest for the selected mailbox
    _notify_pending: OrderedDict[tuple[Any, ...], None] | None = None
    _notify_ready: list[bytes] | None = None  # lines made, waiting for the end of a command
    _notify_flushing = False
    _notify_selected_due = False
    _notify_selected_running = False
    _notify_overflowed = False
    _notify_known: OrderedDict[str, dict[str, int]] | None = None
    _notify_listening = False
    _notify_subscribed_to: Any = None  # the Subscriptions listened to
    # The folder list the LIST responses were last made from, and the count of
    # folder changes heard when it was read: read again only after a change.
    _notify_folders: tuple[int, list[tuple[str, bool]]] | None = None
    _notify_folder_changes = 0

    def notify_condstore(self) -> bool:
        """
        Whether this session has enabled CONDSTORE (RFC 7162 3.1): then each
        STATUS it is told carries HIGHESTMODSEQ (RFC 5465 5.1-5.3).
        """
        return bool(self.condstore)

    # --- the command ------------------------------------------------------

    def do_NOTIFY(self, tag: bytes, line: bytes | None) -> None:
        self._notify_command(tag, line or b"")

    auth_NOTIFY = select_NOTIFY = (do_NOTIFY, twistedcompat.arg_line)  # type: ignore[assignment]

    @command
    def _notify_command(self, tag: bytes, line: bytes) -> Any:
        try:
            spec = parse_notify(line, self._notify_name)
            fetch = None
            if spec is not None and spec.fetch is not None:
                fetch = parse_fetch(spec.fetch)
        except (NotifySyntaxError, FetchSyntaxError) as e:
            self.sendBadResponse(tag, str(e).encode("utf-8", "replace"))
            return
        except BadEvent:
            self.sendNegativeResponse(tag, b"[" + bad_event_code() + b"] Unsupported NOTIFY events")
            return
        self._notify_stop()
        self._notify_overflowed = False
        if spec is not None:
            self._notify, self._notify_fetch = spec, fetch
            if spec.uses_subscriptions:
                yield self.account.subscriptions.load()  # as other sessions left them
            if self._lost:
                return  # connectionLost has been: nothing to listen for
            self._notify_start(spec)
            if spec.status:
                yield self._notify_status_all(spec)
        if self.mbox is not None and not self._lost:
            yield self._sync()  # RFC 5465 3.1: NOTIFY implies a NOOP
        if not self._lost:
            self.sendPositiveResponse(tag, b"NOTIFY completed")

    def _notify_name(self, raw: bytes) -> str:
        """A mailbox name of the command, as the session spells names (RFC 6855 3)."""
        try:
            if self.utf8_names:
                raw = mutf7.from_utf8(raw)
            return mailbox_name(raw)
        except (FolderError, mutf7.InvalidName) as e:
            raise NotifySyntaxError(str(e)) from None

    # --- listening ----------------------------------------------------------

    def _notify_start(self, spec: NotifySpec) -> None:
        self._notify_pending = OrderedDict()
        self._notify_ready = []
        if self._notify_known is None:
            self._notify_known = OrderedDict()
        if spec.watches_mailboxes:
            self.factory.store.add_user_listener(self._user, self._notify_store_event)
            self._notify_listening = True
        if spec.uses_subscriptions or spec.has(SUBSCRIPTION_CHANGE):
            subs = self.account.subscriptions
            subs.add_listener(self._notify_subscription_event)
            self._notify_subscribed_to = subs

    def _notify_stop(self) -> None:
        """NOTIFY NONE: stop listening, forget what waits."""
        self._notify = None
        self._notify_fetch = None
        self._notify_pending = None
        self._notify_ready = None
        self._notify_selected_due = False
        self._notify_folders = None
        if self._notify_listening:
            self._notify_listening = False
            self.factory.store.remove_user_listener(self._user, self._notify_store_event)
        subs, self._notify_subscribed_to = self._notify_subscribed_to, None
        if subs is not None:
            subs.remove_listener(self._notify_subscription_event)

    def connectionLost(self, reason: Any = None) -> None:
        self._notify_stop()
        super().connectionLost(reason)

    def resumeProducing(self) -> None:
        """Read input again, but not while a push is being sent (L{_notify_selected_changed})."""
        if self._notify_selected_running and not self._lost:
            return  # the push resumes input when it is out
        super().resumeProducing()

    def _subscribed(self) -> set[str]:
        return self.account.subscriptions.names  # type: ignore[no-any-return]

    def _selected_name(self) -> str | None:
        return self.mbox.folder.name if self.mbox is not None else None

    def _notify_store_event(self, event: FolderEvent) -> None:
        spec = self._notify
        if spec is None or self._lost:
            return
        subs = self._subscribed()
        if event.kind == FOLDER_MESSAGES:
            # The selected mailbox is told of through its own listener.
            if event.name == self._selected_name():
                return
            if spec.events_for(event.name, subs) & MESSAGE_EVENTS:
                self._notify_queue(("status", event.name))
        elif event.kind in (FOLDER_CREATED, FOLDER_DELETED, FOLDER_RENAMED):
            self._notify_folder_changes += 1
            old = event.old_name
            if spec.wants(MAILBOX_NAME, event.name, subs) or (
                old is not None and spec.wants(MAILBOX_NAME, old, subs)
            ):
                self._notify_queue(("list", event.name, old, False))

    def _notify_subscription_event(self, change: SubscriptionChange) -> None:
        spec = self._notify
        if spec is None or self._lost:
            return
        before = spec.wants(SUBSCRIPTION_CHANGE, change.name, self._subscribed())
        self.account.subscriptions.heard(change)
        if before or spec.wants(SUBSCRIPTION_CHANGE, change.name, self._subscribed()):
            self._notify_queue(("list", change.name, None, True))

    def _notify_queue(self, item: tuple[Any, ...]) -> None:
        pending = self._notify_pending
        if pending is None:
            return
        if item in pending:
            return  # told once: the responses say how things are when sent
        if len(pending) + len(self._notify_ready or ()) >= MAX_QUEUED:
            self._notify_overflow()
            return
        pending[item] = None
        self._notify_kick()

    def _notify_overflow(self) -> None:
        """RFC 5465 5.8: tell the client, and behave as after NOTIFY NONE."""
        self.log.info("imap {user}: NOTIFY overflow, notifications off", user=self._user)
        self._notify_stop()
        self._notify_overflowed = True
        self._notify_kick()

    # --- when responses may go out -------------------------------------------

    def _notify_can_write(self) -> bool:
        """Between commands, or while the session IDLEs: never inside another response."""
        if self._lost or self.transport.disconnecting:
            return False
        return self._busy is None or self._idle_tag is not None

    def command_done(self) -> None:
        """A command was answered: what waited for its end goes out."""
        if self._notify_selected_due:
            self._notify_selected_due = False
            self._notify_selected_changed()
        self._notify_kick()

    def _notify_kick(self) -> None:
        if not self._notify_can_write():
            return
        if self._notify_overflowed:
            self._notify_overflowed = False
            self.transport.write(b"* OK [NOTIFICATIONOVERFLOW] Too many notifications\r\n")
        ready = self._notify_ready
        if ready:
            self._notify_ready = []
            self.transport.write(b"".join(ready))
        if self._notify_pending and not self._notify_flushing:
            self._notify_flushing = True
            d = self._notify_flush()

            def done(result: Any) -> Any:
                self._notify_flushing = False
                if self._notify_pending:
                    self._notify_kick()
                return result

            d.addBoth(done).addErrback(lambda f: self.log.failure("NOTIFY responses failed", f))

    @defer.inlineCallbacks
    def _notify_flush(self) -> Any:
        """Make the responses of what waits, one change at a time; send them when allowed."""
        while self._notify_pending and not self._lost:
            item, _ = self._notify_pending.popitem(last=False)
            if item[0] == "status":
                line = yield self._notify_status_line(item[1])
            else:
                line = yield self._notify_list_line(item[1], item[2], item[3])
            if line and self._notify_ready is not None:
                self._notify_ready.append(b"* " + line + b"\r\n")
            if self._notify_can_write() and self._notify_ready:
                ready, self._notify_ready = self._notify_ready, []
                self.transport.write(b"".join(ready))

    # --- the responses --------------------------------------------------------

    @defer.inlineCallbacks
    def _notify_status(self, name: str) -> Any:
        """The store's STATUS of C{name}, or None if it has none now (gone, not selectable)."""
        try:
            st = yield self.factory.store.folder_status(self._user, name)
        except FolderError:
            return None
        return st

    def _status_line(self, name: str, st: dict[str, int], items: list[str]) -> bytes:
        known = self._notify_known
        if known is not None:
            known[name] = dict(st)
            known.move_to_end(name)
            while len(known) > STATUS_KNOWN:
                known.popitem(last=False)
        values = b" ".join(
            b"%s %d" % (i.encode(), st[_KEYS[i]]) for i in _STATUS_ORDER if i in items
        )
        return b"STATUS " + self.encode_name(name) + b" (" + values + b")"

    @defer.inlineCallbacks
    def _notify_status_all(self, spec: NotifySpec) -> Any:
        """RFC 5465 3.1: NOTIFY SET STATUS, a STATUS of each mailbox watched for message events."""
        folders = yield self.factory.store.list_folders(self._user)
        subs = self._subscribed()
        items = ["MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN"]
        # RFC 5465 3.1: with FlagChange, HIGHESTMODSEQ where the server has CONDSTORE.
        if spec.has(FLAG_CHANGE) and b"CONDSTORE" in self.listCapabilities():
            items.append("HIGHESTMODSEQ")
        selected = self._selected_name()
        for name, selectable in folders:
            if not selectable or name == selected:
                continue
            if not spec.events_for(name, subs) & MESSAGE_EVENTS:
                continue
            st = yield self._notify_status(name)
            if self._lost:
                return
            if st is not None:
                self.transport.write(b"* " + self._status_line(name, st, items) + b"\r\n")

    @defer.inlineCallbacks
    def _notify_status_line(self, name: str) -> Any:
        """The STATUS telling what changed in C{name} since the session was last told."""
        st = yield self._notify_status(name)
        spec = self._notify
        if st is None or spec is None:
            return None
        known = self._notify_known
        before = known.get(name) if known is not None else None
        if before is None or before["uid_validity"] != st["uid_validity"]:
            items = ["MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN"]
        elif before["messages"] != st["messages"] or before["uid_next"] != st["uid_next"]:
            items = ["MESSAGES", "UIDNEXT", "UNSEEN"]
        elif before["unseen"] != st["unseen"] and spec.wants(FLAG_CHANGE, name, self._subscribed()):
            items = ["UNSEEN"]
        else:
            items = []
        condstore = self.notify_condstore()
        if condstore and items:
            items.append("HIGHESTMODSEQ")
        elif (
            condstore
            and before is not None
            and before.get("highest_modseq") != st.get("highest_modseq")
        ):
            if spec.wants(FLAG_CHANGE, name, self._subscribed()):
                items = ["HIGHESTMODSEQ"]
        if not items:
            return None
        return self._status_line(name, st, items)

    @defer.inlineCallbacks
    def _notify_list_line(self, name: str, old: str | None, subscription: bool) -> Any:
        """
        The LIST response for a mailbox name (RFC 5465 5.4, 5.5): its
        attributes now, C{\\NonExistent} if there is none of that name, the
        old name of a rename (OLDNAME), C{\\Subscribed} for a subscription
        change if the name is subscribed now.
        """
        seen = self._notify_folders
        if self._notify_listening and seen is not None and seen[0] == self._notify_folder_changes:
            folders = seen[1]  # a burst of changes (a rename's children): one listing
        else:
            changes = self._notify_folder_changes
            folders = yield self.factory.store.list_folders(self._user)
            self._notify_folders = (changes, folders)
        account = self.account
        special = {n: use for n in account.special_folders if (use := account.special_use(n))}
        entries = list_entries(
            folders, list_pattern(name), special, bool(self.factory.store.mail_folders_hold_folders)
        )
        flags = entries[0][1].getFlags() if entries else ["\\NonExistent"]
        if subscription and name in self._subscribed():
            flags = ["\\Subscribed", *flags]
        line = b"LIST " + flag_list(flags) + b' "/" ' + self.encode_name(name)
        if old is not None:
            line += b' ("OLDNAME" (' + self.encode_name(old) + b"))"
        return line

    # --- the selected mailbox ---------------------------------------------------

    def _notify_selected_changed(self) -> bool:
        """
        The selected mailbox changed (its listener, L{CommandBase._folder_changed}):
        with NOTIFY SELECTED, catch up now or at the end of the command under
        way. Returns whether NOTIFY took it.
        """
        spec = self._notify
        if spec is None or MESSAGE_NEW not in spec.selected_events or self._lost:
            return False
        if spec.selected_delayed and self._idle_tag is None:
            return False  # RFC 5465 6.1.2: at the next command that may send EXPUNGE
        if not self._notify_can_write() or self._notify_selected_running:
            self._notify_selected_due = True
            return True
        if self._sync_d is not None:
            # A catch-up is running: look again once it is done.
            self._notify_selected_due = True
            self._sync_d.addBoth(self._notify_after_sync)
            return True
        self._notify_selected_running = True
        # The push's FETCH may be a literal sent over many turns: no command
        # (nor DONE) is read until it is out, so no answer lands inside it.
        # (resumeProducing waits for it too.)
        if not self.paused:
            self.pauseProducing()
        d = self._notify_push_selected()
        if not d.called:
            self._sync_d = d

        def done(result: Any) -> None:
            if self._sync_d is d:
                self._sync_d = None
            self._notify_selected_running = False
            if (
                self.paused
                and not self._lost
                and (self._busy is None or self._idle_tag is not None)
            ):
                self.resumeProducing()
            if self._notify_selected_due and self._notify_can_write():
                self._notify_selected_due = False
                self._notify_selected_changed()

        d.addBoth(done)
        return True

    def _notify_after_sync(self, result: Any) -> Any:
        if self._notify_selected_due and self._notify_can_write():
            self.callLater(0, self.command_done)
        return result

    @defer.inlineCallbacks
    def _notify_push_selected(self) -> Any:
        """Catch up with the selected mailbox; FETCH what MessageNew asks of the new messages."""
        mbox = self.mbox
        if mbox is None:
            return
        last = mbox.uids[-1] if mbox.uids else 0
        try:
            yield self._sync()
            req = self._notify_fetch
            if req is None or self._lost or mbox is not self.mbox:
                return
            first = bisect.bisect_right(mbox.uids, last)
            seqs = list(range(first + 1, len(mbox.uids) + 1))
            if seqs:
                # RFC 5465 5.2: the FETCH after EXISTS, with what the client asked for.
                yield self._fetch_loop(mbox, seqs, list(req.order), req, set())
        except Exception:
            self.log.failure("NOTIFY: catching up with the selected mailbox failed")
