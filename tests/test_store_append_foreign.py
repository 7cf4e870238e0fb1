"""
kill -9 in the middle of a multi-message append (IFolder.append_many), then
another program (a Dovecot LDA, mutt: they take our dead process's dotlock as
stale) appends a message before mailsrv runs again: the recovery that cuts
our half-written append away must not cut that message away with it.

    python -m tests.test_store_append_foreign ROOT   (the worker: appends, hangs part way)
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.spool import BytesSource
from mailsrv.store.locking import MboxLock
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.names import user_dir
from tests.store_contract import SyncReactor, SyncThreadPool
from tests.store_crash_worker import ManualPool, Reactor

REPO = Path(__file__).resolve().parent.parent
USER = "foreign@example.test"
BIG = b"Subject: big\n\n" + b"".join(b"line %d of the big one\n" % i for i in range(200_000))
FOREIGN = b"From someone@example.org Mon Dec  7 00:00:00 2026\nSubject: foreign\n\nkeep me\n"


class _HangsPartWay:
    """A source whose second read (the store's write) hangs half way: the process is then killed."""

    def __init__(self, data: bytes, out) -> None:
        self.size = len(data)
        self._data = data
        self._out = out
        self._opened = 0

    def open(self):
        self._opened += 1
        if self._opened == 1:
            return io.BytesIO(self._data)
        return _Hanging(self._data[: len(self._data) // 2], self._out)


class _Hanging(io.RawIOBase):
    def __init__(self, data: bytes, out) -> None:
        self._data = data
        self._pos = 0
        self._out = out

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pos >= len(self._data):
            self._out.write("hanging\n")
            self._out.flush()
            while True:  # until killed
                time.sleep(60)
        n = min(len(b), len(self._data) - self._pos, 64 * 1024)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def worker(root: Path) -> None:
    pool = ManualPool()
    store = MboxMailStore(root / "mail", root / "index", Reactor(), pool)
    store.deliver(USER, BytesSource(b"Subject: before\n\nalready here\n"), "a@b.test")
    pool.run()
    opened: list = []
    store.open_folder(USER, "INBOX").addCallback(opened.append)
    pool.run()
    items = [
        (BytesSource(b"Subject: first\n\nsmall\n"), frozenset(), None),
        (_HangsPartWay(BIG, sys.stdout), frozenset(), None),
    ]
    opened[0].append_many(items)
    pool.run()


class ForeignAppendAfterCrash(SynchronousTestCase):
    def kill_part_way(self) -> Path:
        """Run the worker until it hangs half way through its append; kill -9 it; the root."""
        root = Path(self.mktemp())
        root.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_store_append_foreign", str(root)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            line = proc.stdout.readline()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.stdout.close()
            proc.wait()
        self.assertEqual(line, b"hanging\n")
        return root

    def messages(self, root: Path) -> list[bytes]:
        store = MboxMailStore(root / "mail", root / "index", SyncReactor(), SyncThreadPool())
        folder = self.successResultOf(store.open_folder(USER, "INBOX"))
        self.addCleanup(folder.close)
        bodies = []
        for info in folder.messages():
            with folder.open_message(info.uid) as fh:
                bodies.append(fh.read())
        return bodies

    def test_half_written_append_is_cut_away(self):
        root = self.kill_part_way()
        path = user_dir(root / "mail", USER) / "INBOX"
        self.assertIn(b"Subject: first", path.read_bytes())
        bodies = self.messages(root)
        self.assertEqual(len(bodies), 1)
        self.assertIn(b"already here", bodies[0])
        self.assertNotIn(b"Subject: first", path.read_bytes())

    def test_foreign_message_after_a_half_written_append_is_kept(self):
        root = self.kill_part_way()
        path = user_dir(root / "mail", USER) / "INBOX"
        half = path.stat().st_size
        # Another program appends, as mutt and Dovecot do: a blank line, then its message.
        with MboxLock(path, 10.0) as lk:
            end = os.fstat(lk.fd).st_size
            tail = os.pread(lk.fd, 2, end - 2)
            pad = b"" if tail == b"\n\n" else b"\n" if tail.endswith(b"\n") else b"\n\n"
            os.pwrite(lk.fd, pad + FOREIGN, end)
        self.assertGreater(path.stat().st_size, half)

        bodies = self.messages(root)
        self.assertIn(b"already here", bodies[0])
        self.assertTrue(any(b"keep me" in b for b in bodies), "the foreign message was lost")
        self.assertIn(b"keep me", path.read_bytes())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
