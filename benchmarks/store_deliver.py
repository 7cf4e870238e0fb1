#!/usr/bin/env python3
"""
Store-level delivery rate: N messages of ~4 KB delivered to one INBOX by C
concurrent callers (as C SMTP connections would), each fsynced before its
Deferred fires; concurrent deliveries share a lock and an fsync (group commit).

    .venv/bin/python benchmarks/store_deliver.py [-n 2000] [-c 10]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("-c", type=int, default=10)
    args = ap.parse_args()

    from twisted.internet import defer, task
    from twisted.python.threadpool import ThreadPool

    from mailsrv.spool import BytesSource
    from mailsrv.store.mbox import MboxMailStore

    line = b"x" * 70 + b"\n"
    body = b"Subject: bench\n\n" + line * (4096 // len(line))

    async def run(reactor):
        root = Path(tempfile.mkdtemp(prefix="store-deliver-"))
        pool = ThreadPool(1, 8)
        pool.start()
        try:
            store = MboxMailStore(root / "mail", root / "index", reactor, pool)
            sent = 0

            async def caller():
                nonlocal sent
                while sent < args.n:
                    sent += 1
                    await store.deliver("u@example.test", BytesSource(body), "s@example.test")

            t0 = time.perf_counter()
            await defer.gatherResults([defer.ensureDeferred(caller()) for _ in range(args.c)])
            dt = time.perf_counter() - t0
            print(
                f"{args.n} x {len(body)} B, {args.c} concurrent: {dt:.2f} s, "
                f"{args.n / dt:.0f} msg/s (fsync per batch)"
            )
        finally:
            pool.stop()
            shutil.rmtree(root, ignore_errors=True)

    task.react(lambda r: defer.ensureDeferred(run(r)))


if __name__ == "__main__":
    main()
