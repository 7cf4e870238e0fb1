#!/usr/bin/env python3
"""
How long an expunge of one message holds the mbox locked, on a big INBOX.

    .venv/bin/python benchmarks/store_expunge.py [--mb 90] [--size 4500] [--runs 3]

Builds an INBOX of about --mb megabytes (messages of --size bytes) once,
indexes it, then for each position (first, middle, near the end) and run:
copies the mbox and its index afresh, opens the folder and times the
expunge of that one message (the lock is held for nearly all of it: the
rewrite, the fsyncs and the index update), and the writing of its new flags
into its Status: header when the session leaves. Prints the median per position.
Run it with PYTHONPATH pointing at another checkout to compare versions.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from store_inline import Pool, Reactor, result  # benchmarks/ is on sys.path

from mailsrv.store.mbox import MboxMailStore

USER = "bench@example.test"


def build(root: Path, mb: int, size: int) -> int:
    inbox = root / "mail" / "example.test" / "bench" / "INBOX"
    inbox.parent.mkdir(parents=True)
    n = mb * 1024 * 1024 // size
    with open(inbox, "wb") as f:
        for i in range(n):
            head = b"From s@x Mon Jan  1 00:00:00 2024\nSubject: %d\nMessage-ID: <%d@b>\n\n" % (
                i,
                i,
            )
            f.write(head + b"x" * (size - len(head) - 2) + b"\n\n")
    store = MboxMailStore(root / "mail", root / "index", Reactor(), Pool())
    result(store.open_folder(USER, "INBOX")).close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=90)
    ap.add_argument("--size", type=int, default=4500)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        n = build(base, args.mb, args.size)
        print(f"{n} messages, {args.mb} MB; {sys.modules['mailsrv'].__file__}")
        for label, uid in (("first", 1), ("middle", n // 2), ("near the end", n - 10)):
            times = []
            for _ in range(args.runs):
                root = Path(tmp) / "run"
                shutil.rmtree(root, ignore_errors=True)
                shutil.copytree(base, root)
                store = MboxMailStore(root / "mail", root / "index", Reactor(), Pool())
                folder = result(store.open_folder(USER, "INBOX"))
                t0 = time.perf_counter()
                assert result(folder.expunge([uid])) == [uid]
                times.append(time.perf_counter() - t0)
                folder.close()
            print(f"expunge {label:13s} (uid {uid:6d}): {statistics.median(times) * 1000:8.1f} ms")
        if not hasattr(MboxMailStore, "write_flags"):
            return
        for label, uid in (("first", 1), ("middle", n // 2), ("near the end", n - 10)):
            times = []
            for _ in range(args.runs):
                root = Path(tmp) / "run"
                shutil.rmtree(root, ignore_errors=True)
                shutil.copytree(base, root)
                store = MboxMailStore(root / "mail", root / "index", Reactor(), Pool())
                folder = result(store.open_folder(USER, "INBOX"))
                result(folder.set_flags({uid: {"\\Seen"}}))
                t0 = time.perf_counter()
                folder.close()  # the last session leaves: Status: RO is written
                times.append(time.perf_counter() - t0)
            print(f"flags   {label:13s} (uid {uid:6d}): {statistics.median(times) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
