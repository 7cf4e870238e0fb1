"""
kill -9 of a process that is appending to or rewriting an mbox: afterwards the
file is valid mbox, every acknowledged message is there exactly once, nothing
is half there, and nothing whose expunge was acknowledged came back.
"""

from __future__ import annotations

import mailbox
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsrv.store.mbox import MboxMailStore
from tests.store_contract import SyncReactor, SyncThreadPool
from tests.store_crash_worker import USER, body

REPO = Path(__file__).resolve().parent.parent


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


class KillTests(SynchronousTestCase):
    rounds = 6

    def run_and_kill(self, root: Path, mode: str, first: int, seed: int) -> tuple[set, set]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.store_crash_worker",
                str(root),
                mode,
                str(first),
                str(seed),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            line = proc.stdout.readline()  # wait for the first durable message
            self.assertTrue(line.startswith(b"ack "), line)
            time.sleep(random.Random(seed).uniform(0.05, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read()
            proc.stdout.close()
            proc.wait()
        acked, expunged = set(), set()
        for ln in (line + rest).split(b"\n"):
            words = ln.split()
            if ln.startswith(b"ack ") and len(words) == 2:
                acked.add(int(words[1]))
            elif ln.startswith(b"expunged"):
                expunged.update(int(w) for w in words[1:])
            elif ln.startswith(b"expunging"):
                self.maybe_gone.update(int(w) for w in words[1:])
        return acked, expunged

    def check(self, root: Path, acked: set, expunged: set) -> list[int]:
        store = MboxMailStore(root / "mail", root / "index", SyncReactor(), SyncThreadPool())
        folder = self.successResultOf(store.open_folder(USER, "INBOX"))
        seen = []
        for info in folder.messages():
            with folder.open_message(info.uid) as fh:
                data = fh.read()
            self.assertEqual(len(data), info.size)
            mid = int(data.split(b"\r\n", 1)[0].split(b"m", 1)[1])
            self.assertEqual(data, crlf(body(mid)), f"message {mid} is damaged")
            seen.append(mid)
        folder.close()
        self.assertEqual(len(seen), len(set(seen)), "a message is there twice")
        # an expunge cut short by the kill may or may not have happened
        lost = acked - expunged - self.maybe_gone - set(seen)
        self.assertEqual(lost, set(), "acknowledged messages lost")
        self.assertEqual(set(seen) & expunged, set(), "expunged messages came back")
        path = root / "mail" / "example.test" / "crash" / "INBOX"
        box = mailbox.mbox(str(path), create=False)
        self.assertEqual(len(box), len(seen))
        box.close()
        return seen

    def kill_loop(self, mode: str) -> None:
        self.maybe_gone: set[int] = set()
        root = Path(self.mktemp())
        first = 1
        acked_all, expunged_all = set(), set()
        for r in range(self.rounds):
            acked, expunged = self.run_and_kill(root, mode, first, seed=r * 31 + len(mode))
            acked_all |= acked
            expunged_all |= expunged
            seen = self.check(root, acked_all, expunged_all)
            first = max([first, *acked_all, *seen]) + 10

    def test_kill_during_appends(self):
        self.kill_loop("append")

    def test_kill_during_expunge_rewrites(self):
        self.kill_loop("expunge")
