#!/usr/bin/env python3
"""
Measure mailsrv side by side with Postfix and Dovecot on this machine, on the
same mbox data, with the peers' own client scripts (../shared/peers/), and
print medians with ratios (mailsrv / peer for rates; peer / mailsrv for times).

    sudo .venv/bin/python benchmarks/compare.py [--only smtp,pop3,open,imap] [--repeat 3]

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = (ROOT.parent / "shared" / "peers").resolve()
REF = Path("/tmp/ref")
WORK = Path("/tmp/mailsrv-bench")
DOMAIN = "example.test"
PASS = "pass"
CG_ROOT = Path("/sys/fs/cgroup/cpuacct")
TWISTD = str(Path(sys.executable).with_name("twistd"))


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


def gen(path: Path, n: int, size: int = 4096, chown: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        str(PEERS / "gen_mbox.py"),
        str(path),
        "-n",
        str(n),
        "-s",
        str(size),
        "--to",
        f"{path.name}@{DOMAIN}",
    ]
    if chown:
        args += ["--chown", chown]
    sh(*args, capture_output=True)


def copy_mbox(src: Path, dst: Path, index: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    if index.exists():
        shutil.rmtree(index)


def med(rows: list[dict], key: str, which=slice(None)) -> float | None:
    vals = [r[key] for r in rows[which] if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def peer_script(script: str, *args: object) -> list[dict]:
    """Run one of the peers' client scripts; its JSON lines."""
    out = sh(sys.executable, str(PEERS / script), *map(str, args), capture_output=True, text=True)
    return json_lines(out.stdout)


def mailsrv_and_dovecot(
    ms: Mailsrv, script: str, proto: str, user: str, *args: object
) -> tuple[list[dict], list[dict]]:
    """The same client script against mailsrv and Dovecot, each index cold for run 1."""
    ours = peer_script(
        script,
        "127.0.0.1",
        ms.ports[proto],
        f"{user}@{DOMAIN}",
        PASS,
        *args,
        "--reset-index",
        ms.index(user),
        "--cgroup",
        "mailsrv",
    )
    peer = peer_script(
        script,
        "127.0.0.1",
        {"pop3": 1110, "imap": 1143}[proto],
        user,
        PASS,
        *args,
        "--reset-index",
        REF / "dovecot" / "index" / user,
        "--cgroup",
        "dovecot",
    )
    return ours, peer


def cold_and_warm(out: list, label: str, us: list[dict], dc: list[dict], key: str) -> None:
    """Run 1 (index cold) and the median of the later runs, as time rows (lower is better)."""
    out.append(
        (f"{label}, cold (s)", us[0][key], dc[0][key], ratio(dc[0][key], us[0][key]), "Dovecot")
    )
    u, d = med(us, key, slice(1, None)), med(dc, key, slice(1, None))
    out.append((f"{label}, warm (s)", u, d, ratio(d, u), "Dovecot"))


def bench_smtp(ms: Mailsrv, repeat: int, out: list) -> None:
    args = ("-m", 2000, "-s", 10, "-l", 4096, "--repeat", repeat, "--pause", 2)
    pf = peer_script(
        "smtp_bench.py",
        "--server",
        "127.0.0.1:2525",
        "--to",
        f"alice@{DOMAIN}",
        "--mbox",
        REF / "mail" / "alice",
        "--cgroup",
        "postfix",
        *args,
    )[-1]
    us = peer_script(
        "smtp_bench.py",
        "--server",
        f"127.0.0.1:{ms.ports['smtp']}",
        "--to",
        f"alice@{DOMAIN}",
        "--mbox",
        ms.inbox("alice"),
        "--cgroup",
        "mailsrv",
        *args,
    )[-1]
    for k, label in (
        ("median_accept_msgs_per_s", "SMTP accept msg/s (10 conns, 2000 x 4 KB)"),
        ("median_e2e_msgs_per_s", "SMTP end-to-end msg/s (fsynced in mbox)"),
    ):
        out.append((label, us.get(k), pf.get(k), ratio(us.get(k), pf.get(k)), "Postfix"))
    k = "median_server_cpu_ms_per_msg"
    out.append(
        ("SMTP server CPU ms/msg", us.get(k), pf.get(k), ratio(pf.get(k), us.get(k)), "Postfix")
    )


def bench_pop3(ms: Mailsrv, repeat: int, out: list) -> None:
    src = REF / "mail" / "pop10k"
    gen(src, 10000, chown="5000:5000")
    copy_mbox(src, ms.inbox("pop10k"), ms.index("pop10k"))
    us, dc = mailsrv_and_dovecot(ms, "pop3_bench.py", "pop3", "pop10k", "--repeat", repeat)
    for rows in (us, dc):
        for r in rows:
            r["login_stat_s"] = r["login_s"] + r["stat_s"]
    cold_and_warm(out, "POP3 10k: login+STAT", us, dc, "login_stat_s")
    cold_and_warm(out, "POP3 10k: RETR of all", us, dc, "retr_s")
    cold_and_warm(out, "POP3 10k: whole session", us, dc, "total_s")


def bench_open(ms: Mailsrv, repeat: int, out: list) -> None:
    src = REF / "mail" / "big100k"
    gen(src, 100000, chown="5000:5000")
    copy_mbox(src, ms.inbox("big100k"), ms.index("big100k"))
    ms.stop()
    ms.start()  # a fresh process, so its peak RSS is this test's
    us, dc = mailsrv_and_dovecot(
        ms, "imap_bench.py", "imap", "big100k", "--mode", "open", "--repeat", repeat
    )
    cold_and_warm(out, "Open 100k/417 MB INBOX (IMAP LOGIN->SELECT)", us, dc, "login_to_select_s")
    out.append(("mailsrv peak RSS during the 100k opens (MB)", ms.peak_rss_mb(), None, "-", ""))


def bench_imap(ms: Mailsrv, repeat: int, out: list) -> None:
    src = REF / "mail" / "imap10k"
    gen(src, 10000, chown="5000:5000")
    copy_mbox(src, ms.inbox("imap10k"), ms.index("imap10k"))
    us, dc = mailsrv_and_dovecot(
        ms,
        "imap_bench.py",
        "imap",
        "imap10k",
        "--mode",
        "full",
        "--bodies",
        "bulk",
        "--repeat",
        repeat,
    )
    for key in ("login_to_select_s", "envelope_fetch_s", "bodies_s"):
        cold_and_warm(out, f"IMAP 10k {key}", us, dc, key)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="smtp,pop3,open,imap")
    ap.add_argument("--repeat", type=int, default=3)
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
    only = set(a.only.split(","))
    if WORK.exists():
        shutil.rmtree(WORK)
    ms = Mailsrv()
    ms.configure()
    for u in ("alice", "pop10k", "imap10k", "big100k"):
        ms.add_user(u)
    # The daemons keep the output they inherit open: hand them a file, not a pipe.
    with open(WORK / "peers.log", "ab") as log:
        sh("bash", str(PEERS / "postfix-start.sh"), stdout=log, stderr=log)
        sh("bash", str(PEERS / "dovecot-start.sh"), stdout=log, stderr=log)
    ms.start()
    rows: list = []
    try:
        for name, fn in (
            ("smtp", bench_smtp),
            ("pop3", bench_pop3),
            ("open", bench_open),
            ("imap", bench_imap),
        ):
            if name in only:
                print(f"... {name}", file=sys.stderr, flush=True)
                try:
                    fn(ms, a.repeat, rows)
                except Exception as e:  # keep the other figures
                    rows.append((f"{name}: FAILED {e!r}"[:200], None, None, "-", ""))
    finally:
        ms.stop()
        if not a.keep:
            with open(WORK / "peers.log", "ab") as log:
                for script in ("dovecot-stop.sh", "postfix-stop.sh"):
                    subprocess.run(["bash", str(PEERS / script)], stdout=log, stderr=log)
    print(
        f"| measure (median of {a.repeat}) | mailsrv | peer | ratio (>1: mailsrv better) | peer |"
    )
    print("|---|---|---|---|---|")
    for label, us, peer, r, who in rows:
        fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        print(f"| {label} | {fmt(us)} | {fmt(peer)} | {r} | {who} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
