#!/usr/bin/env python3
"""
URLFETCH (RFC 4467) of a large message part, mailsrv (the real daemon)
against Dovecot (URLAUTH on) on the same mbox: GENURLAUTH, then URLFETCH of
the part read by a client in 1 MB chunks, the time a NOOP on another
session waits meanwhile, and mailsrv's peak resident memory (VmHWM) before
and after (the part is streamed from the file, never held whole).

    .venv/bin/python benchmarks/imap_urlfetch_bench.py [--mb 50]
"""

from __future__ import annotations

import argparse
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

from benchmarks.imap_binary_bench import hwm_mb  # noqa: E402
from benchmarks.imap_sort_bench import Client, session  # noqa: E402
from tests import dovecot_peer  # noqa: E402
from tests.e2e import PASSWORD, MailServer  # noqa: E402
from tests.test_imap_urlauth import UrlauthDovecot  # noqa: E402

USER = "bench@example.test"


def mbox_of(text: bytes) -> bytes:
    return (
        b"From bench@example.test Thu Jan  1 00:00:00 2026\n"
        b'Subject: big\nContent-Type: multipart/mixed; boundary="B"\n\n--B\n\nhello\n--B\n'
        b"Content-Type: text/plain\n\n" + text + b"\n--B--\n\n"
    )


def urlfetch(c: Client, url: bytes) -> tuple[float, bytes, int]:
    """URLFETCH read in 1 MB chunks: seconds, digest, literal size."""
    t = time.perf_counter()
    c.n += 1
    tag = b"u%d" % c.n
    c.sock.sendall(tag + b" URLFETCH " + url + b"\r\n")
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
    enc = user.replace("@", "%40").encode()
    t = time.perf_counter()
    made = c.cmd(
        b'GENURLAUTH "imap://%s@127.0.0.1/INBOX/;UID=1/;SECTION=2;URLAUTH=authuser" INTERNAL' % enc
    )
    out["gen"] = time.perf_counter() - t
    url = made[0].split(b" ", 2)[2].strip()
    if pid:
        out["hwm_before"] = hwm_mb(pid)
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
    out["fetch"], out["digest"], out["size"] = urlfetch(c, url)
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
    ap.add_argument("--mb", type=int, default=50, help="size of the part")
    args = ap.parse_args()
    line = os.urandom(38).hex().encode()
    text = b"\n".join([line] * (args.mb * 1024 * 1024 // 77))
    want = hashlib.sha256(text.replace(b"\n", b"\r\n")).digest()
    base = Path(tempfile.mkdtemp(prefix="urlfetch-bench-"))
    try:
        mbox = base / "folder.mbox"
        mbox.write_bytes(mbox_of(text))
        print(f"part {args.mb} MB, mbox {mbox.stat().st_size / 1e6:.0f} MB")
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
            dovecot = UrlauthDovecot()
            try:
                dovecot.start(mbox)
                rows["Dovecot"] = measure(
                    dovecot.port, dovecot_peer.USER, dovecot_peer.PASSWORD, None
                )
            finally:
                dovecot.stop()
        else:
            print(f"Dovecot not measured: {reason}")
        print("| server | GENURLAUTH | URLFETCH | NOOP max wait | peak RSS before/after | right |")
        print("|---|---|---|---|---|---|")
        for who, r in rows.items():
            rss = f"{r['hwm_before']:.0f}/{r['hwm_after']:.0f} MB" if "hwm_before" in r else "-"
            print(
                f"| {who} | {r['gen']:.3f} s | {r['fetch']:.2f} s | {r['noop_max']:.3f} s "
                f"| {rss} | {r['digest'] == want} |"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
