#!/usr/bin/env python3
"""
Time IMAP LIST over many folders against a real ``twistd -n mailsrv``.

    .venv/bin/python benchmarks/list_bench.py [-n 10000] [--runs 5] [--pattern '*']

Makes a user with C{-n} folders (empty mbox files, a hundred to a directory
level, written straight to disk), starts the daemon on loopback, then per run
times ``LIST "" <pattern>`` over imaplib, and meanwhile, from a second
connection, how long a NOOP waits (what one big LIST costs every other
client). Prints the medians of --runs as JSON.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e import PASSWORD, MailServer  # noqa: E402

USER = "bench@example.test"


def make_folders(server: MailServer, n: int) -> None:
    """C{n} empty folders: C{d000/f00000} ... (a hundred a directory)."""
    home = server.data / "mail" / "example.test" / "bench"
    for i in range(n):
        d = home / f"d{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").touch()


def one_run(port: int, pattern: str) -> dict[str, float]:
    m = imaplib.IMAP4("127.0.0.1", port)
    m.login(USER, PASSWORD)
    other = imaplib.IMAP4("127.0.0.1", port)
    other.login(USER, PASSWORD)
    waits: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            t = time.perf_counter()
            other.noop()
            waits.append(time.perf_counter() - t)
            time.sleep(0.01)

    prober = threading.Thread(target=probe)
    t0 = time.perf_counter()
    prober.start()
    typ, data = m.list('""', pattern)
    elapsed = time.perf_counter() - t0
    done.set()
    prober.join()
    assert typ == "OK", data
    m.logout()
    other.logout()
    return {"list_s": elapsed, "entries": len(data), "noop_max_s": max(waits, default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10000, help="folders")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pattern", default="*")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="list-bench-"))
    try:
        server = MailServer(base)
        server.add_user(USER)
        make_folders(server, args.n)
        with server:
            port = server.ports["imap"]
            one_run(port, args.pattern)  # warm up: login creates the special folders
            runs = [one_run(port, args.pattern) for _ in range(args.runs)]
        out = {
            "folders": args.n,
            "pattern": args.pattern,
            "entries": runs[0]["entries"],
            "list_s_median": statistics.median(r["list_s"] for r in runs),
            "list_s_all": [round(r["list_s"], 3) for r in runs],
            "noop_max_s_median": statistics.median(r["noop_max_s"] for r in runs),
        }
        print(json.dumps(out))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
