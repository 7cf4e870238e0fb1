"""
Other domains' mail servers on loopback, in a process of their own, for
end-to-end tests written as plain blocking tests (one server per class or
module, driven by smtplib, imaplib, swaks): a twisted.names DNS server that
gives each domain an MX at its own loopback address, and one accepting ESMTP
receiver per domain there, all on one port number (the relayer's [relay]
port). They are the receivers of L{tests.test_outbound_support}; each
transaction one accepts (a RCPT to C{nosuchuser@} is refused with 550) is
written as one JSON file in the record folder, in the order they end.

The child is ``python -m tests.remote_world PLAN RECORDS``: PLAN is JSON
mapping domain -> loopback address. It prints one JSON line
C{{"dns": port, "relay": port}} once everything listens, and stops when its
standard input closes (the test ended, or died).
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Transaction:
    """One message a receiver accepted."""

    seq: int
    domain: str  # the domain whose MX took it
    sender: str
    recipients: list[str]
    data: bytes  # as received: dot-unstuffed lines ended by LF
    connections: int  # the receiver's connections so far


class RemoteWorld:
    """
    The parent's handle on the child process: start(), close() (or use it as
    a context manager), and what the receivers took so far.
    """

    def __init__(self, base: Path, domains: dict[str, str]) -> None:
        self.base = base
        self.domains = domains
        self.records = base / "records"
        self.proc: subprocess.Popen | None = None
        self.dns_port = 0
        self.relay_port = 0

    def start(self) -> RemoteWorld:
        self.records.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.remote_world", json.dumps(self.domains), self.records],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(START_TIMEOUT):
                self.close()
                raise TimeoutError(f"the loopback DNS and receivers not ready in {START_TIMEOUT}s")
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the loopback DNS and receivers process exited")
        ports = json.loads(line)
        self.dns_port, self.relay_port = ports["dns"], ports["relay"]
        return self

    def close(self) -> None:
        """Stop the child (it exits when its standard input closes; killed after 10 s)."""
        if self.proc is None:
            return
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> RemoteWorld:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def relay_config(self) -> str:
        """Config lines for a daemon that relays through this DNS server and these receivers."""
        return (
            "[dns]\n"
            f'nameservers = ["127.0.0.1:{self.dns_port}"]\n'
            "[relay]\n"
            f"port = {self.relay_port}\n"
            'retry_min = "1h"\n'
            'retry_max = "1h"\n'
        )

    def transactions(self, since: int = 0) -> list[Transaction]:
        """The transactions taken so far, from number C{since} on, in order."""
        found = []
        for path in sorted(self.records.glob("*.json")):
            seq = int(path.stem)
            if seq < since:
                continue
            r = json.loads(path.read_text())
            found.append(
                Transaction(
                    seq,
                    r["domain"],
                    r["sender"],
                    r["recipients"],
                    r["data"].encode("latin-1"),
                    r["connections"],
                )
            )
        return found

    def mark(self) -> int:
        """The number the next transaction will have: pass it to L{transactions}."""
        return len(list(self.records.glob("*.json")))


def wait_until(
    predicate: Any, timeout: float, what: str, details: Any = lambda: "", every: float = 0.05
) -> Any:
    """Poll C{predicate} until it returns something true; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details()}")
        time.sleep(every)


# --- the child process ---------------------------------------------------------


def _write_record(folder: Path, seq: int, record: dict) -> None:
    """One transaction as one file, written whole before it has its name."""
    tmp = folder / f".{seq:06d}.tmp"
    tmp.write_text(json.dumps(record))
    os.rename(tmp, folder / f"{seq:06d}.json")


def _recording(domain: str, folder: Path, numbers: Any) -> Any:
    """A Receiver whose accepted messages are also written to C{folder}."""
    from tests.test_outbound_support import Receiver

    class Recorder(list):
        def append(self, m: Any) -> None:
            super().append(m)
            record = {
                "domain": domain,
                "sender": m.sender,
                "recipients": list(m.recipients),
                "data": m.data.decode("latin-1"),
                "connections": receiver.connections,
            }
            _write_record(folder, next(numbers), record)

    receiver = Receiver("accept", messages=Recorder())
    return receiver


def main() -> None:
    from twisted.internet import protocol, reactor, stdio
    from twisted.names import dns

    from tests.test_outbound_support import listen_all, start_dns

    domains: dict[str, str] = json.loads(sys.argv[1])
    folder = Path(sys.argv[2])
    numbers = itertools.count()
    plan = {address: (_recording(d, folder, numbers), None) for d, address in domains.items()}
    relay_port, _ = listen_all(reactor, plan)
    records = []
    for d, address in domains.items():
        records.append((d, dns.Record_MX(10, f"mx.{d}".encode())))
        records.append((f"mx.{d}", dns.Record_A(address)))
    dns_port = start_dns(reactor, records)

    class Parent(protocol.Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            reactor.stop()  # type: ignore[attr-defined]

    sys.stdout.write(json.dumps({"dns": dns_port.getHost().port, "relay": relay_port}) + "\n")
    sys.stdout.flush()
    stdio.StandardIO(Parent())
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
