#!/usr/bin/env python3
"""
Time a QRESYNC resynchronisation (RFC 7162) after one flag change, mailsrv
against Dovecot on the same mbox data, at several folder sizes.

    .venv/bin/python benchmarks/imap_qresync_bench.py [-n 10000 100000] [--rounds 5]

Per size: an mbox INBOX of C{n} small messages is put in a real ``twistd -n
mailsrv`` and, where it can run (root, Dovecot installed), a private Dovecot
(tests/dovecot_peer.py). A first session ENABLEs QRESYNC and SELECTs (the
index is built; not timed). Then per round: the client notes UIDVALIDITY and
HIGHESTMODSEQ, another session changes the flags of one message, and the
client (a new session, ENABLE QRESYNC) times
``SELECT INBOX (QRESYNC (uidvalidity modseq))`` and ``UID FETCH 1:* (FLAGS)
(CHANGEDSINCE modseq)``; each must tell exactly that one message. For
contrast, the plain SELECT and the full ``UID FETCH 1:* (FLAGS)`` a client
without QRESYNC would need. Prints medians [min-max] in milliseconds.

Without --holder every session leaves the folder before the next comes, and
mailsrv writes the changed flag into the mbox file then (the first flag
write of a message another program stored moves the rest of the file, see
README "Known limits"): the next SELECT (QRESYNC) waits for that write, as
its history queries queue behind it. With --holder a session stays on the
folder, so what is timed is the resynchronisation alone.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import dovecot_peer  # noqa: E402
from tests.e2e import PASSWORD, MailServer  # noqa: E402

USER = "bench@example.test"


def folder(n: int) -> bytes:
    """C{n} small messages as an mbox file."""
    parts = []
    for i in range(1, n + 1):
        parts.append(
            b"From sender@example.test Sat Jan  1 00:00:00 2022\n"
            b"From: Sender %d <sender%d@example.test>\nTo: bench@example.test\n"
            b"Subject: message %d\nMessage-ID: <%d@qresync.bench>\n"
            b"Date: Sat, 1 Jan 2022 00:00:00 +0000\n\nBody of message %d.\n\n"
            % (i, i % 97, i, i, i)
        )
    return b"".join(parts)


class Client:
    """A minimal IMAP client: one command at a time, the answer's lines kept whole."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.n = 0
        self.cmd(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))

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

    def timed(self, line: bytes) -> tuple[float, list[bytes]]:
        t = time.perf_counter()
        out = self.cmd(line)
        return (time.perf_counter() - t) * 1000, out

    def close(self) -> None:
        try:
            self.cmd(b"LOGOUT")
        except (OSError, ConnectionError, RuntimeError):
            pass
        self.sock.close()


def code(lines: list[bytes], name: bytes) -> int:
    for ln in lines:
        m = re.search(rb"\[" + name + rb" (\d+)\]", ln)
        if m:
            return int(m.group(1))
    raise RuntimeError(f"no {name!r} in {lines[-3:]!r}")


def fetches(lines: list[bytes]) -> int:
    return sum(b" FETCH (" in ln for ln in lines)


def measure(
    port: int, user: str, password: str, n: int, rounds: int, holder: bool
) -> dict[str, list[float]]:
    """
    The timings (ms) of one server; checks that each resync tells the one
    change. C{holder}: the first session stays (as another client would),
    so the folder is never left by all sessions in between.
    """
    first = Client(port, user, password)
    first.cmd(b"ENABLE QRESYNC")
    first.cmd(b"SELECT INBOX")
    if not holder:
        first.close()
    got: dict[str, list[float]] = {k: [] for k in ("qresync", "changedsince", "select", "full")}
    for rnd in range(rounds):
        c = Client(port, user, password)
        c.cmd(b"ENABLE QRESYNC")
        ms, out = c.timed(b"SELECT INBOX")
        got["select"].append(ms)
        validity, modseq = code(out, b"UIDVALIDITY"), code(out, b"HIGHESTMODSEQ")
        ms, out = c.timed(b"UID FETCH 1:* (FLAGS)")
        got["full"].append(ms)
        assert fetches(out) == n, fetches(out)
        c.close()
        other = Client(port, user, password)
        other.cmd(b"SELECT INBOX")
        seq = 1 + (rnd * 7919) % n  # another message each round, flagged afresh
        other.cmd(b"STORE %d +FLAGS (\\Flagged)" % seq)
        other.close()
        c = Client(port, user, password)
        c.cmd(b"ENABLE QRESYNC")
        ms, out = c.timed(b"SELECT INBOX (QRESYNC (%d %d))" % (validity, modseq))
        got["qresync"].append(ms)
        assert fetches(out) == 1, [ln for ln in out if b"FETCH" in ln]
        ms, out = c.timed(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % modseq)
        got["changedsince"].append(ms)
        assert fetches(out) == 1, out
        c.close()
    if holder:
        first.close()
    return got


def spread(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.median(vals):.1f} [{min(vals):.1f}-{max(vals):.1f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, nargs="+", default=[10_000, 100_000], help="folder sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument(
        "--holder",
        action="store_true",
        help="keep one session on the folder throughout (mailsrv then writes flags into the"
        " mbox file only at the end, not after each round's change)",
    )
    args = ap.parse_args()
    reason = "--no-dovecot" if args.no_dovecot else dovecot_peer.available()
    if reason is not None:
        print(f"Dovecot not measured: {reason}")
    rows = []
    for n in args.n:
        base = Path(tempfile.mkdtemp(prefix="qresync-bench-"))
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
                    server.ports["imap"], USER, PASSWORD, n, args.rounds, args.holder
                )
            finally:
                server.close()
            if reason is None:
                dovecot = dovecot_peer.Dovecot()
                dovecot.start(mbox)
                results["Dovecot"] = measure(
                    dovecot.port,
                    dovecot_peer.USER,
                    dovecot_peer.PASSWORD,
                    n,
                    args.rounds,
                    args.holder,
                )
            for who, got in results.items():
                rows.append((n, who, got))
        finally:
            if dovecot is not None:
                dovecot.stop()
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"milliseconds, median [min-max] of {args.rounds} rounds, one flag change between")
    print(
        "| messages | server | SELECT (QRESYNC) | UID FETCH 1:* (FLAGS) (CHANGEDSINCE) |"
        " plain SELECT | UID FETCH 1:* (FLAGS) |"
    )
    print("|---|---|---|---|---|---|")
    for n, who, got in rows:
        print(
            f"| {n} | {who} | {spread(got['qresync'])} | {spread(got['changedsince'])} | "
            f"{spread(got['select'])} | {spread(got['full'])} |"
        )
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
