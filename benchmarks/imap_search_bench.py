#!/usr/bin/env python3
"""
Time SEARCH programs that need only the index (flags, dates, sizes, UIDs),
mailsrv against Dovecot on the same mbox data, and how long another
session waits for a NOOP meanwhile; alone and with ten sessions searching
at once.

    .venv/bin/python benchmarks/imap_search_bench.py [-n 10000 100000] [--rounds 5] [--sessions 10]

Per size: an mbox INBOX of C{n} small messages (internal dates ten minutes
apart from 2022-01-01, two in three \\Seen, every tenth \\Flagged, every
seventeenth \\Deleted, sizes from about 300 to 2,700 bytes; the flags in
Status:/X-Status:, which both servers read) is put in a real ``twistd -n
mailsrv`` and, where it can run (root, Dovecot installed), a private Dovecot
(tests/dovecot_peer.py). Sessions SELECT INBOX and are kept throughout (the
server limits new connections a minute). Per round, per command: once
untimed, once timed from sending it to reading its tagged OK while another
session sends NOOPs one after the other (the longest wait is reported);
then, with C{--sessions}, that many sessions send it at once (the slowest
answer and the longest NOOP wait are reported). The answers of the two
servers are compared. Prints medians [min-max] in milliseconds, and the
load average.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.imap_flagsync_bench import Client, NoopProbe  # noqa: E402
from tests import dovecot_peer  # noqa: E402
from tests.e2e import PASSWORD, MailServer  # noqa: E402

USER = "bench@example.test"
START = 1_640_995_200  # 2022-01-01T00:00:00Z
STEP = 600  # seconds between internal dates


def commands(n: int) -> list[tuple[str, bytes]]:
    """(label, command) of the programs timed; SINCE names the day of the middle message."""
    mid = time.gmtime(START + STEP * (n // 2))
    since = time.strftime("%d-%b-%Y", mid).lstrip("0").encode()
    return [
        ("all", b"UID SEARCH ALL"),
        ("unseen", b"SEARCH UNSEEN"),
        ("uid-range", b"UID SEARCH UID %d:*" % (n // 2)),
        ("since", b"SEARCH SINCE " + since),
        ("flagged", b"SEARCH FLAGGED"),
        ("count-deleted", b"UID SEARCH RETURN (COUNT) DELETED"),
        ("or-seen-larger", b"SEARCH OR SEEN LARGER 1000"),
    ]


def folder(n: int) -> bytes:
    """C{n} small messages as an mbox file, with flags, dates and sizes spread."""
    parts = []
    for i in range(1, n + 1):
        t = START + STEP * (i - 1)
        status = b"Status: RO\n" if i % 3 else b"Status: O\n"
        x = (b"F" if i % 10 == 0 else b"") + (b"D" if i % 17 == 0 else b"")
        xstatus = b"X-Status: " + x + b"\n" if x else b""
        body = b"".join(b"Line %d of message %d, some text.\n" % (k, i) for k in range(i % 70))
        parts.append(
            b"From sender@example.test "
            + time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(t)).encode()
            + b"\nFrom: Sender %d <sender%d@example.test>\nTo: bench@example.test\n"
            b"Subject: message %d\nMessage-ID: <%d@search.bench>\n"
            b"Date: Sat, 1 Jan 2022 00:00:00 +0000\n"
            % (i, i % 97, i, i)
            + status
            + xstatus
            + b"\nBody of message %d.\n" % i
            + body
            + b"\n"
        )
    return b"".join(parts)


def answer(out: bytes) -> bytes:
    """The untagged answer lines (for comparing servers), without the tag of ESEARCH."""
    lines = [ln for ln in out.split(b"\r\n") if ln.startswith((b"* SEARCH", b"* ESEARCH"))]
    return b"\r\n".join(ln.split(b")", 1)[-1] if b"(TAG" in ln else ln for ln in lines)


def measure(
    port: int, user: str, password: str, n: int, rounds: int, sessions: int
) -> tuple[dict[str, list[float]], dict[str, bytes]]:
    """The timings (ms) of one server, and a digest of each command's answer."""
    client = Client(port, user, password)
    client.cmd(b"SELECT INBOX")
    crowd = [Client(port, user, password) for _ in range(sessions)]
    for c in crowd:
        c.cmd(b"SELECT INBOX")
    probe = NoopProbe(port, user, password)
    got: dict[str, list[float]] = {}
    digests: dict[str, bytes] = {}
    for _ in range(rounds):
        for label, line in commands(n):
            out = client.cmd(line)  # warm: the first run may build caches
            digests[label] = hashlib.sha256(answer(out)).digest()
            with probe:
                ms, out = client.timed(line)
            got.setdefault(label, []).append(ms)
            got.setdefault(label + "/noop", []).append(probe.longest)
            if not crowd:
                continue
            times = [0.0] * len(crowd)
            threads = [
                threading.Thread(target=_timed_into, args=(crowd[i], line, times, i))
                for i in range(len(crowd))
            ]
            with probe:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            got.setdefault(label + "/crowd", []).append(max(times))
            got.setdefault(label + "/crowd-noop", []).append(probe.longest)
    for c in (client, *crowd, probe.client):
        c.close()
    return got, digests


def _timed_into(client: Client, line: bytes, times: list[float], i: int) -> None:
    times[i] = client.timed(line)[0]


def spread(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.median(vals):.0f} [{min(vals):.0f}-{max(vals):.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, nargs="+", default=[10_000, 100_000], help="folder sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=10, help="sessions searching at once (0: none)")
    ap.add_argument("--no-dovecot", action="store_true")
    args = ap.parse_args()
    reason = "--no-dovecot" if args.no_dovecot else dovecot_peer.available()
    if reason is not None:
        print(f"Dovecot not measured: {reason}")
    print(f"load average at the start: {os.getloadavg()}")
    rows = []
    for n in args.n:
        base = Path(tempfile.mkdtemp(prefix="search-bench-"))
        dovecot = None
        try:
            mbox = base / "folder.mbox"
            mbox.write_bytes(folder(n))
            print(f"{n} messages, {mbox.stat().st_size / 1e6:.0f} MB", flush=True)
            results = {}
            (base / "mailsrv").mkdir()
            server = MailServer(base / "mailsrv")
            server.add_user(USER)
            inbox = server.inbox(USER)
            inbox.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mbox, inbox)
            server.start()
            try:
                results["mailsrv"] = measure(
                    server.ports["imap"], USER, PASSWORD, n, args.rounds, args.sessions
                )
            finally:
                server.close()
            if reason is None:
                dovecot = dovecot_peer.Dovecot()
                dovecot.start(mbox)
                # the sessions of one user and address (10 by default) are more than that here
                with open(dovecot.dir / "dovecot.conf", "a") as conf:
                    conf.write("protocol imap {\n  mail_max_userip_connections = 100\n}\n")
                dovecot.stop_master()
                dovecot.launch()
                results["Dovecot"] = measure(
                    dovecot.port,
                    dovecot_peer.USER,
                    dovecot_peer.PASSWORD,
                    n,
                    args.rounds,
                    args.sessions,
                )
            rows.append((n, results))
        finally:
            if dovecot is not None:
                dovecot.stop()
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"milliseconds, median [min-max] of {args.rounds} rounds; NOOP: the longest wait of")
    print(f"another session's NOOPs meanwhile; x{args.sessions}: that many sessions at once,")
    print("the slowest answer")
    print(
        "| messages | command | mailsrv | Dovecot | mailsrv NOOP | Dovecot NOOP |"
        f" mailsrv x{args.sessions} | Dovecot x{args.sessions} |"
        f" mailsrv NOOP x{args.sessions} | Dovecot NOOP x{args.sessions} | same answer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, results in rows:
        ours, our_digests = results["mailsrv"]
        theirs, their_digests = results.get("Dovecot", ({}, {}))
        for label, line in commands(n):
            same = "-" if not their_digests else str(our_digests[label] == their_digests[label])
            cells = [
                spread(got.get(label + suffix, []))
                for suffix in ("", "/noop", "/crowd", "/crowd-noop")
                for got in (ours, theirs)
            ]
            print(f"| {n} | `{line.decode()}` | " + " | ".join(cells) + f" | {same} |")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
