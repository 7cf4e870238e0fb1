#!/usr/bin/env python3
"""
Memory of the real server opening a big INBOX (issue 2: 100k messages, < 100 MB).

    .venv/bin/python benchmarks/open_memory.py [-n 100000] [-s 4096] [--runs 3] [--warm 3]
                                               [--mbox FILE]

Starts ``twistd -n mailsrv`` in a temporary folder (tests/e2e.MailServer), puts
an mbox made by ../shared/peers/gen_mbox.py in place as the INBOX of one user
(no index), and reads /proc/PID/status of the server:

- VmRSS idle (started, nothing opened yet),
- VmHWM after IMAP LOGIN + SELECT INBOX (cold: full scan + index build), and its time,
- VmHWM after --warm more LOGIN + SELECT + LOGOUT (warm: index present), and their time,
- VmHWM after POP3 USER/PASS + STAT + UIDL + QUIT, and its time,
- VmHWM of a restarted server after LOGIN + SELECT (folder loaded from the index),
- and VmRSS at each of these points (what stays).

A LOGIN verifies an argon2id hash (mailsrv.auth.passwd: 19 MiB, freed after),
so every VmHWM includes that on top of what is live at the time.

Each run starts a fresh server with the index deleted; prints the median of --runs.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import poplib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.e2e import PASSWORD, MailServer  # noqa: E402

GEN = Path("/work/shared/peers/gen_mbox.py")
USER = "bench@example.test"


def status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of C{pid}, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def imap_select(port: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    c = imaplib.IMAP4("127.0.0.1", port)
    c.login(USER, PASSWORD)
    typ, data = c.select("INBOX")
    dt = time.perf_counter() - t0
    assert typ == "OK", (typ, data)
    count = int(data[0])
    c.logout()
    return dt, count


def pop3_stat_uidl(port: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    c = poplib.POP3("127.0.0.1", port, timeout=120)
    c.user(USER)
    c.pass_(PASSWORD)
    count, _size = c.stat()
    _resp, lines, _octets = c.uidl()
    dt = time.perf_counter() - t0
    assert len(lines) == count
    c.quit()
    return dt, count


def one_run(work: Path, mbox: Path, warm: int) -> dict[str, float]:
    base = work / "run"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    server = MailServer(base)
    server.add_user(USER)
    inbox = server.inbox(USER)
    inbox.parent.mkdir(parents=True, exist_ok=True)
    if inbox.exists():
        inbox.unlink()
    os.link(mbox, inbox)
    shutil.rmtree(server.data / "index", ignore_errors=True)
    with server:
        pid = server.proc.pid
        time.sleep(1.0)  # let start-up settle (thread pool, certificate)
        r: dict[str, float] = {"idle_rss": status(pid)["VmRSS"]}
        r["cold_s"], r["messages"] = imap_select(server.ports["imap"])
        r["cold_hwm"], r["cold_rss"] = status(pid)["VmHWM"], status(pid)["VmRSS"]
        times = [imap_select(server.ports["imap"])[0] for _ in range(warm)]
        r["warm_s"] = statistics.median(times)
        r["warm_hwm"], r["warm_rss"] = status(pid)["VmHWM"], status(pid)["VmRSS"]
        r["pop3_s"], _ = pop3_stat_uidl(server.ports["pop3"])
        r["pop3_hwm"], r["pop3_rss"] = status(pid)["VmHWM"], status(pid)["VmRSS"]
    with server:  # a fresh server, the index kept: the folder is loaded from the index
        pid = server.proc.pid
        time.sleep(1.0)
        r["load_s"], _ = imap_select(server.ports["imap"])
        r["load_hwm"], r["load_rss"] = status(pid)["VmHWM"], status(pid)["VmRSS"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=100000)
    ap.add_argument("-s", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warm", type=int, default=3, help="warm SELECTs per run")
    ap.add_argument("--mbox", help="use (and keep) this mbox; generated there if missing")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="open-memory-"))
    try:
        mbox = Path(args.mbox) if args.mbox else work / "gen.mbox"
        if not mbox.exists():
            subprocess.run(
                [sys.executable, str(GEN), str(mbox), "-n", str(args.n), "-s", str(args.s)],
                check=True,
                capture_output=True,
            )
        if mbox.stat().st_dev != work.stat().st_dev:
            shutil.copyfile(mbox, work / "gen.mbox")
            mbox = work / "gen.mbox"
        subprocess.run(["cat", str(mbox)], stdout=subprocess.DEVNULL, check=True)  # page cache
        runs = [one_run(work, mbox, args.warm) for _ in range(args.runs)]

        def med(k: str) -> float:
            return statistics.median(r[k] for r in runs)

        print(
            f"INBOX: {int(runs[0]['messages'])} messages, {mbox.stat().st_size / 1e6:.0f} MB; "
            f"median of {args.runs} fresh servers (max in brackets)"
        )
        print(
            f"{'VmRSS idle':40} {med('idle_rss'):6.1f} MB  [{max(r['idle_rss'] for r in runs):.1f}]"
        )
        for label, key in (
            ("after cold SELECT", "cold"),
            (f"after {args.warm} warm SELECTs", "warm"),
            ("after POP3 STAT+UIDL", "pop3"),
            ("restarted, SELECT from the index", "load"),
        ):
            hwm, rss = key + "_hwm", key + "_rss"
            print(
                f"{'VmHWM ' + label:40} {med(hwm):6.1f} MB  [{max(r[hwm] for r in runs):.1f}]"
                f"   (VmRSS {med(rss):.1f} MB)"
            )
        print(
            f"IMAP LOGIN->SELECT cold {med('cold_s'):.2f} s, warm {med('warm_s'):.3f} s, "
            f"from the index {med('load_s'):.2f} s; POP3 LOGIN->UIDL {med('pop3_s'):.2f} s"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
