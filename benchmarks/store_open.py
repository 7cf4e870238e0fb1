#!/usr/bin/env python3
"""
Time and peak memory to open a big INBOX with the mbox store.

    .venv/bin/python benchmarks/store_open.py [-n 100000] [-s 4096] [--runs 3] [--mbox FILE]
    .venv/bin/python benchmarks/store_open.py --deliver [-n 100000] [-s 4096] [-c 20] [--runs 3]

Generates the mbox with ../shared/peers/gen_mbox.py (another program, so the
store has never seen it), then, each in a fresh process: opens it with no index
(cold: full scan + index build), and again with the index (warm). Also times a
POP3-style read of every message. Prints the median of --runs and the peak RSS.

With --deliver the INBOX is instead filled through MboxMailStore.deliver (-c
concurrent callers, as SMTP connections would, so deliveries group-commit in
batches) by a process that never opens it; then each run opens it in a fresh
process with the index the deliveries left (the first open after SMTP filled it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GEN = Path("/work/shared/peers/gen_mbox.py")
USER = "bench@example.test"


def child(root: str, read_all: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from twisted.internet import defer, task
    from twisted.python.threadpool import ThreadPool

    from mailsrv.store.mbox import MboxMailStore

    async def main(reactor):
        pool = ThreadPool(minthreads=1, maxthreads=4)
        pool.start()
        try:
            store = MboxMailStore(Path(root) / "mail", Path(root) / "index", reactor, pool)
            t0 = time.perf_counter()
            folder = await store.open_folder(USER, "INBOX")
            t1 = time.perf_counter()
            msgs = folder.messages()
            out = {"open_s": t1 - t0, "messages": len(msgs)}
            if read_all:
                t2 = time.perf_counter()
                total = 0
                for info in msgs[:10000]:
                    with folder.open_message(info.uid) as fh:
                        total += len(fh.read())
                out["read10k_s"] = time.perf_counter() - t2
                out["read10k_bytes"] = total
            folder.close()
            await defer.succeed(None)
        finally:
            pool.stop()
        out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))

    task.react(lambda r: defer.ensureDeferred(main(r)))


def fill(root: str, n: int, size: int, callers: int) -> None:
    """Deliver C{n} messages of about C{size} bytes to the INBOX (fresh process)."""
    sys.path.insert(0, str(ROOT))
    from twisted.internet import defer, task
    from twisted.python.threadpool import ThreadPool

    from mailsrv.spool import BytesSource
    from mailsrv.store.mbox import MboxMailStore

    line = b"The quick brown fox jumps over the lazy dog, and From here on it goes.\n"
    body = line * max(1, (size - 200) // len(line))

    async def main(reactor):
        pool = ThreadPool(minthreads=1, maxthreads=4)
        pool.start()
        try:
            store = MboxMailStore(Path(root) / "mail", Path(root) / "index", reactor, pool)
            sent = 0

            async def caller():
                nonlocal sent
                while sent < n:
                    sent += 1
                    msg = (
                        b"From: a%d@example.test\nTo: %s\nSubject: message %d\n"
                        b"Message-ID: <%d.bench@example.test>\n\n"
                        % (sent % 97, USER.encode(), sent, sent)
                    ) + body
                    await store.deliver(USER, BytesSource(msg), f"a{sent % 97}@example.test")

            t0 = time.perf_counter()
            await defer.gatherResults([defer.ensureDeferred(caller()) for _ in range(callers)])
            dt = time.perf_counter() - t0
        finally:
            pool.stop()
        print(json.dumps({"fill_s": dt, "rate": n / dt}))

    task.react(lambda r: defer.ensureDeferred(main(r)))


def run_child(root: Path, read_all: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(root)] + (["--read-all"] if read_all else []),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=100000)
    ap.add_argument("-s", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mbox", help="use this mbox instead of generating one")
    ap.add_argument(
        "--deliver",
        action="store_true",
        help="fill the INBOX through MboxMailStore.deliver instead",
    )
    ap.add_argument("-c", type=int, default=20, help="concurrent callers with --deliver")
    ap.add_argument("--child")
    ap.add_argument("--fill")
    ap.add_argument("--read-all", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.read_all)
        return
    if args.fill:
        fill(args.fill, args.n, args.s, args.c)
        return
    work = Path(tempfile.mkdtemp(prefix="store-bench-"))
    if args.deliver:
        try:
            deliver_then_open(work, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        src = Path(args.mbox) if args.mbox else work / "gen.mbox"
        if not args.mbox:
            subprocess.run(
                [sys.executable, str(GEN), str(src), "-n", str(args.n), "-s", str(args.s)],
                check=True,
                capture_output=True,
            )
        inbox = work / "mail" / "example.test" / "bench" / "INBOX"
        inbox.parent.mkdir(parents=True)
        try:
            os.link(src, inbox)
        except OSError:
            shutil.copyfile(src, inbox)
        subprocess.run(["cat", str(inbox)], stdout=subprocess.DEVNULL, check=True)  # warm cache
        size_mb = inbox.stat().st_size / 1e6
        cold, warm = [], []
        for _ in range(args.runs):
            shutil.rmtree(work / "index", ignore_errors=True)
            cold.append(run_child(work))
            warm.append(run_child(work, read_all=True))

        def med(rs, k):
            return statistics.median(r[k] for r in rs)

        print(f"mbox: {cold[0]['messages']} messages, {size_mb:.0f} MB; median of {args.runs}")
        print(
            f"cold open (no index, full scan + index build): {med(cold, 'open_s'):.2f} s, "
            f"peak RSS {max(r['maxrss_mb'] for r in cold):.0f} MB"
        )
        print(
            f"warm open (index present):                    {med(warm, 'open_s'):.2f} s, "
            f"peak RSS {max(r['maxrss_mb'] for r in warm):.0f} MB"
        )
        print(
            f"read first 10,000 messages (open_message):    {med(warm, 'read10k_s'):.2f} s "
            f"({10000 / med(warm, 'read10k_s'):.0f} msg/s)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def deliver_then_open(work: Path, args: argparse.Namespace) -> None:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--fill",
            str(work),
            "-n",
            str(args.n),
            "-s",
            str(args.s),
            "-c",
            str(args.c),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    filled = json.loads(out.strip().splitlines()[-1])
    inbox = work / "mail" / "example.test" / "bench" / "INBOX"
    size_mb = inbox.stat().st_size / 1e6
    index = work / "index"
    saved = work / "index.saved"
    shutil.copytree(index, saved)
    runs = []
    for _ in range(args.runs):
        shutil.rmtree(index)
        shutil.copytree(saved, index)  # each run sees the index exactly as delivery left it
        runs.append(run_child(work))
    opened = runs[0]["messages"]
    print(
        f"filled by deliver(): {opened} messages, {size_mb:.0f} MB, {args.c} concurrent "
        f"callers: {filled['fill_s']:.1f} s ({filled['rate']:.0f} msg/s)"
    )
    print(
        f"first open after delivery, median of {args.runs}: "
        f"{statistics.median(r['open_s'] for r in runs):.2f} s, "
        f"peak RSS {max(r['maxrss_mb'] for r in runs):.0f} MB"
    )


if __name__ == "__main__":
    main()
