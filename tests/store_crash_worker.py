"""
A process that stores mail in a loop until it is killed (kill -9), for
tests/test_store_crash.py. Prints "ack <id>" once a delivery has fired (so it is
durable), "expunging <id> ..." before an expunge starts (a kill may leave those
messages there or not) and "expunged <id> ..." once it has fired.

    python -m tests.store_crash_worker ROOT MODE FIRST_ID SEED
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore

USER = "crash@example.test"


def body(i: int) -> bytes:
    """The message with id C{i}: a size from 100 bytes to ~1.5 MB, with lines to quote."""
    n = (i * 7919) % 20000 + 1
    lines = b"".join(b"msg %d line %d\nFrom here %d\n" % (i, k, k) for k in range(n))
    return b"Subject: m%d\nMessage-ID: <%d@crash>\n\n%s" % (i, i, lines)


class ManualPool:
    """A thread pool stand-in that runs work when told to, so deliveries batch up."""

    def __init__(self) -> None:
        self.work = []

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        self.work.append((on_result, func, args, kwargs))

    def run(self) -> None:
        from twisted.python.failure import Failure

        while self.work:
            on_result, func, args, kwargs = self.work.pop(0)
            try:
                r = func(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, r)


class Reactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def main() -> None:
    root, mode, first, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rnd = random.Random(seed)
    pool = ManualPool()
    store = MboxMailStore(root / "mail", root / "index", Reactor(), pool)
    out = sys.stdout
    i = first
    while True:
        ids = list(range(i, i + rnd.randint(1, 4)))
        i = ids[-1] + 1
        for mid in ids:
            d = store.deliver(USER, BytesSource(body(mid)), "s@x")
            d.addCallback(lambda _, mid=mid: (out.write(f"ack {mid}\n"), out.flush()))
        pool.run()
        if mode == "expunge":
            opened = []
            store.open_folder(USER, "INBOX").addCallback(opened.append)
            pool.run()
            folder = opened[0]
            gone = []
            for info in folder.messages():
                with folder.open_message(info.uid) as fh:
                    subject = fh.readline()
                mid = int(subject.split(b"m", 1)[1])
                if mid % 2 == 0 or rnd.random() < 0.3:
                    gone.append((info.uid, mid))
            out.write("expunging " + " ".join(str(m) for _, m in gone) + "\n")
            out.flush()
            d = folder.expunge([u for u, _ in gone])
            d.addCallback(
                lambda _, g=gone: (
                    out.write("expunged " + " ".join(str(m) for _, m in g) + "\n"),
                    out.flush(),
                )
            )
            pool.run()
            folder.close()


if __name__ == "__main__":
    main()
