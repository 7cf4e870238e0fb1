#!/usr/bin/env python3
"""
Relay throughput: messages/s submitted to mailsrv and relayed to Postfix's
``smtp-sink``, side by side with the reference Postfix relaying to its sink.

Both servers are driven by the same client: S threads, each one SMTP
connection reused for its share of M messages of L bytes to
``x@remote.test`` (mailsrv: the submission port with AUTH PLAIN on
loopback; Postfix: port 2525, relaying for 127.0.0.0/8). "accept" is the
time until the last 250; "end-to-end" the time until the server's log shows
every message ``status=sent`` to the sink.

mailsrv runs as ``twistd -n mailsrv`` with a config in a temporary folder,
``[relay] smarthost`` pointing at a private smtp-sink on a free loopback port
(no DNS, like Postfix's ``relayhost``). Postfix and its sink are the shared
reference instances (/work/shared/peers); they are started if not running
and stopped afterwards only if this script started them.

    .venv/bin/python benchmarks/relay_bench.py -m 2000 -s 10 -l 4096 --repeat 3 [--postfix]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path("/work/shared/peers")
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX_CGROUP = "/sys/fs/cgroup/cpuacct/refpeer-postfix/cpuacct.usage"
PASSWORD = "bench password"
SENT = r"status=sent"
CLIENT_CPU = 0.0  # seconds of CPU the last drive() took (the client's own threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class LogCounter:
    """Counts lines matching a pattern appended to a log file since creation."""

    def __init__(self, path: Path, pattern: str) -> None:
        self.path, self.rx, self.n, self.rest = path, re.compile(pattern.encode()), 0, b""
        try:
            self.off = path.stat().st_size
        except FileNotFoundError:
            self.off = 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.off)
                data = f.read()
        except FileNotFoundError:
            return self.n
        self.off += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        self.n += sum(1 for ln in lines if self.rx.search(ln))
        return self.n


def cpu_seconds(pid: int, which: str = "both") -> float:
    """User plus system CPU of a process (or only "user" or "system")."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    ticks = {"both": user + system, "user": user, "system": system}[which]
    return ticks / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (the relay process), as far as they still run."""
    total = cpu_seconds(pid)
    for c in children(pid):
        try:
            total += cpu_seconds(c)
        except OSError:
            pass
    return total


def make_message(size: int, n: int) -> bytes:
    head = (
        f"From: bench@example.test\r\nTo: x@remote.test\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench{n}.{time.time()}@example.test>\r\n\r\n"
    ).encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789 the quick brown fox jumps over it\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


def drive(port: int, messages: int, sessions: int, size: int, login: bool) -> float:
    """Send the messages over C{sessions} reused connections; return seconds to the last 250."""
    errors: list[BaseException] = []
    share = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    start = threading.Event()

    def worker(i: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
                s.ehlo("bench.test")
                if login:
                    s.login("bench@example.test", PASSWORD)
                start.wait()
                for k in range(share[i]):
                    s.sendmail("bench@example.test", ["x@remote.test"], make_message(size, k))
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    global CLIENT_CPU
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for t in threads:
        t.start()
    time.sleep(0.5)  # every session connected (and logged in) before the clock starts
    t0 = time.monotonic()
    start.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    CLIENT_CPU = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if errors:
        raise RuntimeError(f"{len(errors)} client error(s), first: {errors[0]!r}")
    return elapsed


def wait_count(counter: LogCounter, n: int, t0: float, timeout: float = 600) -> float:
    while counter.count() < n:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"only {counter.n} of {n} messages relayed")
        time.sleep(0.01)
    return time.monotonic() - t0


class Mailsrv:
    """A private mailsrv relaying through a private smtp-sink."""

    def __init__(self, profile: str | None = None, profile_relay: str | None = None) -> None:
        self.profile = profile
        self.profile_relay = profile_relay
        self.base = Path(tempfile.mkdtemp(prefix="relaybench-"))
        self.sink_port = free_port()
        self.submission = free_port()
        self.smtp = free_port()
        self.config = self.base / "mailsrv.toml"
        self.config.write_text(f"""
[server]
hostname = "bench.example.test"
domains = ["example.test"]
data_dir = "data"
[listen]
smtp = ["tcp:{self.smtp}:interface=127.0.0.1"]
submission = ["tcp:{self.submission}:interface=127.0.0.1"]
[auth]
cleartext = "loopback"
failure_delay = 0.1
[relay]
smarthost = "127.0.0.1:{self.sink_port}"
per_destination_concurrency = 10
""")
        self.log = self.base / "server.log"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        sink_args = [SMTP_SINK, "-h", "sink.test"]
        if os.geteuid() == 0:
            sink_args += ["-u", "nobody"]
        sink = subprocess.Popen(
            sink_args + [f"127.0.0.1:{self.sink_port}", "1024"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(sink)
        py = sys.executable
        subprocess.run(
            [
                py,
                "-m",
                "mailsrv",
                "--config",
                str(self.config),
                "user",
                "add",
                "bench@example.test",
            ],
            input=PASSWORD + "\n",
            text=True,
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        wait_port(self.sink_port)
        self.start_server()

    def start_server(self) -> None:
        twistd = str(Path(sys.executable).with_name("twistd"))
        # The log to our own file: twistd's --logfile rotates at 1 MB.
        with open(self.log, "ab") as log:
            self.server = subprocess.Popen(
                [
                    twistd,
                    "--nodaemon",
                    "--pidfile=",
                    "--logfile=-",
                    *(
                        [f"--profile={self.profile}", "--profiler=cprofile", "--savestats"]
                        if self.profile
                        else []
                    ),
                    "mailsrv",
                    "--config",
                    str(self.config),
                ],
                cwd=self.base,
                env=dict(
                    os.environ,
                    **({"MAILSRV_RELAY_PROFILE": self.profile_relay} if self.profile_relay else {}),
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(self.server)
        wait_port(self.submission)

    def stop_server(self) -> None:
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(30)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def prefill(self, a: argparse.Namespace) -> None:
        """Queue the messages straight into the queue folder, as a stopped server left them."""
        sys.path.insert(0, str(ROOT))
        from mailsrv.outbound.queue import Envelope, QueueStore, Recipient, new_queue_id
        from mailsrv.spool import BytesSource

        store = QueueStore(self.base / "data" / "queue")
        store.ensure()
        now = time.time()
        for k in range(a.messages):
            data = make_message(a.size, k).replace(b"\r\n", b"\n")
            env = Envelope(
                new_queue_id(time.time()),
                "bench@example.test",
                [Recipient("x@remote.test")],
                now,
                now,
                size=len(data),
            )
            store.store(env, BytesSource(data))

    def run_relay_only(self, a: argparse.Namespace) -> dict:
        """Time from the relayer's start (with M messages queued) to the last one relayed."""
        self.stop_server()
        self.prefill(a)
        started = LogCounter(self.log, r"relayer started with")
        counter = LogCounter(self.log, SENT)
        self.start_server()
        while started.count() < 1:
            time.sleep(0.005)
        t0 = time.monotonic()
        cpu0 = cpu_seconds(self.server.pid)
        e2e = wait_count(counter, a.messages, t0)
        cpu = cpu_seconds(self.server.pid) - cpu0
        return {
            "server": "mailsrv relayer only",
            "e2e_msg_s": a.messages / e2e,
            "cpu_ms_per_msg": 1000 * cpu / a.messages,
        }

    def run(self, a: argparse.Namespace) -> dict:
        if a.relay_only:
            return self.run_relay_only(a)
        counter = LogCounter(self.log, SENT)
        cpu0 = cpu_seconds(self.server.pid)
        sys0 = cpu_seconds(self.server.pid, "system")
        tree0 = tree_cpu_seconds(self.server.pid)
        t0 = time.monotonic()
        accept = drive(self.submission, a.messages, a.sessions, a.size, login=True)
        e2e = wait_count(counter, a.messages, t0)
        cpu = cpu_seconds(self.server.pid) - cpu0
        system = cpu_seconds(self.server.pid, "system") - sys0
        tree = tree_cpu_seconds(self.server.pid) - tree0
        return {
            "server": "mailsrv",
            "accept_msg_s": a.messages / accept,
            "e2e_msg_s": a.messages / e2e,
            "cpu_ms_per_msg": 1000 * tree / a.messages,
            "server_cpu_ms_per_msg": 1000 * cpu / a.messages,
            "server_sys_ms_per_msg": 1000 * system / a.messages,
            "relay_cpu_ms_per_msg": 1000 * (tree - cpu) / a.messages,
            "client_cpu_ms_per_msg": 1000 * CLIENT_CPU / a.messages,
        }


class Postfix:
    """The shared reference Postfix (relayhost = smtp-sink on :2526)."""

    log = Path("/tmp/ref/postfix/maillog")
    port = 2525

    def start(self) -> None:
        self.started = []
        for name in ("sink", "postfix"):
            if not self._running(name):
                subprocess.run([str(PEERS / f"{name}-start.sh")], check=True, capture_output=True)
                self.started.append(name)
        wait_port(self.port)

    def _running(self, name: str) -> bool:
        pidfile = (
            Path("/tmp/ref/sink/pid")
            if name == "sink"
            else Path("/tmp/ref/postfix/spool/pid/master.pid")
        )
        try:
            os.kill(int(pidfile.read_text().strip()), 0)
            return True
        except (OSError, ValueError):
            return False

    @staticmethod
    def cpu() -> float:
        """CPU seconds of the reference Postfix's cgroup (NaN where there is none)."""
        try:
            return int(Path(POSTFIX_CGROUP).read_text()) / 1e9
        except (OSError, ValueError):
            return float("nan")

    def stop(self) -> None:
        for name in reversed(self.started):
            subprocess.run([str(PEERS / f"{name}-stop.sh")], capture_output=True)

    def run(self, a: argparse.Namespace) -> dict:
        counter = LogCounter(self.log, r"relay=127\.0\.0\.1\[127\.0\.0\.1\]:2526.*status=sent")
        cpu0 = self.cpu()
        t0 = time.monotonic()
        accept = drive(self.port, a.messages, a.sessions, a.size, login=False)
        e2e = wait_count(counter, a.messages, t0)
        cpu = self.cpu() - cpu0
        return {
            "server": "postfix",
            "accept_msg_s": a.messages / accept,
            "e2e_msg_s": a.messages / e2e,
            # every Postfix process (smtpd, cleanup, qmgr, smtp...): its cgroup
            "cpu_ms_per_msg": 1000 * cpu / a.messages,
            "client_cpu_ms_per_msg": 1000 * CLIENT_CPU / a.messages,
        }


def spread(vals: list[float]) -> str:
    """median [min-max] of C{vals}."""
    return f"{statistics.median(vals):.2f} [{min(vals):.2f}-{max(vals):.2f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--messages", type=int, default=2000)
    ap.add_argument("-s", "--sessions", type=int, default=10)
    ap.add_argument("-l", "--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--postfix", action="store_true", help="also measure the reference Postfix")
    ap.add_argument(
        "--relay-only",
        action="store_true",
        help="mailsrv: queue the messages on disk first, time only the relayer",
    )
    ap.add_argument(
        "--profile", metavar="FILE", help="mailsrv: run twistd under cProfile, stats to FILE"
    )
    ap.add_argument(
        "--profile-relay", metavar="FILE", help="mailsrv: run the relay process under cProfile"
    )
    a = ap.parse_args()
    targets = [Mailsrv(a.profile, a.profile_relay)] + ([Postfix()] if a.postfix else [])
    results: dict[str, list[dict]] = {}
    started = []
    try:
        for target in targets:
            target.start()
            started.append(target)
        # Runs alternate between the servers, and the order flips every
        # round, so that a noisy moment on this shared machine does not fall
        # on one server's runs only.
        for rnd in range(a.repeat):
            print(f"round {rnd + 1}, load average {os.getloadavg()}", file=sys.stderr, flush=True)
            for target in targets if rnd % 2 == 0 else targets[::-1]:
                r = target.run(a)
                print(json.dumps(r), flush=True)
                results.setdefault(r["server"], []).append(r)
    finally:
        for target in reversed(started):
            target.stop()
    for server, runs in results.items():
        summary = {k: spread([r[k] for r in runs]) for k in runs[0] if k != "server"}
        print(f"{server}: median [min-max] of {len(runs)}: {json.dumps(summary)}")
    if "mailsrv" in results and "postfix" in results:
        # one ratio per round, from the two runs next to each other (> 1: mailsrv better)
        pairs = list(zip(results["mailsrv"], results["postfix"], strict=True))
        ratios = {
            "accept": spread([m["accept_msg_s"] / p["accept_msg_s"] for m, p in pairs]),
            "end_to_end": spread([m["e2e_msg_s"] / p["e2e_msg_s"] for m, p in pairs]),
            "cpu_per_msg": spread([p["cpu_ms_per_msg"] / m["cpu_ms_per_msg"] for m, p in pairs]),
        }
        print(f"mailsrv / postfix per round, median [min-max]: {json.dumps(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
