#!/usr/bin/env python3
"""
Time IMAP SORT and THREAD on a big mbox folder, mailsrv against Dovecot on
the same data.

    .venv/bin/python benchmarks/imap_sort_bench.py [-n 100000] [--rounds 3] [--warm 5]

Generates an mbox folder of C{-n} messages with realistic headers and threads
(tests/sort_corpus.py: replies with References/In-Reply-To, Re:/Fwd:/[list]
markers, encoded-words, dates in several zones), puts it as the INBOX of a
real ``twistd -n mailsrv`` and, where it can run (root, Dovecot installed), of
a private Dovecot (tests/dovecot_peer.py, the configuration of
../shared/peers/dovecot-start.sh on a free port). Per command and round:
"cold" is the command's first run in a fresh server (mailsrv restarted: its
header-key cache empty, its folder index kept; Dovecot restarted with its
index deleted and a pristine mbox, the SELECT that rebuilds it not timed),
"warm" the median of --warm runs after it. Prints medians over the rounds
with [min-max], the ratio Dovecot/mailsrv (> 1: mailsrv faster), whether the
two servers' answers are equal, and mailsrv's resident memory at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import dovecot_peer, sort_corpus  # noqa: E402
from tests.e2e import PASSWORD, MailServer  # noqa: E402

USER = "bench@example.test"
COMMANDS = [
    b"SORT (ARRIVAL) UTF-8 ALL",
    b"SORT (SUBJECT) UTF-8 ALL",
    b"SORT (FROM) UTF-8 ALL",
    b"SORT (DATE) UTF-8 ALL",
    b"SORT (REVERSE DATE) UTF-8 ALL",
    b"THREAD REFERENCES UTF-8 ALL",
]


class Client:
    """A minimal IMAP client: one command at a time, the answer's lines kept whole."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.n = 0

    def cmd(self, line: bytes) -> list[bytes]:
        self.n += 1
        tag = b"B%d" % self.n
        self.sock.sendall(tag + b" " + line + b"\r\n")
        out = []
        while True:
            got = self.file.readline()
            if not got:
                raise ConnectionError("server closed the connection")
            out.append(got)
            if got.startswith(tag + b" "):
                if not got.startswith(tag + b" OK"):
                    raise RuntimeError(f"{line!r}: {got!r}")
                return out

    def close(self) -> None:
        try:
            self.cmd(b"LOGOUT")
        except (OSError, ConnectionError, RuntimeError):
            pass
        self.sock.close()


def session(port: int, user: str, password: str) -> tuple[Client, float]:
    """A logged-in client with INBOX selected, and the seconds the SELECT took."""
    c = Client(port)
    c.cmd(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
    t = time.perf_counter()
    c.cmd(b"SELECT INBOX")
    return c, time.perf_counter() - t


def timed(c: Client, command: bytes) -> tuple[float, bytes]:
    t = time.perf_counter()
    lines = c.cmd(command)
    return time.perf_counter() - t, b"".join(lines[:-1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spread(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.median(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="messages in the folder")
    ap.add_argument("--rounds", type=int, default=3, help="cold runs per command")
    ap.add_argument("--warm", type=int, default=5, help="warm runs after each cold one")
    ap.add_argument("--no-dovecot", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sort-bench-"))
    dovecot = None
    try:
        t = time.perf_counter()
        mbox = base / "folder.mbox"
        mbox.write_bytes(sort_corpus.generated_mbox(args.n))
        size = mbox.stat().st_size
        print(
            f"{args.n} messages, {size / 1e6:.0f} MB, generated in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        reason = "--no-dovecot" if args.no_dovecot else dovecot_peer.available()
        if reason is None:
            dovecot = dovecot_peer.Dovecot()
            dovecot.start(mbox)
        else:
            print(f"Dovecot not measured: {reason}")
        (base / "mailsrv").mkdir()
        server = MailServer(base / "mailsrv")
        server.add_user(USER)
        inbox = server.inbox(USER)
        inbox.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mbox, inbox)
        results: dict[str, dict[bytes, dict[str, list[float]]]] = {"ours": {}, "dovecot": {}}
        answers: dict[str, dict[bytes, bytes]] = {"ours": {}, "dovecot": {}}
        selects: dict[str, list[float]] = {"ours": [], "dovecot": []}
        rss = 0.0
        server.start()
        try:
            c, first_select = session(server.ports["imap"], USER, PASSWORD)
            c.close()
            print(f"mailsrv first SELECT (index built): {first_select:.2f} s", flush=True)
            for rnd in range(args.rounds):
                for command in COMMANDS:
                    for who in ("ours", "dovecot"):
                        if who == "ours":
                            server.stop()
                            server.start()
                            port, user, pw = server.ports["imap"], USER, PASSWORD
                        elif dovecot is not None:
                            dovecot.restart_cold(mbox)
                            port, user, pw = dovecot.port, dovecot_peer.USER, dovecot_peer.PASSWORD
                        else:
                            continue
                        c, sel = session(port, user, pw)
                        selects[who].append(sel)
                        cold, answer = timed(c, command)
                        warm = [timed(c, command)[0] for _ in range(args.warm)]
                        if who == "ours":
                            rss = max(rss, rss_mb(server.proc.pid))  # type: ignore[union-attr]
                        c.close()
                        r = results[who].setdefault(command, {"cold": [], "warm": []})
                        r["cold"].append(cold)
                        r["warm"].append(statistics.median(warm))
                        answers[who][command] = answer
                    print(f"round {rnd + 1}: {command.decode()} done", flush=True)
        finally:
            server.close()
        print()
        print(f"SORT/THREAD on {args.n} messages ({size / 1e6:.0f} MB mbox), seconds,")
        print(f"median [min-max] of {args.rounds} rounds; warm = median of {args.warm} runs")
        head = "| command | mailsrv cold | Dovecot cold | ratio | mailsrv warm | Dovecot warm | ratio | same answer |"
        print(head)
        print("|" + "---|" * 8)
        for command in COMMANDS:
            o = results["ours"][command]
            d = results["dovecot"].get(command, {"cold": [], "warm": []})

            def ratio(kind: str, o: dict = o, d: dict = d) -> str:
                if not d[kind]:
                    return "-"
                return f"{statistics.median(d[kind]) / statistics.median(o[kind]):.2f}x"

            same = (
                "-"
                if not d["cold"]
                else ("yes" if answers["ours"][command] == answers["dovecot"][command] else "NO")
            )
            print(
                f"| {command.decode()} | {spread(o['cold'])} | {spread(d['cold'])} | "
                f"{ratio('cold')} | {spread(o['warm'])} | {spread(d['warm'])} | "
                f"{ratio('warm')} | {same} |"
            )
        print(
            f"SELECT after a restart: mailsrv {spread(selects['ours'])}, Dovecot (index rebuilt) {spread(selects['dovecot'])}"
        )
        print(f"mailsrv resident memory at most: {rss:.0f} MB")
        print(f"load average at the end: {os.getloadavg()}")
        return 0
    finally:
        if dovecot is not None:
            dovecot.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
