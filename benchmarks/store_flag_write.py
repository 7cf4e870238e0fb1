#!/usr/bin/env python3
"""
How long writing one message's flags holds the mbox locked, on a big INBOX.

    .venv/bin/python benchmarks/store_flag_write.py [--count 100000] [--size 300] [--runs 3]
    .venv/bin/python benchmarks/store_flag_write.py --foreign [--count 10000] [--size 4200]

Builds an INBOX of --count messages of about --size bytes once, each in the
form mailsrv stores a delivered message (L{mboxfmt.mbox_pieces}), and indexes
it; then for uid 1 and the last uid, per run: copies the mbox and its index
afresh, sets \\Seen in a session and times the session's leaving, which
writes Status: RO into the message's header (under the lock). Prints the
median per position.

With --foreign, the INBOX is written as another program writes it (no
padding field, so no flag write fits in place): per run, \\Seen is set on
every message (as a POP3 session that retrieved them all leaves it) and the
write-back of all their Status: fields, which grows every header block, is
timed. Run it with PYTHONPATH pointing at another checkout to
compare versions (each builds the file as its own delivery writes it).
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from store_inline import Pool, Reactor, result  # benchmarks/ is on sys.path

from mailsrv.store import mboxfmt
from mailsrv.store.mbox import MboxMailStore

USER = "bench@example.test"


def build(root: Path, count: int, size: int) -> None:
    inbox = root / "mail" / "example.test" / "bench" / "INBOX"
    inbox.parent.mkdir(parents=True)
    with open(inbox, "wb") as f:
        for i in range(count):
            head = b"Subject: %d\nMessage-ID: <%d@b>\n\n" % (i, i)
            msg = head + b"x" * max(1, size - len(head) - 40) + b"\n"
            f.write(b"From s@x Mon Jan  1 00:00:00 2024\n")
            f.write(b"".join(mboxfmt.mbox_pieces(io.BytesIO(msg))) + b"\n")
    store = MboxMailStore(root / "mail", root / "index", Reactor(), Pool())
    result(store.open_folder(USER, "INBOX")).close()


def build_foreign(root: Path, count: int, size: int) -> None:
    """An INBOX as another program writes it: no padding, no Status: yet."""
    inbox = root / "mail" / "example.test" / "bench" / "INBOX"
    inbox.parent.mkdir(parents=True)
    with open(inbox, "wb") as f:
        for i in range(count):
            head = b"From: s@x\nSubject: %d\nMessage-ID: <%d@b>\n\n" % (i, i)
            body = (b"y" * 75 + b"\n") * max(1, (size - len(head) - 40) // 76)
            f.write(b"From s@x Mon Jan  1 00:00:00 2024\n" + head + body + b"\n")
    store = MboxMailStore(root / "mail", root / "index", Reactor(), Pool())
    result(store.open_folder(USER, "INBOX")).close()


def all_seen(tmp: Path, base: Path, count: int, runs: int) -> None:
    """Time the write-back of \\Seen on every message of a foreign INBOX."""
    times = []
    for _ in range(runs):
        root = tmp / "run"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root)
        store = MboxMailStore(root / "mail", root / "index", Reactor(), Pool())
        folder = result(store.open_folder(USER, "INBOX"))
        result(folder.set_flags({uid: {"\\Seen"} for uid in range(1, count + 1)}))
        t0 = time.perf_counter()
        folder.close()  # the last session leaves: every Status: is written
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    spread = f"[{min(times) * 1000:.1f}-{max(times) * 1000:.1f}]"
    print(f"\\Seen on all {count} (no padding): {ms:8.1f} ms {spread} (median of {runs})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--foreign", action="store_true", help="no padding, all flags change")
    args = ap.parse_args()
    if args.foreign:
        count = 10_000 if args.count == ap.get_default("count") else args.count
        size = 4200 if args.size == ap.get_default("size") else args.size
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            build_foreign(base, count, size)
            mb = (base / "mail" / "example.test" / "bench" / "INBOX").stat().st_size / 1e6
            print(f"{count} messages, {mb:.1f} MB; {sys.modules['mailsrv'].__file__}")
            all_seen(Path(tmp), base, count, args.runs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        build(base, args.count, args.size)
        mb = (base / "mail" / "example.test" / "bench" / "INBOX").stat().st_size / 1e6
        print(f"{args.count} messages, {mb:.1f} MB; {sys.modules['mailsrv'].__file__}")
        for label, uid in (("first", 1), ("last", args.count)):
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
            ms = statistics.median(times) * 1000
            print(f"\\Seen on uid {uid:6d} ({label}): {ms:8.1f} ms (median of {args.runs})")


if __name__ == "__main__":
    main()
