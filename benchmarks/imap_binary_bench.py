#!/usr/bin/env python3
"""
FETCH BINARY of a large base64 attachment, mailsrv against Dovecot on the
same mbox: the first BINARY.SIZE (a decoding pass), the next one (the size
kept with the MIME structure), BINARY.PEEK[2] streamed to a client that
reads it in chunks, the time a NOOP on another session waits meanwhile, and
mailsrv's peak resident memory (VmHWM) before and after.

    .venv/bin/python benchmarks/imap_binary_bench.py [--mb 50]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.imap_sort_bench import Client, session  # noqa: E402
from tests import dovecot_peer  # noqa: E402
from tests.e2e import PASSWORD, MailServer  # noqa: E402

USER = "bench@example.test"


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def mbox_of(payload: bytes) -> bytes:
    body = base64.encodebytes(payload)
    return (
        b"From bench@example.test Thu Jan  1 00:00:00 2026\n"
        b'Subject: big\nContent-Type: multipart/mixed; boundary="B"\n\n--B\n\ntext\n--B\n'
        b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
        + body
        + b"--B--\n\n"
    )


def fetch_binary(c: Client) -> tuple[float, bytes, int]:
    """BINARY.PEEK[2] read in 1 MB chunks: seconds, digest, literal size."""
    t = time.perf_counter()
    c.n += 1
    tag = b"b%d" % c.n
    c.sock.sendall(tag + b" FETCH 1 (BINARY.PEEK[2])\r\n")
    head = c.file.readline()
    m = re.search(rb"\{(\d+)\}\r\n$", head)
    assert m, head
    left = size = int(m.group(1))
    digest = hashlib.sha256()
    while left:
        chunk = c.file.read(min(left, 1 << 20))
        digest.update(chunk)
        left -= len(chunk)
    while not c.file.readline().startswith(tag + b" "):
        pass
    return time.perf_counter() - t, digest.digest(), size


def measure(port: int, user: str, pw: str, pid: int | None) -> dict[str, object]:
    out: dict[str, object] = {}
    c, _ = session(port, user, pw)
    other, _ = session(port, user, pw)
    if pid:
        out["hwm_before"] = hwm_mb(pid)
    for name in ("size_first", "size_again"):
        t = time.perf_counter()
        c.cmd(b"FETCH 1 (BINARY.SIZE[2])")
        out[name] = time.perf_counter() - t
    waits: list[float] = []
    done = threading.Event()

    def noops() -> None:
        while not done.is_set():
            t = time.perf_counter()
            other.cmd(b"NOOP")
            waits.append(time.perf_counter() - t)
            time.sleep(0.05)

    th = threading.Thread(target=noops)
    th.start()
    out["fetch"], out["digest"], out["size"] = fetch_binary(c)
    done.set()
    th.join()
    out["noop_max"] = max(waits) if waits else 0.0
    if pid:
        out["hwm_after"] = hwm_mb(pid)
    c.close()
    other.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=50, help="attachment size, decoded")
    args = ap.parse_args()
    payload = os.urandom(args.mb * 1024 * 1024)
    base = Path(tempfile.mkdtemp(prefix="binary-bench-"))
    try:
        mbox = base / "folder.mbox"
        mbox.write_bytes(mbox_of(payload))
        print(f"attachment {args.mb} MB decoded, mbox {mbox.stat().st_size / 1e6:.0f} MB")
        rows = {}
        (base / "mailsrv").mkdir()
        server = MailServer(base / "mailsrv")
        server.add_user(USER)
        inbox = server.inbox(USER)
        inbox.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mbox, inbox)
        server.start()
        try:
            rows["mailsrv"] = measure(server.ports["imap"], USER, PASSWORD, server.proc.pid)  # type: ignore[union-attr]
        finally:
            server.close()
        reason = dovecot_peer.available()
        if reason is None:
            dovecot = dovecot_peer.Dovecot()
            try:
                dovecot.start(mbox)
                rows["Dovecot"] = measure(
                    dovecot.port, dovecot_peer.USER, dovecot_peer.PASSWORD, None
                )
            finally:
                dovecot.stop()
        else:
            print(f"Dovecot not measured: {reason}")
        want = hashlib.sha256(payload).digest()
        print(
            "| server | BINARY.SIZE first | again | BINARY.PEEK[2] | NOOP max wait | peak RSS before/after | decoded right |"
        )
        print("|---|---|---|---|---|---|---|")
        for who, r in rows.items():
            rss = f"{r['hwm_before']:.0f}/{r['hwm_after']:.0f} MB" if "hwm_before" in r else "-"
            print(
                f"| {who} | {r['size_first']:.3f} s | {r['size_again']:.4f} s | {r['fetch']:.2f} s "
                f"| {r['noop_max']:.3f} s | {rss} | {r['digest'] == want and r['size'] == len(payload)} |"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
