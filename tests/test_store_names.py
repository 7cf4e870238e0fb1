"""Folder names as the mbox store keeps them on disk: the longest it takes, and one longer."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.interfaces import FolderError
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.names import canonical_folder, fits_on_disk
from tests.store_contract import NOW, USER, SyncReactor, SyncThreadPool


class LongNameTests(SynchronousTestCase):
    def setUp(self):
        root = Path(self.mktemp())
        self.store = MboxMailStore(
            root / "mail", root / "index", SyncReactor(), SyncThreadPool(), clock=lambda: NOW
        )

    def use(self, name: str) -> None:
        """Create, deliver to, lock, list and delete folder C{name}."""
        self.successResultOf(self.store.create_folder(USER, name))
        d = self.store.deliver(USER, BytesSource(b"Subject: x\n\nbody\n"), "a@example.test", name)
        self.successResultOf(d)
        f = self.successResultOf(self.store.open_folder(USER, name))
        self.successResultOf(f.set_flags({1: frozenset({"\\Seen"})}))
        f.close()
        self.assertIn((name, True), self.successResultOf(self.store.list_folders(USER)))
        self.successResultOf(self.store.delete_folder(USER, name))

    def test_longest_level_works_and_one_more_is_refused(self):
        level = "l" * 155
        self.assertTrue(fits_on_disk(level))
        self.use(level)
        self.assertFalse(fits_on_disk(level + "l"))
        self.failureResultOf(self.store.create_folder(USER, level + "l"), FolderError)
        self.failureResultOf(self.store.open_folder(USER, level + "l"), FolderError)

    def test_longest_quoted_name_works_and_one_more_is_refused(self):
        # The index file is named by the whole name quoted: "/" is 3 octets, "é" 6.
        name = "a/" * 51 + "é" * 5 + "b"
        self.assertEqual(len(quote(name.encode(), safe="")), 255 - 20)
        self.assertTrue(fits_on_disk(name))
        self.use(name)
        self.assertFalse(fits_on_disk(name + "b"))
        with self.assertRaises(FolderError):
            canonical_folder(name + "b")
