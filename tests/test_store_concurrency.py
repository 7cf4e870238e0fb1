"""
The mbox store on a real thread pool: group commit of concurrent deliveries,
and locking that waits for mutt/procmail/Python's mailbox in another process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from mailsrv.spool import BytesSource, SpooledSource
from mailsrv.store.locking import LockTimeout
from mailsrv.store.mbox import MboxMailStore, deliver

USER = "alice@example.test"

HOLD_DOTLOCK = """
import os, socket, sys, time
lock = sys.argv[1] + ".lock"
fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, b"%d:%s\\n" % (os.getpid(), socket.gethostname().split(".")[0].encode()))
os.close(fd)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
os.unlink(lock)
"""

HOLD_FCNTL = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
os.close(fd)
"""

FCNTL_THEN_DOTLOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_APPEND)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock = sys.argv[1] + ".lock"
for _ in range(300):  # as Postfix local(8): fcntl first, then the dotlock, with retries
    try:
        os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        break
    except FileExistsError:
        time.sleep(0.01)
else:
    sys.exit("no dotlock")
os.write(fd, b"From postfix Mon Jan  1 00:00:00 2024\\nSubject: postfix\\n\\nhi\\n\\n")
os.fsync(fd)
os.unlink(lock)
os.close(fd)
"""

HOLD_MAILBOX = """
import mailbox, sys, time
box = mailbox.mbox(sys.argv[1])
box.lock()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
box.add(b"Subject: from python\\n\\nhello\\n")
box.flush()
box.unlock()
"""


class ThreadedTests(TestCase):
    def setUp(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=8, name="test-store")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.root = Path(self.mktemp())
        self.store = MboxMailStore(self.root / "mail", self.root / "index", reactor, self.pool)
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"

    async def read_all(self, user=USER):
        folder = await self.store.open_folder(user, "INBOX")
        out = []
        for info in folder.messages():
            with folder.open_message(info.uid) as fh:
                out.append(fh.read())
        folder.close()
        return out

    @defer.inlineCallbacks
    def test_group_commit(self):
        batches = []
        real = deliver.deliver_batch

        def counting(st, items):
            batches.append(len(items))
            return real(st, items)

        self.patch(deliver, "deliver_batch", counting)
        n = 300
        ds = []
        for i in range(n):
            src = SpooledSource(self.root / "spool", spill_at=2000)
            src.write(b"Subject: %d\n\n" % i + b"From line %d\n" % i * (1 + i % 300))
            src.finish()
            ds.append(self.store.deliver(USER, src, "s@x"))
        ds.append(self.store.deliver("bob@example.test", BytesSource(b"S: b\n\nb\n"), ""))
        yield defer.gatherResults(ds, consumeErrors=True)
        self.assertEqual(sum(batches), n + 1)
        self.assertLess(len(batches), n // 4)  # batched: far fewer fsyncs than messages
        got = yield defer.ensureDeferred(self.read_all())
        self.assertEqual(
            sorted(got),
            sorted(
                (b"Subject: %d\r\n\r\n" % i + b"From line %d\r\n" % i * (1 + i % 300))
                for i in range(n)
            ),
        )
        self.assertEqual(len(set(got)), n)

    @defer.inlineCallbacks
    def test_listeners_and_sessions_while_delivering(self):
        yield self.store.deliver(USER, BytesSource(b"S: 0\n\nx\n"), "")
        folder = yield self.store.open_folder(USER, "INBOX")
        self.addCleanup(folder.close)
        calls = []
        folder.add_listener(lambda: calls.append(1))
        yield defer.gatherResults(
            [self.store.deliver(USER, BytesSource(b"S: %d\n\nx\n" % i), "") for i in range(20)]
        )
        self.assertGreaterEqual(len(calls), 1)
        changes = yield folder.refresh()
        self.assertEqual([i.uid for i in changes.added], list(range(2, 22)))

    def hold(self, script, seconds, path=None):
        path = path or self.inbox
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(path), str(seconds)], stdout=subprocess.PIPE
        )
        self.addCleanup(proc.wait)
        self.addCleanup(proc.stdout.close)
        self.assertEqual(proc.stdout.readline(), b"locked\n")
        return proc

    @defer.inlineCallbacks
    def lock_waits(self, script, expect_extra=0):
        yield self.store.deliver(USER, BytesSource(b"S: first\n\nx\n"), "")
        self.hold(script, 0.6)
        t0 = time.monotonic()
        yield self.store.deliver(USER, BytesSource(b"S: second\n\nx\n"), "")
        self.assertGreater(time.monotonic() - t0, 0.4)
        got = yield defer.ensureDeferred(self.read_all())
        self.assertEqual(len(got), 2 + expect_extra)
        self.assertEqual(got[0], b"S: first\r\n\r\nx\r\n")
        self.assertIn(b"S: second\r\n\r\nx\r\n", got)

    def test_waits_for_dotlock(self):
        return self.lock_waits(HOLD_DOTLOCK)

    def test_waits_for_fcntl_lock(self):
        return self.lock_waits(HOLD_FCNTL)

    def test_waits_for_python_mailbox(self):
        return self.lock_waits(HOLD_MAILBOX, expect_extra=1)

    def test_fcntl_first_locker_is_not_starved(self):
        return self.lock_waits(FCNTL_THEN_DOTLOCK, expect_extra=1)

    @defer.inlineCallbacks
    def test_lock_timeout_fails_delivery(self):
        yield self.store.deliver(USER, BytesSource(b"S: first\n\nx\n"), "")
        before = self.inbox.read_bytes()
        self.store.lock_timeout = 0.2
        self.hold(HOLD_DOTLOCK, 1.0)
        d = self.store.deliver(USER, BytesSource(b"S: second\n\nx\n"), "")
        yield self.assertFailure(d, LockTimeout)
        self.assertEqual(self.inbox.read_bytes(), before)

    @defer.inlineCallbacks
    def test_stale_dotlock_of_dead_process_is_broken(self):
        yield self.store.deliver(USER, BytesSource(b"S: first\n\nx\n"), "")
        proc = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        )
        dead = int(proc.stdout)
        lock = Path(str(self.inbox) + ".lock")
        import socket

        lock.write_text(f"{dead}:{socket.gethostname().split('.')[0]}\n")
        old = time.time() - 5
        os.utime(lock, (old, old))
        self.store.lock_timeout = 5
        yield self.store.deliver(USER, BytesSource(b"S: second\n\nx\n"), "")
        self.assertFalse(lock.exists())
        got = yield defer.ensureDeferred(self.read_all())
        self.assertEqual(len(got), 2)

    @defer.inlineCallbacks
    def test_renamed_over_while_waiting(self):
        # Someone holds the locks, writes a new file and renames it over the mbox
        # (as Python's mailbox does); our append must land in the new file.
        yield self.store.deliver(USER, BytesSource(b"S: first\n\nx\n"), "")
        script = HOLD_MAILBOX.replace("box.add(", "box.remove(box.keys()[0]); box.add(")
        self.hold(script, 0.5)
        yield self.store.deliver(USER, BytesSource(b"S: second\n\nx\n"), "")
        got = yield defer.ensureDeferred(self.read_all())
        self.assertEqual(got, [b"Subject: from python\r\n\r\nhello\r\n", b"S: second\r\n\r\nx\r\n"])
