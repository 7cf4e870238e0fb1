"""While a folder has listeners (IMAP sessions, IDLE), the store notices other programs' changes."""

from __future__ import annotations

import mailbox
from pathlib import Path

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import SEEN
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import POLL_INTERVAL, MboxMailStore, scan
from tests.store_contract import NOW, USER, SyncThreadPool
from tests.test_imap_harness import Harness

EXTERNAL = b"From procmail@x Mon Jan  1 00:00:00 2024\nSubject: ext\n\nfrom outside\n\n"


class ClockReactor(task.Clock):
    """A task.Clock that also runs 'callFromThread' at once (with L{SyncThreadPool})."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class PollTests(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"
        self.clock = ClockReactor()
        self.store = MboxMailStore(
            self.root / "mail", self.root / "index", self.clock, SyncThreadPool(), clock=lambda: NOW
        )

    def ok(self, d):
        return self.successResultOf(d)

    def deliver(self, data: bytes) -> None:
        self.ok(self.store.deliver(USER, BytesSource(data), "bob@example.test"))

    def open(self, name="INBOX"):
        f = self.ok(self.store.open_folder(USER, name))
        self.addCleanup(f.close)
        return f

    def test_external_append_fires_listeners(self):
        self.deliver(b"Subject: a\n\nbody\n")
        f = self.open()
        calls = []
        f.add_listener(lambda: calls.append(1))
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(calls, [])  # nothing changed
        with open(self.inbox, "ab") as fh:
            fh.write(EXTERNAL)
        self.clock.advance(POLL_INTERVAL - 0.1)
        self.assertEqual(calls, [])
        self.clock.advance(0.1)
        self.assertEqual(calls, [1])
        changes = self.ok(f.refresh())
        self.assertEqual([m.uid for m in changes.added], [2])
        with f.open_message(2) as fh:
            self.assertEqual(fh.read(), b"Subject: ext\r\n\r\nfrom outside\r\n")
        self.clock.advance(POLL_INTERVAL * 3)
        self.assertEqual(calls, [1])

    def test_external_rewrite_fires_listeners(self):
        for i in range(3):
            self.deliver(b"Subject: %d\nMessage-ID: <%d@x>\n\nbody\n" % (i, i))
        f = self.open()
        self.ok(f.set_flags({3: {SEEN}}))
        calls = []
        f.add_listener(lambda: calls.append(1))
        box = mailbox.mbox(str(self.inbox))
        box.lock()
        box.remove(box.keys()[0])  # as mutt would: the file is rewritten
        box.flush()
        box.unlock()
        box.close()
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(calls, [1])
        changes = self.ok(f.refresh())
        self.assertEqual(changes.expunged, (1,))
        self.assertEqual(
            [(m.uid, m.flags) for m in f.messages()], [(2, frozenset()), (3, frozenset({SEEN}))]
        )

    def test_own_deliveries_are_announced_once(self):
        f = self.open()
        calls = []
        f.add_listener(lambda: calls.append(1))
        self.deliver(b"Subject: a\n\nbody\n")
        self.assertEqual(calls, [1])
        self.clock.advance(POLL_INTERVAL * 2)
        self.assertEqual(calls, [1])

    def test_unchanged_file_is_only_stat_ed(self):
        self.deliver(b"Subject: a\n\nbody\n")
        f = self.open()
        f.add_listener(lambda: None)

        def no_lock(*args, **kwargs):
            raise AssertionError("locked an unchanged mbox")

        self.patch(scan, "MboxLock", no_lock)
        self.patch(scan.mboxfmt, "scan", no_lock)
        self.clock.advance(POLL_INTERVAL * 5)

    def test_poller_runs_only_while_someone_listens(self):
        self.deliver(b"Subject: a\n\nbody\n")
        f = self.open()
        g = self.open()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        cb_f, cb_g = (lambda: None), (lambda: None)
        f.add_listener(cb_f)
        g.add_listener(cb_g)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one poller per folder
        f.remove_listener(cb_f)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        g.close()  # closing a session removes its listeners
        self.assertEqual(self.clock.getDelayedCalls(), [])
        f.add_listener(cb_f)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        f.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deleted_folder_stops_polling(self):
        self.ok(self.store.create_folder(USER, "Lists"))
        f = self.open("Lists")
        f.add_listener(lambda: None)
        self.ok(self.store.delete_folder(USER, "Lists"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_folder_removed_by_another_program(self):
        self.ok(self.store.create_folder(USER, "Lists"))
        f = self.open("Lists")
        f.add_listener(lambda: None)
        (self.inbox.parent / "Lists").unlink()
        self.clock.advance(POLL_INTERVAL)  # logged, not raised; polling goes on
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.flushLoggedErrors(), [])


def test_imap_idle_sees_external_append(tmp_path):
    """An IMAP session in IDLE on the mbox store gets EXISTS for a procmail append."""
    clock = ClockReactor()
    store = MboxMailStore(
        tmp_path / "mail", tmp_path / "index", clock, SyncThreadPool(), clock=lambda: NOW
    )
    h = Harness(tmp_path, store=store)
    h.deliver(b"Subject: a\n\nbody\n")
    c = h.connect()
    c.login()
    out = c.select()
    assert b"* 1 EXISTS" in out
    assert c.cmd(b"i IDLE") == b"+ idling\r\n"
    inbox = tmp_path / "mail" / "example.test" / "alice" / "INBOX"
    with open(inbox, "ab") as fh:
        fh.write(EXTERNAL)
    assert c.read() == b""
    clock.advance(POLL_INTERVAL)
    assert c.read() == b"* 2 EXISTS\r\n* 2 RECENT\r\n"  # both first seen by this session
    assert c.cmd(b"DONE") == b"i OK IDLE terminated\r\n"
    out = c.cmd(b"f UID FETCH 2 (BODY[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: ext" in out
    c.cmd(b"l LOGOUT")
    c.proto.connectionLost(None)
    assert clock.getDelayedCalls() == []  # the poller stopped with the last session
