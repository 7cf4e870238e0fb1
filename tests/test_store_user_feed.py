"""
The store's per-user change feed (L{IMailStore.add_user_listener}, for IMAP
NOTIFY), on both stores: what each change through the store tells, and what
it does not.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import (
    FOLDER_CREATED,
    FOLDER_DELETED,
    FOLDER_MESSAGES,
    FOLDER_RENAMED,
    SEEN,
    FolderEvent,
)
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.memory import MemoryMailStore
from tests.store_contract import MSG1, NOW, USER, SyncReactor, SyncThreadPool

OTHER = "bob@example.test"


class UserFeedContract:
    """What every store's user feed tells (a mixin for a SynchronousTestCase with make_store)."""

    def setUp(self):
        self.store = self.make_store()

    def ok(self, d):
        return self.successResultOf(d)

    def fails(self, d):
        return self.failureResultOf(d)

    def deliver(self, data, folder="INBOX"):
        return self.ok(self.store.deliver(USER, BytesSource(data), "bob@example.test", folder))

    def open(self, name):
        f = self.ok(self.store.open_folder(USER, name))
        self.addCleanup(f.close)
        return f

    def listen(self, user=USER):
        events: list[FolderEvent] = []
        self.store.add_user_listener(user, events.append)
        self.addCleanup(self.store.remove_user_listener, user, events.append)
        return events

    def test_delivery_tells_the_folder(self):
        self.ok(self.store.create_folder(USER, "Lists"))
        events = self.listen()
        others = self.listen(OTHER)
        self.deliver(MSG1)
        self.deliver(MSG1, folder="Lists")
        self.assertEqual(
            events, [FolderEvent(FOLDER_MESSAGES, "INBOX"), FolderEvent(FOLDER_MESSAGES, "Lists")]
        )
        self.assertEqual(others, [])

    def test_append_flags_expunge_by_a_session(self):
        self.ok(self.store.create_folder(USER, "Work"))
        f = self.open("Work")
        events = self.listen()
        uid = self.ok(f.append(BytesSource(MSG1)))
        self.ok(f.change_flags([uid], add=frozenset({SEEN})))
        self.ok(f.expunge([uid]))
        self.assertEqual(events, [FolderEvent(FOLDER_MESSAGES, "Work")] * 3)

    def test_folder_operations(self):
        events = self.listen()
        self.ok(self.store.create_folder(USER, "a"))
        self.ok(self.store.create_folder(USER, "b"))
        self.ok(self.store.delete_folder(USER, "b"))
        self.ok(self.store.rename_folder(USER, "a", "c"))
        self.assertEqual(
            events,
            [
                FolderEvent(FOLDER_CREATED, "a"),
                FolderEvent(FOLDER_CREATED, "b"),
                FolderEvent(FOLDER_DELETED, "b"),
                FolderEvent(FOLDER_RENAMED, "c", "a"),
            ],
        )

    def test_rename_tells_each_child(self):
        self.ok(self.store.create_folder(USER, "p/"))
        self.ok(self.store.create_folder(USER, "p/x"))
        self.ok(self.store.create_folder(USER, "p/y"))
        events = self.listen()
        self.ok(self.store.rename_folder(USER, "p", "q"))
        self.assertEqual(
            events,
            [
                FolderEvent(FOLDER_RENAMED, "q", "p"),
                FolderEvent(FOLDER_RENAMED, "q/x", "p/x"),
                FolderEvent(FOLDER_RENAMED, "q/y", "p/y"),
            ],
        )

    def test_rename_inbox_creates_the_new_folder(self):
        self.deliver(MSG1)
        events = self.listen()
        self.ok(self.store.rename_folder(USER, "INBOX", "Old"))
        self.assertIn(FolderEvent(FOLDER_CREATED, "Old"), events)
        self.assertIn(FolderEvent(FOLDER_MESSAGES, "INBOX"), events)

    def test_refused_operations_tell_nothing(self):
        events = self.listen()
        self.fails(self.store.delete_folder(USER, "nothere"))
        self.fails(self.store.rename_folder(USER, "nothere", "x"))
        self.ok(self.store.create_folder(USER, "a"))
        self.fails(self.store.create_folder(USER, "a"))
        self.assertEqual(events, [FolderEvent(FOLDER_CREATED, "a")])

    def test_removed_listener_hears_nothing(self):
        events = self.listen()
        self.store.remove_user_listener(USER, events.append)
        self.store.remove_user_listener(USER, events.append)  # twice: no error
        self.deliver(MSG1)
        self.ok(self.store.create_folder(USER, "a"))
        self.assertEqual(events, [])

    def test_a_failing_listener_does_not_stop_the_change(self):
        def broken(event):
            raise RuntimeError("listener bug")

        self.store.add_user_listener(USER, broken)
        self.addCleanup(self.store.remove_user_listener, USER, broken)
        events = self.listen()
        self.deliver(MSG1)
        self.assertEqual(events, [FolderEvent(FOLDER_MESSAGES, "INBOX")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MemoryUserFeedTests(UserFeedContract, SynchronousTestCase):
    def make_store(self):
        return MemoryMailStore(clock=lambda: NOW)


class MboxUserFeedTests(UserFeedContract, SynchronousTestCase):
    def make_store(self):
        self.root = Path(self.mktemp())
        return MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )
