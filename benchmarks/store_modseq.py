#!/usr/bin/env python3
"""
What RFC 7162 mod-sequences cost the mbox store, and what they save a resync,
on a big INBOX.

    .venv/bin/python benchmarks/store_modseq.py [--count 100000] [--runs 200]

Builds an INBOX of --count delivered messages (as L{store_flag_write} does)
and indexes it; then times, each the median of --runs: a flag change of one
message in a session (L{IFolder.change_flags}: the index transaction that
also writes the modseq); and, after one flag change and one expunge, what a
QRESYNC resync asks the store (L{IFolder.changed_since},
L{IFolder.vanished_since} from the HIGHESTMODSEQ before them), against
reading every message's modseq from the session's view. Run it with
PYTHONPATH pointing at a checkout without modseqs to compare the flag
change (the rest is skipped there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from store_flag_write import USER, build  # benchmarks/ is on sys.path
from store_inline import Pool, Reactor, result

from mailsrv.store.mbox import MboxMailStore


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.count, args.size)
        print(f"{args.count} messages; {sys.modules['mailsrv'].__file__}")
        store = MboxMailStore(root / "mail", root / "index", Reactor(), Pool())
        folder = result(store.open_folder(USER, "INBOX"))
        seen = [False]

        def toggle() -> None:
            seen[0] = not seen[0]
            if seen[0]:
                result(folder.change_flags([args.count // 2], add={"\\Seen"}))
            else:
                result(folder.change_flags([args.count // 2], remove={"\\Seen"}))

        ms = median_ms(toggle, args.runs)
        print(f"change_flags of one message: {ms:8.3f} ms (median of {args.runs})")
        if not hasattr(folder, "changed_since"):
            return
        mark = folder.highest_modseq
        result(folder.change_flags([7], add={"\\Flagged"}))
        result(folder.expunge([9]))
        got = result(folder.changed_since(mark))
        gone = result(folder.vanished_since(mark))
        assert [u for u, _, _ in got] == [7] and gone == [9], (got, gone)
        ms = median_ms(lambda: result(folder.changed_since(mark)), args.runs)
        print(f"changed_since after one change: {ms:8.3f} ms (median of {args.runs})")
        ms = median_ms(lambda: result(folder.vanished_since(mark)), args.runs)
        print(f"vanished_since after one expunge: {ms:8.3f} ms (median of {args.runs})")

        def scan_view() -> None:
            [m.uid for m in folder.messages() if m.modseq > mark]

        ms = median_ms(scan_view, max(3, args.runs // 20))
        print(f"(for scale: every modseq of the view: {ms:8.3f} ms)")
        folder.close()


if __name__ == "__main__":
    main()
