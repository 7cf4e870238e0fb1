#!/usr/bin/env python3
"""
Time a full flag synchronisation, what a client without QRESYNC (mbsync,
offlineimap, getmail, a first sync) sends on every sync, mailsrv against
Dovecot on the same mbox data, and how long another session waits for a
NOOP meanwhile.

    .venv/bin/python benchmarks/imap_flagsync_bench.py [-n 10000 100000] [--rounds 5]

Per size: an mbox INBOX of C{n} small messages is put in a real ``twistd -n
mailsrv`` and, where it can run (root, Dovecot installed), a private Dovecot
(tests/dovecot_peer.py). A holder session SELECTs and gives the messages a
mix of flags (all \\Seen, every 10th \\Flagged, every 7th $Label1, every
13th \\Answered) and stays on the folder. Two more sessions SELECT INBOX (one
after ENABLE CONDSTORE, for the last commands) and send the commands below,
each round each command once untimed, then once timed from sending it to
reading its tagged OK; each must answer C{n} messages. While the timed one
runs, a fourth session sends NOOPs one after the other: the longest of those
waits is reported too (the FETCH must not hold up the other sessions).
Sessions are kept throughout (the server limits new connections a minute).
Prints medians [min-max] in milliseconds, and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import dovecot_peer  # noqa: E402
from tests.e2e import PASSWORD, MailServer  # noqa: E402

USER = "bench@example.test"

# (label, CONDSTORE enabled first, command)
COMMANDS: list[tuple[str, bool, bytes]] = [
    ("uid-flags", False, b"UID FETCH 1:* (FLAGS)"),
    ("seq-uid-flags", False, b"FETCH 1:* (UID FLAGS)"),
    ("mbsync", False, b"UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE)"),
    ("search", False, b"UID SEARCH ALL"),
    ("cs-uid-flags", True, b"UID FETCH 1:* (FLAGS)"),
    ("cs-flags-modseq", True, b"UID FETCH 1:* (FLAGS MODSEQ)"),
]


def folder(n: int) -> bytes:
    """C{n} small messages as an mbox file."""
    parts = []
    for i in range(1, n + 1):
        parts.append(
            b"From sender@example.test Sat Jan  1 00:00:00 2022\n"
            b"From: Sender %d <sender%d@example.test>\nTo: bench@example.test\n"
            b"Subject: message %d\nMessage-ID: <%d@flagsync.bench>\n"
            b"Date: Sat, 1 Jan 2022 00:00:00 +0000\n\nBody of message %d.\n\n"
            % (i, i % 97, i, i, i)
        )
    return b"".join(parts)


class Client:
    """
    A minimal IMAP client: one command at a time; the answer is read in large
    chunks (the client's own cost kept small beside the server's).
    """

    def __init__(self, port: int, user: str, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            greeting += self._recv()
        self.n = 0
        self.cmd(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))

    def _recv(self) -> bytes:
        got = self.sock.recv(1 << 20)
        if not got:
            raise ConnectionError("server closed the connection")
        return got

    def cmd(self, line: bytes) -> bytes:
        """
        Send a command; return its whole answer (the server sends nothing
        after the tagged line until the next command).
        """
        self.n += 1
        tag = b"B%d " % self.n
        self.sock.sendall(tag + line + b"\r\n")
        chunks: list[bytes] = []
        tail = b"\r\n"
        while True:
            got = self._recv()
            chunks.append(got)
            tail = (tail + got)[-4096:]
            if tail.endswith(b"\r\n"):
                at = tail.rfind(b"\r\n", 0, len(tail) - 2)
                if tail[at + 2 :].startswith(tag):
                    if not tail[at + 2 :].startswith(tag + b"OK"):
                        raise RuntimeError(f"{line[:80]!r}: {tail[at + 2 :]!r}")
                    return b"".join(chunks)

    def timed(self, line: bytes) -> tuple[float, bytes]:
        t = time.perf_counter()
        out = self.cmd(line)
        return (time.perf_counter() - t) * 1000, out

    def close(self) -> None:
        try:
            self.cmd(b"LOGOUT")
        except (OSError, ConnectionError, RuntimeError):
            pass
        self.sock.close()


def answered(out: bytes, line: bytes) -> int:
    """How many messages the answer tells of."""
    if b"SEARCH" in line:
        for ln in out.split(b"\r\n"):
            if ln.startswith(b"* SEARCH"):
                return len(ln.split()) - 2
        return 0
    return out.count(b" FETCH (")


class NoopProbe:
    """A second session sending NOOPs one after another while a command runs; the longest wait kept."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.client = Client(port, user, password)
        self.client.cmd(b"SELECT INBOX")
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            ms, _ = self.client.timed(b"NOOP")
            self.longest = max(self.longest, ms)
            time.sleep(0.001)

    def __enter__(self) -> NoopProbe:
        self.longest = 0.0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


def measure(
    port: int, user: str, password: str, n: int, rounds: int, labels: list[str]
) -> dict[str, list[float]]:
    """
    The timings (ms) of one server, and per command the longest NOOP wait
    meanwhile. A few sessions only, kept throughout (the server limits new
    connections a minute).
    """
    holder = Client(port, user, password)
    holder.cmd(b"SELECT INBOX")
    holder.cmd(b"STORE 1:* +FLAGS.SILENT (\\Seen)")
    for every, flag in ((10, b"\\Flagged"), (7, b"$Label1"), (13, b"\\Answered")):
        numbers = range(every, n + 1, every)
        for at in range(0, len(numbers), 500):  # a few kB a command line
            seqs = b",".join(b"%d" % i for i in numbers[at : at + 500])
            holder.cmd(b"STORE " + seqs + b" +FLAGS.SILENT (" + flag + b")")
    holder.cmd(b"NOOP")
    clients = {}
    for cs in (False, True):
        c = clients[cs] = Client(port, user, password)
        if cs:
            c.cmd(b"ENABLE CONDSTORE")
        c.cmd(b"SELECT INBOX")
    probe = NoopProbe(port, user, password)
    got: dict[str, list[float]] = {}
    commands = [c for c in COMMANDS if c[0] in labels]
    for _ in range(rounds):
        for label, cs, line in commands:
            c = clients[cs]
            c.cmd(line)  # warm: the first run may build caches
            with probe:
                ms, out = c.timed(line)
            got.setdefault(label, []).append(ms)
            got.setdefault(label + "/noop", []).append(probe.longest)
            count = answered(out, line)
            assert count == n, (label, count)
            if b"MODSEQ" in line:
                assert out.count(b"MODSEQ (") == n, label
    for c in (*clients.values(), probe.client, holder):
        c.close()
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
        "--only",
        nargs="+",
        choices=[c[0] for c in COMMANDS],
        default=[c[0] for c in COMMANDS],
        help="the commands to time",
    )
    args = ap.parse_args()
    reason = "--no-dovecot" if args.no_dovecot else dovecot_peer.available()
    if reason is not None:
        print(f"Dovecot not measured: {reason}")
    print(f"load average at the start: {os.getloadavg()}")
    rows = []
    for n in args.n:
        base = Path(tempfile.mkdtemp(prefix="flagsync-bench-"))
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
                    server.ports["imap"], USER, PASSWORD, n, args.rounds, args.only
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
                    args.only,
                )
            for who, got in results.items():
                rows.append((n, who, got))
        finally:
            if dovecot is not None:
                dovecot.stop()
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"milliseconds, median [min-max] of {args.rounds} rounds; NOOP: the longest wait of")
    print("another session's NOOPs while the command ran")
    print("| messages | command | mailsrv | Dovecot | mailsrv NOOP | Dovecot NOOP |")
    print("|---|---|---|---|---|---|")
    by = {(n, who): got for n, who, got in rows}
    for n in args.n:
        for label, cs, line in COMMANDS:
            if label not in args.only:
                continue
            ours = by.get((n, "mailsrv"), {})
            theirs = by.get((n, "Dovecot"), {})
            name = ("ENABLE CONDSTORE; " if cs else "") + line.decode()
            print(
                f"| {n} | `{name}` | {spread(ours.get(label, []))} | "
                f"{spread(theirs.get(label, []))} | {spread(ours.get(label + '/noop', []))} | "
                f"{spread(theirs.get(label + '/noop', []))} |"
            )
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
