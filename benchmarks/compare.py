#!/usr/bin/env python3
"""
Measure mailsrv side by side with Postfix and Dovecot on this machine, on the
same mbox data, with the peers' own client scripts (../shared/peers/), and
print every figure and ratio as median [min-max] over the rounds
(ratio > 1: mailsrv better; mailsrv / peer for rates, peer / mailsrv for times).

    sudo .venv/bin/python benchmarks/compare.py [--only smtp,pop3,open,imap] [--repeat 5]

The method, so that a noisy moment on a shared machine does not fall on one
server's runs only:
- Runs alternate between the servers: each round runs mailsrv and the peer
  back to back, and the order flips every round (even rounds mailsrv first,
  odd rounds the peer first).
- Every round repeats the cold run: both servers get the pristine mbox file
  again (a new file, as another program would write it), their index is
  deleted and mailsrv restarts, so "cold" is a median of --repeat runs, not
  one. The warm run follows the cold one, on the same file and index.
- Each ratio is taken within a round (the two runs next to each other), and
  the ratios' median [min-max] is printed beside the figures'.
The load average is printed at the start, at each round and at the end; every
run's own JSON line goes to /tmp/mailsrv-bench/runs.jsonl.

Needs root (the peers run as a private Postfix and Dovecot) and Debian's postfix,
dovecot-imapd and dovecot-pop3d packages. Everything listens on 127.0.0.1 only;
every load is bounded; only processes started here are stopped, by their pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = (ROOT.parent / "shared" / "peers").resolve()
REF = Path("/tmp/ref")
WORK = Path("/tmp/mailsrv-bench")
PRISTINE = WORK / "pristine"
DOMAIN = "example.test"
PASS = "pass"
PEER_UID = PEER_GID = 5000  # the peers' mailbox owner (ref-env.sh)
CG_ROOT = Path("/sys/fs/cgroup/cpuacct")
TWISTD = str(Path(sys.executable).with_name("twistd"))
SMTP_PAUSE = 2.0  # seconds between two SMTP runs: the last one's deliveries settle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def sh(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, **kw)


def json_lines(out: str) -> list[dict]:
    rows = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def load() -> str:
    """The load averages (1, 5, 15 min), as uptime prints them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


class Mailsrv:
    """Our server in a subprocess, in its own cpuacct group when there is one."""

    def __init__(self) -> None:
        self.ports = {n: free_port() for n in ("smtp", "pop3", "imap")}
        self.conf = WORK / "mailsrv.toml"
        self.data = WORK / "data"
        self.proc: subprocess.Popen | None = None

    def configure(self) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f'[server]\nhostname = "bench.{DOMAIN}"\ndomains = ["{DOMAIN}"]\ndata_dir = "data"\n'
            "[auth]\nfailure_delay = 0.1\n[limits]\nmax_errors = 1000\n"
            "[listen]\n"
            + "".join(f'{n} = ["tcp:{p}:interface=127.0.0.1"]\n' for n, p in self.ports.items())
        )

    def add_user(self, local: str) -> None:
        sh(
            sys.executable,
            "-m",
            "mailsrv",
            "--config",
            str(self.conf),
            "user",
            "add",
            f"{local}@{DOMAIN}",
            input=PASS + "\n",
            text=True,
            capture_output=True,
        )

    def inbox(self, local: str) -> Path:
        return self.data / "mail" / DOMAIN / local / "INBOX"

    def index(self, local: str) -> Path:
        return self.data / "index" / DOMAIN / local

    def start(self) -> None:
        log = open(WORK / "twistd.out", "ab")
        self.proc = subprocess.Popen(
            [
                TWISTD,
                "--nodaemon",
                "--pidfile=",
                f"--logfile={WORK / 'server.log'}",
                "mailsrv",
                "--config",
                str(self.conf),
            ],
            cwd=WORK,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        grp = CG_ROOT / "refpeer-mailsrv"
        try:
            grp.mkdir(exist_ok=True)
            (grp / "cgroup.procs").write_text(str(self.proc.pid))
        except OSError:
            pass
        for p in self.ports.values():
            wait_port(p)

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def gen(path: Path, n: int, size: int = 4096) -> None:
    """A pristine mbox of C{n} messages for the user named like the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [str(PEERS / "gen_mbox.py"), str(path), "-n", str(n), "-s", str(size)]
    sh(sys.executable, *args, "--to", f"{path.name}@{DOMAIN}", capture_output=True)


def put_mbox(src: Path, dst: Path, index: Path, owner: tuple[int, int] | None = None) -> None:
    """
    C{dst} becomes a new file with C{src}'s bytes (written beside it and
    renamed over it, as another program would replace a mailbox) and the
    index C{index} goes: the next open is index-cold.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".bench-tmp")
    shutil.copyfile(src, tmp)
    if owner:
        os.chown(tmp, *owner)
    os.replace(tmp, dst)
    if index.exists():
        shutil.rmtree(index)


def spread(vals: list, ratio: bool = False) -> str:
    """median [min-max] (ratios: 1.23x [1.01-1.40]), or "-" without values."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"

    def f(v: float) -> str:
        if ratio:
            return f"{v:.2f}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"

    x = "x" if ratio else ""
    if len(vals) == 1:
        return f(vals[0]) + x
    return f"{f(statistics.median(vals))}{x} [{f(min(vals))}-{f(max(vals))}]"


def ratios(ours: list, peers: list, higher_is_better: bool) -> list[float]:
    """One ratio per round (> 1: mailsrv better)."""
    out = []
    for u, p in zip(ours, peers, strict=True):
        if u and p:
            out.append(u / p if higher_is_better else p / u)
    return out


class Table:
    """The figures of every round, by measure; printed as median [min-max]."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, label: str, peer: str, ours: float | None, theirs: float | None, hib: bool):
        row = self.rows.setdefault(label, {"peer": peer, "us": [], "them": [], "hib": hib})
        row["us"].append(ours)
        row["them"].append(theirs)

    def note(self, label: str) -> None:
        self.rows.setdefault(label, {"peer": "", "us": [], "them": [], "hib": True})

    def print(self, repeat: int) -> None:
        print(
            f"| measure (median [min-max] of {repeat} rounds) | mailsrv | peer "
            "| ratio per round (>1: mailsrv better) | peer |"
        )
        print("|---|---|---|---|---|")
        for label, r in self.rows.items():
            rs = ratios(r["us"], r["them"], r["hib"])
            ratio = spread(rs, ratio=True)
            print(f"| {label} | {spread(r['us'])} | {spread(r['them'])} | {ratio} | {r['peer']} |")


class Bench:
    """One comparison: rounds of mailsrv and peer runs, alternated."""

    def __init__(self, ms: Mailsrv, table: Table, raw) -> None:
        self.ms = ms
        self.table = table
        self.raw = raw

    def peer_script(self, script: str, *args: object) -> list[dict]:
        """Run one of the peers' client scripts; its JSON lines (also kept in runs.jsonl)."""
        out = sh(
            sys.executable, str(PEERS / script), *map(str, args), capture_output=True, text=True
        )
        rows = json_lines(out.stdout)
        for r in rows:
            self.raw.write(json.dumps(dict(r, script=script, load=load())) + "\n")
        self.raw.flush()
        return rows

    def alternate(self, rnd: int, ours: Callable[[], dict], theirs: Callable[[], dict]):
        """Both runs of a round, mailsrv first in even rounds: (ours, theirs)."""
        if rnd % 2 == 0:
            u = ours()
            return u, theirs()
        t = theirs()
        return ours(), t


def smtp_round(b: Bench, rnd: int) -> None:
    args = ("-m", 2000, "-s", 10, "-l", 4096, "--repeat", 1)

    def run(port: int, mbox: Path, cgroup: str) -> dict:
        time.sleep(SMTP_PAUSE)
        return b.peer_script(
            "smtp_bench.py",
            "--server",
            f"127.0.0.1:{port}",
            "--to",
            f"alice@{DOMAIN}",
            "--mbox",
            mbox,
            "--cgroup",
            cgroup,
            *args,
        )[0]

    us, pf = b.alternate(
        rnd,
        lambda: run(b.ms.ports["smtp"], b.ms.inbox("alice"), "mailsrv"),
        lambda: run(2525, REF / "mail" / "alice", "postfix"),
    )
    t = b.table
    k = "accept_msgs_per_s"
    t.add("SMTP accept msg/s (10 conns, 2000 x 4 KB)", "Postfix", us.get(k), pf.get(k), True)
    k = "e2e_msgs_per_s"
    t.add("SMTP end-to-end msg/s (fsynced in mbox)", "Postfix", us.get(k), pf.get(k), True)
    k = "server_cpu_ms_per_msg"
    t.add("SMTP server CPU ms/msg", "Postfix", us.get(k), pf.get(k), False)


def cold_and_warm(
    b: Bench, rnd: int, user: str, script: str, proto: str, *args: object
) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    """
    Both servers on the pristine mbox of C{user} with no index (mailsrv
    restarted), then once more warm: ((ours, theirs) cold, (ours, theirs) warm).
    """
    src = PRISTINE / user
    b.ms.stop()
    put_mbox(src, b.ms.inbox(user), b.ms.index(user))
    b.ms.start()
    dovecot_index = REF / "dovecot" / "index" / user
    put_mbox(src, REF / "mail" / user, dovecot_index, (PEER_UID, PEER_GID))

    def ours() -> dict:
        port = b.ms.ports[proto]
        return b.peer_script(
            script, "127.0.0.1", port, f"{user}@{DOMAIN}", PASS, *args, "--cgroup", "mailsrv"
        )[0]

    def theirs() -> dict:
        port = {"pop3": 1110, "imap": 1143}[proto]
        return b.peer_script(script, "127.0.0.1", port, user, PASS, *args, "--cgroup", "dovecot")[0]

    cold = b.alternate(rnd, ours, theirs)
    warm = b.alternate(rnd, ours, theirs)
    return cold, warm


def add_cold_warm(b: Bench, label: str, cold, warm, key: str) -> None:
    """Time rows (lower is better) for a cold and a warm pair of runs."""
    b.table.add(f"{label}, cold (s)", "Dovecot", cold[0].get(key), cold[1].get(key), False)
    b.table.add(f"{label}, warm (s)", "Dovecot", warm[0].get(key), warm[1].get(key), False)


def pop3_round(b: Bench, rnd: int) -> None:
    cold, warm = cold_and_warm(b, rnd, "pop10k", "pop3_bench.py", "pop3", "--repeat", 1)
    for r in (*cold, *warm):
        r["login_stat_s"] = r["login_s"] + r["stat_s"]
    add_cold_warm(b, "POP3 10k: login+STAT", cold, warm, "login_stat_s")
    add_cold_warm(b, "POP3 10k: RETR of all", cold, warm, "retr_s")
    add_cold_warm(b, "POP3 10k: whole session", cold, warm, "total_s")


def open_round(b: Bench, rnd: int) -> None:
    cold, warm = cold_and_warm(
        b, rnd, "big100k", "imap_bench.py", "imap", "--mode", "open", "--repeat", 1
    )
    add_cold_warm(b, "Open 100k/417 MB INBOX (IMAP LOGIN->SELECT)", cold, warm, "login_to_select_s")
    # mailsrv restarted for this round's cold run: its peak is this round's
    label = "mailsrv peak RSS through a cold and a warm 100k open (MB)"
    b.table.add(label, "", b.ms.peak_rss_mb(), None, True)


def imap_round(b: Bench, rnd: int) -> None:
    args = ("--mode", "full", "--bodies", "bulk", "--repeat", 1)
    cold, warm = cold_and_warm(b, rnd, "imap10k", "imap_bench.py", "imap", *args)
    for key, label in (
        ("login_to_select_s", "IMAP 10k: LOGIN->SELECT"),
        ("envelope_fetch_s", "IMAP 10k: UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)"),
        ("bodies_s", "IMAP 10k: all bodies (42 MB) in one FETCH"),
    ):
        add_cold_warm(b, label, cold, warm, key)


BENCHES: dict[str, tuple[Callable[[Bench, int], None], tuple[tuple[str, int], ...]]] = {
    # name: (one round, pristine mboxes it needs: (user, messages))
    "smtp": (smtp_round, ()),
    "pop3": (pop3_round, (("pop10k", 10000),)),
    "open": (open_round, (("big100k", 100000),)),
    "imap": (imap_round, (("imap10k", 10000),)),
}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="smtp,pop3,open,imap")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (each: both servers, cold+warm)")
    ap.add_argument("--keep", action="store_true", help="leave the peers running")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: the peers run as a private Postfix and Dovecot", file=sys.stderr)
        return 2
    if not shutil.which("postfix") or not shutil.which("dovecot"):
        print(
            "install the peers: apt-get install postfix dovecot-imapd dovecot-pop3d",
            file=sys.stderr,
        )
        return 2
    if not 1 <= a.repeat <= 20:
        print("--repeat: 1 to 20 rounds", file=sys.stderr)
        return 2
    only = [n for n in BENCHES if n in a.only.split(",")]
    print(f"load average at start: {load()}", file=sys.stderr, flush=True)
    if WORK.exists():
        shutil.rmtree(WORK)
    ms = Mailsrv()
    ms.configure()
    for u in ("alice", "pop10k", "imap10k", "big100k"):
        ms.add_user(u)
    for name in only:
        for user, n in BENCHES[name][1]:
            gen(PRISTINE / user, n)
    # The daemons keep the output they inherit open: hand them a file, not a pipe.
    with open(WORK / "peers.log", "ab") as log:
        sh("bash", str(PEERS / "postfix-start.sh"), stdout=log, stderr=log)
        sh("bash", str(PEERS / "dovecot-start.sh"), stdout=log, stderr=log)
    ms.start()
    table = Table()
    try:
        with open(WORK / "runs.jsonl", "w") as raw:
            bench = Bench(ms, table, raw)
            for name in only:
                for rnd in range(a.repeat):
                    print(f"... {name} round {rnd + 1}, load {load()}", file=sys.stderr, flush=True)
                    try:
                        BENCHES[name][0](bench, rnd)
                    except Exception as e:  # keep the other figures
                        table.note(f"{name} round {rnd + 1}: FAILED {e!r}"[:200])
    finally:
        ms.stop()
        if not a.keep:
            with open(WORK / "peers.log", "ab") as log:
                for script in ("dovecot-stop.sh", "postfix-stop.sh"):
                    subprocess.run(["bash", str(PEERS / script)], stdout=log, stderr=log)
    print(f"load average at the end: {load()}", file=sys.stderr, flush=True)
    table.print(a.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
