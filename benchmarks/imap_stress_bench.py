#!/usr/bin/env python3
"""
Ten IMAP clients at once on one shared INBOX, as Dovecot's imaptest runs
them, against mailsrv and Dovecot side by side on the same mbox data:
each client logs in, selects, and then for --seconds does what mail
clients do (FETCH of flags and of bodies, STORE of flags and keywords,
APPEND, EXPUNGE, NOOP), checking every response as it goes.

    sudo .venv/bin/python benchmarks/imap_stress_bench.py [--clients 10] [--seconds 20] [--repeat 3]

Printed per server, median [min-max] over the rounds: commands answered per
second (all clients together), the 50th and 99th percentile of a command's
time, the server's CPU per command, and the protocol errors the clients saw.
A protocol error is what RFC 3501 forbids a server to send: a tagged BAD to
a well-formed command; a keyword in a FETCH FLAGS before an untagged FLAGS
announced it to that session (RFC 3501 7.2.6: the defined flags); a message
number above the session's EXISTS count; an EXISTS that shrinks without
EXPUNGE (RFC 3501 7.3.1). A tagged NO is counted apart (a message another
client expunged may be gone: RFC 3501 allows NO there).

The rounds alternate the order of the servers, each starting from the
pristine mailbox (--messages of 4 KB) with its index removed (mailsrv
restarted). Needs root (the peer runs as a private Dovecot) and Debian's
dovecot-imapd. Everything listens on 127.0.0.1; every run stops by itself;
only the processes started here are stopped, by pid.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (  # noqa: E402
    CG_ROOT,
    PASS,
    PEER_GID,
    PEER_UID,
    PEERS,
    PRISTINE,
    REF,
    WORK,
    Mailsrv,
    gen,
    load,
    put_mbox,
    sh,
    spread,
)

USER = "stress"
DOVECOT_PORT = 1143
KEYWORDS = [f"$Stress{i}" for i in range(20)]
FLAGS = ["\\Seen", "\\Answered", "\\Flagged", "\\Draft"]
MESSAGE = (
    "From: Stress <stress-sender@example.test>\r\nTo: stress@example.test\r\n"
    "Subject: appended {n}\r\nDate: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
    "Message-ID: <stress-{n}@example.test>\r\n\r\n" + "A line of the appended message.\r\n" * 60
)
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_UNTAGGED = re.compile(rb"\* (\d+) (EXISTS|EXPUNGE|FETCH|RECENT)\b", re.I)
_FLAGS = re.compile(rb"^\* FLAGS \(([^)]*)\)", re.I)
_FETCH_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)", re.I)


class ProtocolError(Exception):
    pass


@dataclass
class Tally:
    """What the clients of one run saw."""

    commands: int = 0
    no: int = 0
    errors: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # the first few tagged NOs
    times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seconds: float, ok: bool) -> None:
        with self.lock:
            self.commands += 1
            self.times.append(seconds)
            if not ok:
                self.no += 1

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


class Client:
    """One IMAP session over a raw socket, checking each response it reads."""

    def __init__(self, port: int, tally: Tally, seed: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.tally = tally
        self.rng = random.Random(seed)
        self.tags = 0
        self.exists = 0
        self.known: set[bytes] = set()  # the flags announced by * FLAGS (lower case)
        self.file.readline()  # the greeting

    def close(self) -> None:
        try:
            self.command("LOGOUT")
        except (OSError, ProtocolError):
            pass
        self.sock.close()

    def read_response(self) -> bytes:
        """One response line with its literals."""
        line = self.file.readline()
        if not line:
            raise ProtocolError("the server closed the connection")
        while (m := _LITERAL.search(line)) is not None:
            line += self.file.read(int(m.group(1)))
            line += self.file.readline()
        return line

    def command(self, text: str, literal: bytes | None = None, count: bool = True) -> bytes:
        """Send a command, check every response to it; the tagged status (OK or NO)."""
        self.tags += 1
        tag = b"t%d" % self.tags
        start = time.monotonic()
        if literal is None:
            self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        else:
            self.sock.sendall(tag + b" " + text.encode() + b" {%d+}\r\n" % len(literal))
            self.sock.sendall(literal + b"\r\n")
        while True:
            line = self.read_response()
            if line.startswith(tag + b" "):
                status = line.split(b" ", 2)[1].upper()
                if status == b"BAD":
                    self.tally.error(f"BAD to {text[:40]!r}: {line[:100]!r}")
                elif status == b"NO" and len(self.tally.refusals) < 5:
                    self.tally.refusals.append(f"NO to {text[:40]!r}: {line[:100]!r}")
                if count:
                    self.tally.add(time.monotonic() - start, status == b"OK")
                return status
            self.untagged(line, text)

    def untagged(self, line: bytes, command: str) -> None:
        m = _FLAGS.match(line)
        if m:
            self.known = {f.lower() for f in m.group(1).split()}
            return
        m = _UNTAGGED.match(line)
        if not m:
            return
        n, kind = int(m.group(1)), m.group(2).upper()
        if kind == b"EXISTS":
            if n < self.exists:
                self.tally.error(f"EXISTS went from {self.exists} to {n} without EXPUNGE")
            self.exists = n
        elif kind == b"EXPUNGE":
            if n > self.exists:
                self.tally.error(f"EXPUNGE {n} above EXISTS {self.exists}")
            self.exists -= 1
        elif kind == b"FETCH":
            if n > self.exists:
                self.tally.error(f"FETCH {n} above EXISTS {self.exists} ({command[:30]})")
            f = _FETCH_FLAGS.search(line)
            if f:
                for flag in f.group(1).split():
                    low = flag.lower()
                    if not low.startswith(b"\\") and low not in self.known:
                        self.tally.error(f"keyword {flag!r} in FETCH before * FLAGS announced it")

    def some(self) -> str:
        """A message number or range within the session's view."""
        n = self.rng.randint(1, max(1, self.exists))
        return str(n) if self.rng.random() < 0.7 else f"{n}:{min(self.exists, n + 20) or 1}"

    def step(self, n: int) -> None:
        """One thing a mail client does."""
        r = self.rng.random()
        if self.exists == 0 and r < 0.85:
            r = 0.85  # nothing to fetch or store
        if r < 0.25:
            self.command(f"FETCH {self.some()} (FLAGS UID)")
        elif r < 0.40:
            self.command(f"FETCH {self.some()} (BODY.PEEK[] RFC822.SIZE)")
        elif r < 0.55:
            self.command(f"FETCH {self.some()} (ENVELOPE BODYSTRUCTURE)")
        elif r < 0.70:
            flag = self.rng.choice(FLAGS)
            self.command(f"STORE {self.some()} {self.rng.choice('+-')}FLAGS ({flag})")
        elif r < 0.78:
            self.command(f"STORE {self.some()} +FLAGS ({self.rng.choice(KEYWORDS)})")
        elif r < 0.85:
            self.command("NOOP")
        elif r < 0.93:
            self.command("APPEND INBOX", MESSAGE.format(n=n).encode())
        else:
            self.command(
                f"STORE {self.rng.randint(1, max(1, self.exists))} +FLAGS.SILENT (\\Deleted)"
            )
            self.command("EXPUNGE")


def run_clients(port: int, login: str, clients: int, seconds: float) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds

    def one(i: int) -> None:
        try:
            c = Client(port, tally, seed=i)
            if c.command(f'LOGIN "{login}" "{PASS}"', count=False) != b"OK":
                tally.error("LOGIN refused")
                return
            c.command("SELECT INBOX", count=False)
            n = 0
            while time.monotonic() < deadline:
                n += 1
                c.step(i * 1_000_000 + n)
            c.close()
        except (OSError, ProtocolError) as e:
            tally.error(f"client {i}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return tally


def group_cpu_seconds(name: str) -> float | None:
    """The CPU seconds of the peers' cpuacct group C{refpeer-NAME} (every process in it, ended ones too)."""
    try:
        return int((CG_ROOT / f"refpeer-{name}" / "cpuacct.usage").read_text()) / 1e9
    except (OSError, ValueError):
        return None


def measure(name: str, port: int, login: str, group: str, clients: int, seconds: float) -> dict:
    before = group_cpu_seconds(group)
    start = time.monotonic()
    tally = run_clients(port, login, clients, seconds)
    elapsed = time.monotonic() - start
    after = group_cpu_seconds(group)
    cpu = after - before if after is not None and before is not None else float("nan")
    times = sorted(tally.times) or [0.0]
    result = {
        "server": name,
        "commands_per_s": tally.commands / elapsed,
        "p50_ms": times[len(times) // 2] * 1000,
        "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
        "cpu_ms_per_command": cpu * 1000 / max(1, tally.commands),
        "no": tally.no,
        "errors": len(tally.errors),
        "first_errors": tally.errors[:5],
        "first_refusals": tally.refusals,
    }
    print(f"  {name}: {result}", file=sys.stderr, flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--messages", type=int, default=1000)
    a = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("dovecot"):
        print("needs root and Debian's dovecot-imapd (the peer)", file=sys.stderr)
        return 2
    if not (1 <= a.clients <= 50 and 1 <= a.seconds <= 300 and 1 <= a.repeat <= 10):
        print("--clients 1-50, --seconds 1-300, --repeat 1-10", file=sys.stderr)
        return 2
    print(f"load average at start: {load()}", file=sys.stderr, flush=True)
    if WORK.exists():
        shutil.rmtree(WORK)
    ms = Mailsrv()
    ms.configure()
    ms.add_user(USER)
    gen(PRISTINE / USER, a.messages)
    with open(WORK / "peers.log", "ab") as log:
        sh("bash", str(PEERS / "dovecot-start.sh"), stdout=log, stderr=log)
    rows: dict[str, list[dict]] = {"mailsrv": [], "Dovecot": []}
    try:
        for rnd in range(a.repeat):
            print(f"... round {rnd + 1}, load {load()}", file=sys.stderr, flush=True)
            ms.stop()
            put_mbox(PRISTINE / USER, ms.inbox(USER), ms.index(USER))
            ms.start()
            put_mbox(
                PRISTINE / USER,
                REF / "mail" / USER,
                REF / "dovecot" / "index" / USER,
                (PEER_UID, PEER_GID),
            )
            runs = [
                ("mailsrv", ms.ports["imap"], f"{USER}@example.test", "mailsrv"),
                ("Dovecot", DOVECOT_PORT, USER, "dovecot"),
            ]
            if rnd % 2:
                runs.reverse()
            for name, port, login, group in runs:
                rows[name].append(measure(name, port, login, group, a.clients, a.seconds))
    finally:
        ms.stop()
        with open(WORK / "peers.log", "ab") as log:
            subprocess.run(["bash", str(PEERS / "dovecot-stop.sh")], stdout=log, stderr=log)
    print(f"load average at the end: {load()}", file=sys.stderr, flush=True)
    print(
        f"| {a.clients} clients on one INBOX of {a.messages} messages, {a.seconds:.0f} s, "
        f"median [min-max] of {a.repeat} rounds | mailsrv | Dovecot | ratio (>1: mailsrv better) |"
    )
    print("|---|---|---|---|")
    for key, label, higher in (
        ("commands_per_s", "commands answered per second", True),
        ("p50_ms", "command time, median (ms)", False),
        ("p99_ms", "command time, 99th percentile (ms)", False),
        ("cpu_ms_per_command", "server CPU per command (ms)", False),
        ("no", "tagged NO (all rounds)", False),
        ("errors", "protocol errors (all rounds)", False),
    ):
        us = [r[key] for r in rows["mailsrv"]]
        them = [r[key] for r in rows["Dovecot"]]
        if key in ("no", "errors"):
            print(f"| {label} | {sum(us)} | {sum(them)} | |")
            continue
        ratios = [(u / t if higher else t / u) for u, t in zip(us, them, strict=True) if u and t]
        print(f"| {label} | {spread(us)} | {spread(them)} | {spread(ratios, ratio=True)} |")
    for name, runs in rows.items():
        for r in runs:
            for e in r["first_errors"] + r["first_refusals"]:
                print(f"{name}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
