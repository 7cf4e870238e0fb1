"""The store contract (tests/store_contract.py) on both stores."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.memory import MemoryMailStore
from tests.store_contract import NOW, StoreContract, SyncReactor, SyncThreadPool


class MemoryStoreContractTests(StoreContract, SynchronousTestCase):
    def make_store(self):
        return MemoryMailStore(clock=lambda: NOW)


class MboxStoreContractTests(StoreContract, SynchronousTestCase):
    def make_store(self):
        root = self.mktemp()
        from pathlib import Path

        self.root = Path(root)
        return MboxMailStore(
            self.root / "mail",
            self.root / "index",
            SyncReactor(),
            SyncThreadPool(),
            clock=lambda: NOW,
        )
