"""
The in-place rewrite of an mbox (expunge): the inode stays the same, so a
program that opened the file for appending before it locked it (mutt,
procmail) does not lose its write; kill -9 at any step of the rewrite loses
and duplicates nothing; readers with the old offsets read the right bytes.
"""

from __future__ import annotations

import fcntl
import mailbox
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import ANSWERED, DRAFT, FLAGGED, SEEN
from mailsrv.spool import BytesSource
from mailsrv.store import mboxfmt, rewrite
from mailsrv.store.locking import acquire_dotlock, release_dotlock
from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool, crlf

# Opens the mbox for appending first, then (when told) takes the dotlock and
# the fcntl lock as mutt does, and appends one message through that fd.
OPEN_THEN_LOCK = """
import fcntl, os, socket, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
print("opened", flush=True)
sys.stdin.readline()
lock = path + ".lock"
while True:
    try:
        lfd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        break
    except FileExistsError:
        time.sleep(0.01)
os.write(lfd, b"%d:%s\\n" % (os.getpid(), socket.gethostname().split(".")[0].encode()))
os.close(lfd)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, sys.argv[2].encode())
os.fsync(fd)
fcntl.lockf(fd, fcntl.LOCK_UN)
os.unlink(lock)
os.close(fd)
print("appended", flush=True)
"""

WRITER_MSG = (
    "From mutt@example.test Mon Jan  1 00:00:00 2024\n"
    "Subject: saved by mutt\nMessage-ID: <mutt@x>\n\nkeep me\n\n"
)


def message(i: int) -> bytes:
    """Message C{i}: sizes from ~100 bytes to ~40 kB, with lines that need quoting."""
    if i == 99:  # written by another program
        return b"Subject: m99\nMessage-ID: <99@rw>\n\nappended by procmail\n"
    n = (i * 389) % 700 + 1
    lines = b"".join(b"msg %d line %d\nFrom here %d\n" % (i, k, k) for k in range(n))
    return b"Subject: m%d\nMessage-ID: <%d@rw>\n\n%s" % (i, i, lines)


class _Base(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.inbox = self.root / "mail" / "example.test" / "alice" / "INBOX"

    def new_store(self, root=None):
        root = root or self.root
        return MboxMailStore(
            root / "mail", root / "index", SyncReactor(), SyncThreadPool(), clock=lambda: NOW
        )

    def open(self, store):
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        self.addCleanup(f.close)
        return f

    def fill(self, store, ids):
        for i in ids:
            self.successResultOf(store.deliver(USER, BytesSource(message(i)), "s@x"))

    def contents(self, f) -> dict[int, tuple[int, frozenset, bytes]]:
        """uid -> (message id, flags, CRLF bytes) for every message of the folder."""
        out = {}
        for info in f.messages():
            with f.open_message(info.uid) as fh:
                data = fh.read()
            self.assertEqual(len(data), info.size)
            mid = int(data.split(b"\r\n", 1)[0].split(b"m", 1)[1])
            self.assertTrue(data == crlf(message(mid)), f"message {mid} is damaged")
            out[info.uid] = (mid, info.flags, data)
        return out


class InPlaceTests(_Base):
    def test_writer_that_opened_before_locking_keeps_its_mail(self):
        store = self.new_store()
        self.fill(store, range(1, 7))
        f = self.open(store)
        ino = os.stat(self.inbox).st_ino
        writer = subprocess.Popen(
            [sys.executable, "-c", OPEN_THEN_LOCK, str(self.inbox), WRITER_MSG],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            self.assertEqual(writer.stdout.readline(), b"opened\n")
            self.assertEqual(self.successResultOf(f.expunge([2, 5])), [2, 5])
            writer.stdin.write(b"go\n")
            writer.stdin.flush()
            self.assertEqual(writer.stdout.readline(), b"appended\n")
        finally:
            writer.stdin.close()
            writer.stdout.close()
            writer.wait()
        self.assertEqual(os.stat(self.inbox).st_ino, ino)
        box = mailbox.mbox(str(self.inbox), create=False)
        self.assertEqual([m["Subject"] for m in box], ["m1", "m3", "m4", "m6", "saved by mutt"])
        box.close()
        changes = self.successResultOf(f.refresh())
        self.assertEqual([i.uid for i in changes.added], [7])
        with f.open_message(7) as fh:
            self.assertEqual(fh.read(), crlf(WRITER_MSG.split("\n", 1)[1][:-1].encode()))

    def test_expunge_last_and_all(self):
        store = self.new_store()
        self.fill(store, range(1, 5))
        f = self.open(store)
        self.assertEqual(self.successResultOf(f.expunge([4])), [4])
        self.assertTrue(self.inbox.read_bytes().endswith(b"\n\n"))
        self.assertEqual(len(mailbox.mbox(str(self.inbox))), 3)
        self.assertEqual(self.successResultOf(f.expunge([1, 2, 3])), [1, 2, 3])
        self.assertEqual(self.inbox.read_bytes(), b"")
        self.fill(store, [9])
        got = self.contents(self.open(self.new_store()))
        self.assertEqual([(u, m) for u, (m, _, _) in got.items()], [(5, 9)])

    def test_foreign_prefix_kept(self):
        """Bytes before the first From line (some programs leave them) stay as they are."""
        self.inbox.parent.mkdir(parents=True)
        self.inbox.write_bytes(b"\n")
        store = self.new_store()
        self.fill(store, range(1, 4))
        f = self.open(store)
        self.successResultOf(f.expunge([1]))
        got = self.contents(self.open(self.new_store()))
        self.assertEqual([m for m, _, _ in got.values()], [2, 3])


class ReaderTests(_Base):
    """Readers using the offsets from before a rewrite read the right bytes, always."""

    def setUp(self):
        super().setUp()
        self.patch(rewrite, "SEGMENT", 1000)

    def test_stale_snapshot_reads_during_and_after_rewrite(self):
        store = self.new_store()
        self.fill(store, range(1, 13))
        f = self.open(store)
        want = self.contents(f)
        # what a session on another thread still sees
        stale = store.states.loaded[(USER, "INBOX")].snap
        dropped = {3, 4, 9}
        checks = []
        real_fdatasync = os.fdatasync

        class Os:
            def __getattr__(self, name):
                return getattr(os, name)

            def fdatasync(_, fd):  # between two segments: nothing is locked
                real_fdatasync(fd)
                checks.append(check_all())

        def check_all():
            for uid, (_, _, data) in want.items():
                i = stale.find(uid)
                reader = mboxfmt.MessageReader(
                    stale.handle, stale.starts[i], stale.ends[i], hide=True
                )
                if uid in dropped and stale.handle.relocation is not None:
                    self.assertRaises(KeyError, reader.read)
                else:
                    self.assertTrue(reader.read() == data, f"uid {uid} reads wrong bytes")
            return True

        self.patch(rewrite, "os", Os())
        self.successResultOf(f.expunge(sorted(dropped)))
        self.assertGreater(len(checks), 20)
        check_all()
        got = self.contents(self.open(self.new_store()))
        self.assertEqual(sorted(got), sorted(set(want) - dropped))

    def test_stale_snapshot_reads_during_flag_writes(self):
        # messages without room for their flags (as another program writes them):
        # the header blocks grow, and every byte after the first one moves
        for part in (mboxfmt.writer, mboxfmt.fields):  # the two that pad
            self.patch(part, "with_padding", lambda block, pad=None: block)
        store = self.new_store()
        self.fill(store, range(1, 13))
        f = self.open(store)
        want = self.contents(f)
        self.successResultOf(f.set_flags({2: {SEEN, FLAGGED}, 5: {SEEN}, 9: {ANSWERED}}))
        st = store.states.loaded[(USER, "INBOX")]
        stale = st.snap
        changed = {2, 5, 9}
        checks = []
        real_fdatasync = os.fdatasync

        class Os:
            def __getattr__(self, name):
                return getattr(os, name)

            def fdatasync(_, fd):
                real_fdatasync(fd)
                checks.append(check_all())

        def check_all():
            for uid, (_, _, data) in want.items():
                i = stale.find(uid)
                reader = mboxfmt.MessageReader(
                    stale.handle, stale.starts[i], stale.ends[i], hide=True
                )
                if uid in changed and stale.handle.relocation is not None:
                    self.assertRaises(KeyError, reader.read)  # its header block was replaced
                else:
                    self.assertTrue(reader.read() == data, f"uid {uid} reads wrong bytes")
            return True

        self.patch(rewrite, "os", Os())
        st.sessions -= 1  # as if the session had left: the flags are written now
        self.successResultOf(store.write_flags(st))
        st.sessions += 1
        self.assertGreater(len(checks), 20)
        self.assertIn(b"X-Status: A", self.inbox.read_bytes())
        g = self.open(self.new_store())
        self.assertEqual(
            self.contents(g), {u: (m, fl, d) for u, (m, fl, d) in self.contents(f).items()}
        )
        self.assertEqual(set(self.contents(g)), set(want))

    def test_message_being_streamed_survives_expunges(self):
        big = b"Subject: m0\nMessage-ID: <big@rw>\n\n" + b"".join(
            b"line %d of a big one\nFrom x\n" % k for k in range(40000)
        )
        store = self.new_store()
        self.fill(store, [1, 2])
        self.successResultOf(store.deliver(USER, BytesSource(big), "s@x"))
        self.successResultOf(store.deliver(USER, BytesSource(big), "s@x"))
        self.fill(store, [3])
        f = self.open(store)
        g = self.open(store)
        kept = g.open_message(4)  # moves down when 1 and 3 go
        gone = g.open_message(3)  # expunged while it is being read
        head = kept.read(1000) + b""
        head_gone = gone.read(5000)
        self.assertEqual(self.successResultOf(f.expunge([1, 3])), [1, 3])
        self.assertEqual(self.successResultOf(f.expunge([2])), [2])
        self.assertTrue(head + kept.read() == crlf(big), "the moved message reads wrong")
        self.assertTrue(head_gone + gone.read() == crlf(big), "the expunged message reads wrong")
        self.assertRaises(KeyError, g.open_message, 1)


class _KillingOs:
    """
    C{os} for the rewrite module: SIGKILLs the process at its C{at}th write,
    sync, truncate or unlink (0: never). Syncs are skipped: after a kill -9
    the page cache keeps what was written, and the tests stay fast.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.count = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def _step(self) -> bool:
        self.count += 1
        return self.count == self.at

    def _die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def pwrite(self, fd, data, off):
        if self._step():
            os.pwrite(fd, bytes(data[: len(data) // 2]), off)  # cut short
            self._die()
        return os.pwrite(fd, data, off)

    def write(self, fd, data):
        if self._step():
            os.write(fd, bytes(data[: len(data) // 2]))
            self._die()
        return os.write(fd, data)

    def _sync(self, real):
        def call(*args):
            if self._step():
                self._die()
            return real(*args)

        return call

    def __getattribute__(self, name):
        if name in ("fsync", "fdatasync"):
            return object.__getattribute__(self, "_sync")(lambda fd: None)
        if name in ("ftruncate", "unlink"):
            return object.__getattribute__(self, "_sync")(getattr(os, name))
        return object.__getattribute__(self, name)


class KillTests(_Base):
    """kill -9 at every write, sync and truncate of a rewrite, then open the folder again."""

    dropped = {2, 5, 6, 11, 14}

    # messages as mailsrv writes them, with room for their flags (a flag write is a
    # same-length overwrite of header blocks); or as another program does, without
    padded = True

    def setUp(self):
        super().setUp()
        self.pristine: Path | None = None

    def build(self) -> Path:
        if not self.padded:
            for part in (mboxfmt.writer, mboxfmt.fields):  # the two that pad
                self.patch(part, "with_padding", lambda block, pad=None: block)
        pristine = Path(self.mktemp())
        store = self.new_store(pristine)
        self.fill(store, range(1, 16))
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        self.successResultOf(f.set_flags({1: {SEEN}, 6: {FLAGGED}, 7: {SEEN, FLAGGED}}))
        self.want = self.contents(f)
        f.close()
        return pristine

    # flags whose Status:/X-Status: grow (2, 9) and shrink (1, 7): both passes
    new_flags = {1: set(), 2: {SEEN, ANSWERED}, 7: {DRAFT}, 9: {FLAGGED}}

    def change(self, store) -> None:
        """What the child does: expunge, or (flags mode) set flags and leave the folder."""
        f = self.successResultOf(store.open_folder(USER, "INBOX"))
        if self.mode == "flags":
            self.successResultOf(f.set_flags(self.new_flags))
            f.close()  # the last session leaves: the flags are written into the file
        else:
            self.successResultOf(f.expunge(sorted(self.dropped)))

    mode = "expunge"

    def expunge_in_child(self, at: int, segment: int) -> int:
        """Fork; the child expunges with kill -9 at step C{at}. Returns its wait status."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                rewrite.SEGMENT = segment
                rewrite.os = _KillingOs(at)  # type: ignore[attr-defined]
                self.change(self.new_store())
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        lock = self.inbox.with_name("INBOX.lock")
        if lock.exists():  # left by the dead child: make it stale at once
            os.utime(lock, (time.time() - 3600, time.time() - 3600))
        return status

    def check(self, label: str) -> bool:
        """The folder after recovery; True if the expunge (or flag write) happened."""
        self.patch(rewrite, "os", _KillingOs(0))
        if self.mode == "flags":
            return self.check_flags(label)
        store = self.new_store()
        got = self.contents(self.open(store))
        kept = {u: (m, fl) for u, (m, fl, _) in self.want.items() if u not in self.dropped}
        have = {u: (m, fl) for u, (m, fl, _) in got.items()}
        done = not (self.dropped & set(have))
        if not done:
            self.assertEqual(set(have), set(self.want), f"{label}: half an expunge")
        for u, v in kept.items():
            self.assertEqual(have.get(u), v, f"{label}: uid {u}")
        box = mailbox.mbox(str(self.inbox), create=False)
        self.assertEqual(len(box), len(have), f"{label}: mbox has other messages")
        box.close()
        self.assertEqual(list((self.root / "index").rglob("*.rewrite*")), [], label)
        return done

    def check_flags(self, label: str) -> bool:
        got = self.contents(self.open(self.new_store()))
        want = {u: (m, set(self.new_flags.get(u, fl)), d) for u, (m, fl, d) in self.want.items()}
        self.assertEqual(set(got), set(want), label)
        for u, (m, fl, d) in want.items():
            self.assertEqual(got[u][:2], (m, fl), f"{label}: uid {u}")
            self.assertTrue(got[u][2] == d, f"{label}: uid {u} reads other bytes")
        box = mailbox.mbox(str(self.inbox), create=False)
        written = {m["Subject"]: m.get_flags() for m in box}
        box.close()
        self.assertEqual(len(written), len(want), f"{label}: mbox has other messages")
        self.assertEqual(list((self.root / "index").rglob("*.rewrite*")), [], label)
        if self.padded:
            # a same-length overwrite: every message keeps its place and its bytes
            # but for its header block, which is either the old one or the new one
            old, now = _messages(self.pristine_inbox()), _messages(self.inbox)
            self.assertEqual([len(m) for m in now], [len(m) for m in old], label)
            for a, b in zip(old, now, strict=True):
                self.assertEqual(a.partition(b"\n\n")[2], b.partition(b"\n\n")[2], label)
        return written["m2"] == "ROA" and written["m1"] == "O"

    def pristine_inbox(self) -> Path:
        assert self.pristine is not None
        return self.pristine / self.inbox.relative_to(self.root)

    def reset(self):
        if self.pristine is None:
            self.pristine = self.build()
        if self.root.exists():
            shutil.rmtree(self.root)
        shutil.copytree(self.pristine, self.root)

    def kill_everywhere(self, segment: int, stride: int = 1, points: int = 0) -> None:
        """Kill at every C{stride}th step (about C{points} of them, if given) and the last ones."""
        self.reset()
        counter = _KillingOs(0)
        self.patch(rewrite, "os", counter)
        self.patch(rewrite, "SEGMENT", segment)
        self.change(self.new_store())
        self.assertTrue(self.check("no kill"))
        steps = counter.count
        self.assertGreater(steps, 10)
        if points:
            stride = max(1, steps // points)
        outcomes = set()
        for at in sorted({*range(1, steps + 1, stride), *range(steps - 12, steps + 1)}):
            self.reset()
            status = self.expunge_in_child(at, segment)
            self.assertTrue(os.WIFSIGNALED(status), f"step {at}: {status}")
            outcomes.add(self.check(f"kill at step {at} of {steps}"))
        self.assertEqual(outcomes, {True, False})

    def test_kill_at_every_step_small_segments(self):
        # segments bigger than most shifts: the bytes at risk go to the save file
        self.kill_everywhere(segment=3000)

    def test_kill_at_every_step_segments_within_shift(self):
        self.kill_everywhere(segment=200, stride=7)

    def test_kill_at_every_step_of_a_same_length_flag_write(self):
        self.mode = "flags"
        self.kill_everywhere(segment=3000)

    def test_kill_at_every_step_of_a_flag_write(self):
        self.mode = "flags"
        self.padded = False  # the header blocks grow (2, 9) and shrink (1, 7): both passes
        self.kill_everywhere(segment=3000, points=90)

    def test_kill_at_every_step_of_a_flag_write_small_segments(self):
        self.mode = "flags"
        self.padded = False
        self.kill_everywhere(segment=500, points=90)

    def test_kill_at_every_step_of_a_flag_write_of_every_message(self):
        # every header block changes and segments hold several messages: the small steps
        # are done in batches (the bytes they may cover saved first, one sync each)
        self.mode = "flags"
        self.padded = False
        self.new_flags = {u: {SEEN, ANSWERED} for u in range(2, 16)} | {1: set()}
        self.kill_everywhere(segment=40000, points=90)

    def test_append_by_another_program_after_a_kill(self):
        self.append_after_kills(3000, lambda steps: (steps // 3, steps // 2, steps - 4))

    def test_append_by_another_program_after_a_kill_in_a_batch(self):
        # segments that hold several kept runs, and an append longer than what the
        # expunge removes: the batch cut short is redone as it was begun (its saved
        # bytes are those of its own runs), without the run the append adds
        self.append_after_kills(200_000, lambda steps: range(1, steps + 1), big=True)

    def append_after_kills(self, segment: int, points, big: bool = False) -> None:
        """Kill the expunge at C{points(steps)}, append as another program does, reopen."""
        self.reset()
        counter = _KillingOs(0)
        self.patch(rewrite, "os", counter)
        self.patch(rewrite, "SEGMENT", segment)
        self.successResultOf(self.open(self.new_store()).expunge(sorted(self.dropped)))
        steps = counter.count
        other = message(99)
        if big:
            removed = self.pristine_inbox().stat().st_size - self.inbox.stat().st_size
            other += b"".join(b"more %d\n" % i for i in range(removed // 6))
        for at in points(steps):
            self.reset()
            self.assertTrue(os.WIFSIGNALED(self.expunge_in_child(at, segment)))
            lock = acquire_dotlock(self.inbox, time.monotonic() + 10)
            try:
                with open(self.inbox, "ab") as fh:
                    fcntl.lockf(fh, fcntl.LOCK_EX)
                    fh.write(b"From x Mon Jan  1 00:00:00 2024\n" + other + b"\n")
            finally:
                release_dotlock(lock)
            f = self.open(self.new_store())
            mids = []
            for info in f.messages():
                with f.open_message(info.uid) as fh:
                    data = fh.read()
                mid = int(data.split(b"\r\n", 1)[0].split(b"m", 1)[1])
                want = crlf(other if mid == 99 else message(mid))
                self.assertTrue(data == want, f"step {at}: message {mid} is damaged")
                mids.append(mid)
            self.assertEqual(mids[-1], 99, f"step {at}")
            kept = sorted(m for u, (m, _, _) in self.want.items() if u not in self.dropped)
            if sorted(mids[:-1]) != kept:  # killed before the journal's plan was complete
                self.assertEqual(sorted(mids[:-1]), sorted(m for m, _, _ in self.want.values()))


def _messages(mbox: Path) -> list[bytes]:
    """The messages of an mbox file, each from its From line on."""
    data = mbox.read_bytes()
    starts = [0] + [i + 2 for i in range(len(data)) if data.startswith(b"\n\nFrom ", i)]
    return [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]


class _Recording(_KillingOs):
    """L{_KillingOs} that also notes at which step each write happens."""

    def __init__(self, at: int) -> None:
        super().__init__(at)
        object.__setattr__(self, "writes", [])

    def write(self, fd, data):
        self.writes.append((self.count + 1, bytes(data)))
        return _KillingOs.write(self, fd, data)


class SecondKillTests(KillTests):
    """Kills during recovery, and another program appending between kill and recovery."""

    # only the tests below (KillTests' own run there)
    test_kill_at_every_step_small_segments = None
    test_kill_at_every_step_segments_within_shift = None
    test_kill_at_every_step_of_a_flag_write = None
    test_kill_at_every_step_of_a_flag_write_small_segments = None
    test_append_by_another_program_after_a_kill = None

    def recover_in_child(self, at: int) -> int:
        """Fork; the child opens the folder (finishing the rewrite), killed at step C{at}."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                rewrite.SEGMENT = 3000
                rewrite.os = _KillingOs(at)  # type: ignore[attr-defined]
                self.successResultOf(self.new_store().open_folder(USER, "INBOX"))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        lock = self.inbox.with_name("INBOX.lock")
        if lock.exists():
            os.utime(lock, (time.time() - 3600, time.time() - 3600))
        return status

    def test_kill_while_a_journal_line_is_written_then_during_recovery(self):
        self.reset()
        rec = _Recording(0)
        self.patch(rewrite, "os", rec)
        self.patch(rewrite, "SEGMENT", 3000)
        self.change(self.new_store())
        p_lines = [n for n, data in rec.writes if data.startswith(b"p ")]
        for first in p_lines[:2]:
            for second in range(1, 25, 2):
                self.reset()
                self.assertTrue(os.WIFSIGNALED(self.expunge_in_child(first, 3000)))
                self.recover_in_child(second)
                self.assertTrue(self.check(f"kills at {first} then {second}"))

    def append_other(self, data: bytes) -> None:
        lock = acquire_dotlock(self.inbox, time.monotonic() + 10)
        try:
            with open(self.inbox, "ab") as fh:
                fcntl.lockf(fh, fcntl.LOCK_EX)
                fh.write(data)
        finally:
            release_dotlock(lock)

    def test_append_after_a_kill_around_the_truncate(self):
        counter = _KillingOs(0)
        self.reset()
        self.patch(rewrite, "os", counter)
        self.patch(rewrite, "SEGMENT", 3000)
        self.change(self.new_store())
        steps = counter.count
        kept = sorted(m for u, (m, _, _) in self.want.items() if u not in self.dropped)
        seen = set()
        for at in range(steps, 0, -1):
            self.reset()
            self.assertTrue(os.WIFSIGNALED(self.expunge_in_child(at, 3000)))
            (journal,) = list((self.root / "index").rglob("INBOX.rewrite")) or [None]
            if journal is None:
                continue
            text = journal.read_bytes()
            stages = [ln[:1] for ln in text.split(b"\n")[1:-1]]
            if b"t" not in stages or b"f" in stages:
                continue
            plan = rewrite.Plan.from_json(text.split(b"\n")[0])
            if b"t" not in stages or b"f" in stages:
                continue
            truncated = self.inbox.stat().st_size == plan.new_size
            if truncated in seen:
                continue
            seen.add(truncated)
            # another program appends: exactly as many bytes as the expunge removed
            n = plan.old_size - plan.new_size
            head = b"From x Mon Jan  1 00:00:00 2024\nSubject: m99\nMessage-ID: <99@rw>\n\n"
            self.append_other(head + b"x" * (n - len(head) - 2) + b"\n\n")
            store = self.new_store()
            f = self.open(store)
            mids = []
            for info in f.messages():
                with f.open_message(info.uid) as fh:
                    data = fh.read()
                mid = int(data.split(b"\r\n", 1)[0].split(b"m", 1)[1])
                if mid != 99:
                    self.assertTrue(data == crlf(message(mid)), f"step {at}: {mid} damaged")
                mids.append(mid)
            self.assertEqual(sorted(mids[:-1]), kept, f"step {at} (truncated: {truncated})")
            self.assertEqual(mids[-1], 99, f"step {at} (truncated: {truncated})")
        self.assertEqual(seen, {True, False})

    def test_file_rewritten_by_another_program_after_a_kill(self):
        """A journal about a file that mutt rewrote since is dropped; the file is rescanned."""

        def drop_m1(data: bytes) -> bytes:
            start = data.index(b"\nFrom ", 10) + 1
            return data[start:]

        def mark_m1_read(data: bytes) -> bytes:
            return data.replace(b"Subject: m1\n", b"Subject: m1\nStatus: RO\n", 1)

        for edit, gone in ((drop_m1, {1}), (mark_m1_read, set())):
            # the last kill after which the mbox is still untouched (the plan is written)
            at = 0
            for k in range(1, 12):
                self.reset()
                before = self.inbox.read_bytes()
                self.expunge_in_child(k, 3000)
                journal = list((self.root / "index").rglob("INBOX.rewrite"))
                if journal and self.inbox.read_bytes() == before:
                    at = k
            self.assertGreater(at, 0)
            self.reset()
            self.expunge_in_child(at, 3000)
            lock = acquire_dotlock(self.inbox, time.monotonic() + 10)
            try:
                with open(self.inbox, "r+b") as fh:  # mutt: the same inode
                    fcntl.lockf(fh, fcntl.LOCK_EX)
                    data = edit(fh.read())
                    fh.seek(0)
                    fh.write(data)
                    fh.truncate()
            finally:
                release_dotlock(lock)
            got = self.contents(self.open(self.new_store()))  # opens, reads every message intact
            want = {u: m for u, (m, _, _) in self.want.items() if u not in gone}
            self.assertEqual({u: m for u, (m, _, _) in got.items()}, want, edit.__name__)
            self.assertEqual(list((self.root / "index").rglob("*.rewrite*")), [])


def _drop_m1(data: bytes) -> bytes:
    """What mutt writes when m1 is deleted: the file from the second message on."""
    return data[data.index(b"\nFrom ", 10) + 1 :]


class BatchReviewTests(SecondKillTests):
    """Kills inside a batch of small steps, then another program acts before recovery."""

    def rewrite_in_place_by_other(self, edit) -> None:
        lock = acquire_dotlock(self.inbox, time.monotonic() + 10)
        try:
            with open(self.inbox, "r+b") as fh:  # mutt: the same inode
                fcntl.lockf(fh, fcntl.LOCK_EX)
                data = edit(fh.read())
                fh.seek(0)
                fh.write(data)
                fh.truncate()
        finally:
            release_dotlock(lock)

    def kill_after_the_batch_save(self, segment: int) -> int:
        """The last kill after which the batch's bytes are saved and the mbox is untouched."""
        at = 0
        for k in range(1, 12):
            self.reset()
            before = self.inbox.read_bytes()
            self.expunge_in_child(k, segment)
            saves = [p for p in self.root.rglob("INBOX.rewrite-save") if p.stat().st_size]
            if saves and self.inbox.read_bytes() == before:
                at = k
        self.assertGreater(at, 0)
        return at

    def test_batch_save_file_of_the_older_format_is_refused(self):
        # the older format saved only the source bytes within the span, with the header
        # "STEP 0 LEN CRC LAST": it cannot show that the file is unchanged, so recovery
        # refuses it rather than writing over a file another program may have rewritten
        segment = 1 << 20
        at = self.kill_after_the_batch_save(segment)
        self.reset()
        self.expunge_in_child(at, segment)
        (save,) = list(self.root.rglob("INBOX.rewrite-save"))
        words = save.read_bytes().split(b"\n", 1)[0].split()
        self.assertEqual(words[0], b"b")  # the new format: b STEP LAST LO LEN CRC NEWCRC
        data = b"x" * 100
        save.write_bytes(b"%s 0 100 %d %s\n" % (words[1], zlib.crc32(data), words[2]) + data)
        before = self.inbox.read_bytes()
        err = self.failureResultOf(self.new_store().open_folder(USER, "INBOX"), OSError)
        self.assertIn("older version", str(err.value))
        self.assertEqual(self.inbox.read_bytes(), before)
        self.assertTrue(save.exists())
        self.flushLoggedErrors()

    def test_file_rewritten_by_another_program_after_a_kill_in_a_batch(self):
        def mark_m3_read(data: bytes) -> bytes:  # the file grows: taken for an append
            return data.replace(b"Subject: m3\n", b"Subject: m3\nStatus: RO\n", 1)

        segment = 1 << 20  # the whole expunge is one batch
        at = self.kill_after_the_batch_save(segment)
        for edit, gone in ((mark_m3_read, set()), (_drop_m1, {1})):
            self.reset()
            self.expunge_in_child(at, segment)
            self.rewrite_in_place_by_other(edit)
            got = self.contents(self.open(self.new_store()))  # every message reads intact
            want = {u: m for u, (m, _, _) in self.want.items() if u not in gone}
            self.assertEqual({u: m for u, (m, _, _) in got.items()}, want, edit.__name__)
            self.assertEqual(list((self.root / "index").rglob("*.rewrite*")), [])

    @pytest.mark.xfail(
        strict=True,
        reason="a dropped last message that another program rewrote longer after the kill "
        "lies outside every run and the batch's span: the growth is taken for an append, and "
        "the last bytes of that message are moved behind the kept ones as an x run",
    )
    def test_dropped_last_message_rewritten_by_another_program_after_a_kill(self):
        def mark_m15_read(data: bytes) -> bytes:  # the file grows: taken for an append
            return data.replace(b"Subject: m15\n", b"Subject: m15\nStatus: RO\n", 1)

        self.dropped = {2, 5, 6, 11, 15}  # the last message goes
        segment = 1 << 20  # the whole expunge is one batch
        at = self.kill_after_the_batch_save(segment)
        self.reset()
        self.expunge_in_child(at, segment)
        self.rewrite_in_place_by_other(mark_m15_read)
        got = self.contents(self.open(self.new_store()))  # every message reads intact
        self.assertEqual(
            {u: m for u, (m, _, _) in got.items()}, {u: m for u, (m, _, _) in self.want.items()}
        )
        self.assertEqual(list((self.root / "index").rglob("*.rewrite*")), [])

    def test_appends_around_the_truncate_and_a_kill_in_recovery(self):
        self.patch(rewrite, "SEGMENT", 3000)  # as recover_in_child has it
        self.reset()
        counter = _KillingOs(0)
        self.patch(rewrite, "os", counter)
        self.change(self.new_store())
        kept = sorted(m for u, (m, _, _) in self.want.items() if u not in self.dropped)
        other = b"From x Mon Jan  1 00:00:00 2024\n" + message(99) + b"\n"
        tried = 0
        for at in range(counter.count, 0, -1):
            self.reset()
            self.expunge_in_child(at, rewrite.SEGMENT)
            (journal,) = list((self.root / "index").rglob("INBOX.rewrite")) or [None]
            if journal is None or b"\nt " not in journal.read_bytes():
                continue
            size = self.pristine_inbox().stat().st_size
            if b"\nf\n" in journal.read_bytes() or self.inbox.stat().st_size < size:
                continue  # only a kill before the truncate
            for second in range(1, 8):
                self.reset()
                self.expunge_in_child(at, rewrite.SEGMENT)
                self.rewrite_in_place_by_other(lambda d: d + other)
                self.recover_in_child(second)
                self.rewrite_in_place_by_other(lambda d: d + other)
                self.patch(rewrite, "os", _KillingOs(0))
                f = self.open(self.new_store())
                mids = []
                for info in f.messages():
                    with f.open_message(info.uid) as fh:
                        data = fh.read()
                    mid = int(data.split(b"\r\n", 1)[0].split(b"m", 1)[1])
                    self.assertTrue(data == crlf(message(mid)), f"{at}, {second}: m{mid}")
                    mids.append(mid)
                self.assertEqual(mids, [*kept, 99, 99], f"kills at {at} then {second}")
                tried += 1
        self.assertGreater(tried, 0)

    def test_append_after_a_kill_around_the_growth(self):
        # header blocks that grow only (the bytes move up): another program appends after a
        # kill at every step, the one between the g line and the growth too
        self.mode = "flags"
        self.padded = False
        self.new_flags = {2: {SEEN, ANSWERED}, 9: {FLAGGED}}
        self.reset()
        counter = _KillingOs(0)
        self.patch(rewrite, "os", counter)
        self.change(self.new_store())
        for at in range(1, counter.count + 1):
            self.reset()
            self.assertTrue(os.WIFSIGNALED(self.expunge_in_child(at, rewrite.SEGMENT)))
            lock = acquire_dotlock(self.inbox, time.monotonic() + 10)
            try:
                with open(self.inbox, "ab") as fh:
                    fcntl.lockf(fh, fcntl.LOCK_EX)
                    fh.write(b"From x Mon Jan  1 00:00:00 2024\n" + message(99) + b"\n")
            finally:
                release_dotlock(lock)
            got = self.contents(self.open(self.new_store()))  # every message reads intact
            mids = [m for m, _, _ in got.values()]
            self.assertEqual(mids, [m for m, _, _ in self.want.values()] + [99], f"step {at}")
            self.assertEqual(list((self.root / "index").rglob("*.rewrite*")), [], f"step {at}")


for _name in [n for n in dir(SecondKillTests) if n.startswith("test_")]:
    setattr(BatchReviewTests, _name, None)  # only its own tests run there
