"""
IFolder.append_many of a large batch streams its messages from their sources
to the mbox: what it holds in memory does not grow with the batch.
"""

from __future__ import annotations

import tracemalloc

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import SyncReactor, SyncThreadPool

USER = "mem@example.test"
COUNT = 200
SIZE = 200 * 1024  # each under the store's "small message" size, so read whole once


class _Source:
    """A message of C{SIZE} octets made on demand (no copy of it kept here)."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.size = len(self._data())

    def _data(self) -> bytes:
        line = b"message %d says hello to the mbox file\n" % self.i
        return b"Subject: m%d\n\n" % self.i + line * (SIZE // len(line))

    def open(self):
        import io

        return io.BytesIO(self._data())


class AppendManyMemory(SynchronousTestCase):
    def test_batch_is_streamed_not_held(self):
        root = self.mktemp()
        store = MboxMailStore(f"{root}/mail", f"{root}/index", SyncReactor(), SyncThreadPool())
        folder = self.successResultOf(store.open_folder(USER, "INBOX"))
        self.addCleanup(folder.close)
        items = [(_Source(i), frozenset(), None) for i in range(COUNT)]
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        uids = self.successResultOf(folder.append_many(items))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertEqual(uids, list(range(1, COUNT + 1)))
        total = COUNT * SIZE  # 40 MB
        self.assertLess(peak, total // 4, f"peak {peak} bytes for a {total} byte batch")

    def test_nothing_to_append(self):
        root = self.mktemp()
        store = MboxMailStore(f"{root}/mail", f"{root}/index", SyncReactor(), SyncThreadPool())
        folder = self.successResultOf(store.open_folder(USER, "INBOX"))
        self.addCleanup(folder.close)
        self.assertEqual(self.successResultOf(folder.append_many([])), [])
