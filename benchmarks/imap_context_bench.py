#!/usr/bin/env python3
"""
Time the live results of SEARCH and SORT with UPDATE (RFC 5267 4.3) on a
big mbox folder: what the searching commands cost, and what telling them of
one new message and of one flag change costs (a NOOP of the watching
session), which should not grow with the folder.

    .venv/bin/python benchmarks/imap_context_bench.py [-n 100000] [--rounds 5]

A real ``twistd -n mailsrv`` over C{-n} generated messages (tests/sort_corpus.py);
session A holds a live header search, a live flag search and a live SORT by
subject; session B appends a message and flags one; session C, without live
results, catches up too (the baseline). Prints medians [min-max].
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.imap_sort_bench import USER, session, spread, timed  # noqa: E402
from tests import sort_corpus  # noqa: E402
from tests.e2e import PASSWORD, MailServer  # noqa: E402

LIVE = [
    b"UID SEARCH RETURN (UPDATE COUNT) SUBJECT re",
    b"UID SEARCH RETURN (UPDATE COUNT) FLAGGED",
    b"UID SORT RETURN (UPDATE COUNT) (SUBJECT) UTF-8 ALL",
]
NEW = b"Subject: Re: a new one\r\nFrom: x@example.test\r\n\r\nbody\r\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="messages in the folder")
    ap.add_argument("--rounds", type=int, default=5, help="changes told per kind")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="context-bench-"))
    try:
        (base / "mailsrv").mkdir()
        server = MailServer(base / "mailsrv")
        server.add_user(USER)
        inbox = server.inbox(USER)
        inbox.parent.mkdir(parents=True, exist_ok=True)
        inbox.write_bytes(sort_corpus.generated_mbox(args.n))
        server.start()
        try:
            a, _ = session(server.ports["imap"], USER, PASSWORD)
            b, _ = session(server.ports["imap"], USER, PASSWORD)
            c, _ = session(server.ports["imap"], USER, PASSWORD)  # no live results: the baseline
            searches = {command: timed(a, command)[0] for command in LIVE}
            arrivals, flags, plain_arrivals, plain_flags = [], [], [], []
            for i in range(args.rounds):
                b.cmd(b"APPEND INBOX {%d}\r\n" % len(NEW) + NEW)
                took, told = timed(a, b"NOOP")
                assert told.count(b"ADDTO") == 2, told
                arrivals.append(took)
                plain_arrivals.append(timed(c, b"NOOP")[0])
                b.cmd(b"UID STORE %d +FLAGS.SILENT (\\Flagged)" % (i + 1))
                took, told = timed(a, b"NOOP")
                assert told.count(b"ADDTO") == 1, told
                flags.append(took)
                plain_flags.append(timed(c, b"NOOP")[0])
            for client in (a, b, c):
                client.close()
        finally:
            server.close()
        print(f"{args.n} messages; seconds, median [min-max] of {args.rounds}")
        for command, took in searches.items():
            print(f"| {command.decode()} | {took:.3f} |")
        print(f"| NOOP telling 3 live results of a new message | {spread(arrivals)} |")
        print(f"| NOOP telling 3 live results of a flag change | {spread(flags)} |")
        print(f"| NOOP of a session without live results, new message | {spread(plain_arrivals)} |")
        print(f"| NOOP of a session without live results, flag change | {spread(plain_flags)} |")
        print(
            f"(median new-message update / SORT: {statistics.median(arrivals) / searches[LIVE[2]]:.4f})"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
