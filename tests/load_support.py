"""
Many idle connections at once, for the load test and benchmarks/load_bench.py:
logged-in IMAP sessions with INBOX selected, logged-in POP3 sessions (one user
each: POP3 locks the maildrop), SMTP sessions in the middle of a transaction
(in DATA); then the time a NOOP takes on a fresh connection meanwhile, and the
memory of the server's processes.

The idle connections are opened with asyncio (one thread, any number of
sockets); the NOOPs are timed with plain blocking sockets while the event loop
is not running, so nothing of the client's own bookkeeping falls into them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher

# A hash that is quick to check: the logins are set-up here, not what is measured.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
OPEN_AT_ONCE = 8  # connections set up at once (below [auth] max_failures: logins in flight count)
STEP_TIMEOUT = 60.0  # seconds to set up one connection


def write_passwd(path: Path, users: Iterable[str], password: str) -> None:
    """A passwd-file (mailsrv's and Dovecot's format) with every one of C{users}."""
    h = CHEAP_HASHER.hash(password)
    path.write_text("".join(f"{u}:{h}\n" for u in users))
    path.chmod(0o600)


# The [policy] of a server that takes any number of connections from loopback
# (the defaults: 1,000 in all, 20 per address, 60 new per address a minute).
NO_CONNECTION_LIMITS = (
    "[policy]\nmax_connections = 0\nmax_connections_per_ip = 0\nconnections_per_ip_per_minute = 0\n"
)


class Idle:
    """The idle connections opened; C{close()} ends them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.writers: list[asyncio.StreamWriter] = []

    def run(self, coro: Awaitable) -> object:
        return self.loop.run_until_complete(coro)

    def open(
        self,
        make: Callable[[int], Awaitable[asyncio.StreamWriter]],
        n: int,
        timeout: float = STEP_TIMEOUT,
    ) -> float:
        """Open C{n} connections with C{make(i)}, each within C{timeout}; the seconds it took."""
        t0 = time.perf_counter()
        self.writers.extend(self.run(_gather(make, n, timeout)))  # type: ignore[arg-type]
        return time.perf_counter() - t0

    def check_open(self) -> int:
        """How many of the connections the server has closed (it must close none)."""

        async def closed() -> int:
            await asyncio.sleep(0.2)
            return sum(1 for w in self.writers if w.transport.is_closing())

        return self.run(closed())  # type: ignore[return-value]

    def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.run(asyncio.sleep(0.05))
        self.loop.close()


async def _gather(
    make: Callable[[int], Awaitable[asyncio.StreamWriter]], n: int, timeout: float
) -> list:
    gate = asyncio.Semaphore(OPEN_AT_ONCE)

    async def one(i: int) -> asyncio.StreamWriter:
        async with gate:
            return await asyncio.wait_for(make(i), timeout)

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if isinstance(r, asyncio.StreamWriter):
                r.transport.abort()
        raise ConnectionError(f"{len(errors)} of {n} connections failed: {errors[0]!r}")
    return list(results)


async def _until(reader: asyncio.StreamReader, ok: Callable[[bytes], bool]) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        if ok(line):
            return line


def imap_session(port: int, user: Callable[[int], str], password: str):
    """IMAP: LOGIN, SELECT INBOX, then idle."""

    async def make(i: int) -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _until(reader, lambda line: line.startswith(b"* OK"))
        writer.write(f'a LOGIN "{user(i)}" "{password}"\r\n'.encode())
        line = await _until(reader, lambda line: line.startswith(b"a "))
        if not line.startswith(b"a OK"):
            raise ConnectionError(line)
        writer.write(b"b SELECT INBOX\r\n")
        line = await _until(reader, lambda line: line.startswith(b"b "))
        if not line.startswith(b"b OK"):
            raise ConnectionError(line)
        return writer

    return make


def pop3_session(port: int, user: Callable[[int], str], password: str):
    """POP3: USER, PASS (the maildrop is locked), then idle."""

    async def make(i: int) -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for command in (None, f"USER {user(i)}", f"PASS {password}"):
            if command is not None:
                writer.write(command.encode() + b"\r\n")
            line = await reader.readline()
            if not line.startswith(b"+OK"):
                raise ConnectionError(line)
        return writer

    return make


def smtp_session(port: int, rcpt: str):
    """SMTP: EHLO, MAIL, RCPT, DATA and a few lines of a message, then idle (mid-transaction)."""

    async def make(i: int) -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _until(reader, lambda line: line.startswith(b"220 "))
        writer.write(b"EHLO client.test\r\n")
        await _until(reader, lambda line: line[3:4] == b" ")
        for command, code in (
            (f"MAIL FROM:<load{i}@client.test>", b"250"),
            (f"RCPT TO:<{rcpt}>", b"250"),
            ("DATA", b"354"),
        ):
            writer.write(command.encode() + b"\r\n")
            line = await _until(reader, lambda line: line[3:4] == b" ")
            if not line.startswith(code):
                raise ConnectionError(line)
        writer.write(b"Subject: load %d\r\n\r\nthe first lines of a message\r\n" % i)
        await writer.drain()
        return writer

    return make


def twistd_with_open_files_limit(monkeypatch, folder: Path, soft: int, hard: int) -> None:
    """Make L{tests.e2e.MailServer} start twistd with the open files limits C{soft}/C{hard}."""
    from tests import e2e

    wrapper = folder / "twistd-limited"
    script = f'#!/bin/sh\nulimit -Sn {soft}\nulimit -Hn {hard}\nexec {e2e.TWISTD} "$@"\n'
    wrapper.write_text(script)
    wrapper.chmod(0o755)
    monkeypatch.setattr(e2e, "TWISTD", str(wrapper))


# --- the NOOP on a fresh connection ---------------------------------------------


@dataclass
class Latency:
    """Seconds of each NOOP (and of the connection's greeting) on fresh connections."""

    noops: list[float] = field(default_factory=list)
    greetings: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.noops) * 1000

    @property
    def p99_ms(self) -> float:
        s = sorted(self.noops)
        return s[min(len(s) - 1, int(len(s) * 0.99))] * 1000

    @property
    def greeting_ms(self) -> float:
        return statistics.median(self.greetings) * 1000


def _lines(sock: socket.socket):
    f = sock.makefile("rb")
    return f


def imap_noops(port: int, user: str, password: str, n: int, connections: int = 1) -> Latency:
    """Connect, LOGIN, SELECT INBOX, then C{n} NOOPs timed one by one; C{connections} times."""
    out = Latency()
    for _ in range(connections):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = _lines(s)
            assert f.readline().startswith(b"* OK")
            out.greetings.append(time.perf_counter() - t0)
            s.sendall(f'a LOGIN "{user}" "{password}"\r\nb SELECT INBOX\r\n'.encode())
            while not f.readline().startswith(b"b "):
                pass
            for i in range(n):
                t = time.perf_counter()
                s.sendall(b"n%d NOOP\r\n" % i)
                while not f.readline().startswith(b"n%d OK" % i):
                    pass
                out.noops.append(time.perf_counter() - t)
            s.sendall(b"z LOGOUT\r\n")
    return out


def pop3_noops(port: int, user: str, password: str, n: int) -> Latency:
    """Connect, USER/PASS, then C{n} NOOPs timed one by one."""
    out = Latency()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = _lines(s)
        assert f.readline().startswith(b"+OK")
        out.greetings.append(time.perf_counter() - t0)
        for command in (f"USER {user}", f"PASS {password}"):
            s.sendall(command.encode() + b"\r\n")
            assert f.readline().startswith(b"+OK")
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"NOOP\r\n")
            assert f.readline().startswith(b"+OK")
            out.noops.append(time.perf_counter() - t)
        s.sendall(b"QUIT\r\n")
    return out


def smtp_noops(port: int, n: int) -> Latency:
    """Connect, EHLO, then C{n} NOOPs timed one by one."""
    out = Latency()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = _lines(s)
        assert f.readline().startswith(b"220 ")
        out.greetings.append(time.perf_counter() - t0)
        s.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] != b" ":
            pass
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"NOOP\r\n")
            assert f.readline().startswith(b"250")
            out.noops.append(time.perf_counter() - t)
        s.sendall(b"QUIT\r\n")
    return out


# --- memory ------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """C{pid} and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_kb(pids: Iterable[int]) -> dict[str, int]:
    """Total RSS and PSS (shared pages divided among their users) of C{pids}, in KB."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "Rss":
                    rss += int(value.split()[0])
                elif key == "Pss":
                    pss += int(value.split()[0])
        except OSError:
            continue
    return {"rss": rss, "pss": pss}
