"""
POP3 and IMAP never read message bytes on the reactor thread: the mbox store
on a real thread pool, real clients over loopback, and every read of an mbox
file through a session's read handle (L{FileHandle.pread}: what open_message,
read_headers and the streamed readers use) recorded with its thread.
"""

from __future__ import annotations

import poplib
import threading

from twisted.internet import defer

from mailsrv.pop3 import WHOLE_MESSAGE
from mailsrv.spool import BytesSource
from mailsrv.store.mbox.state import FileHandle
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER
from tests.test_pop3_loopback import MboxServer
from tests.test_pop3_support import ALICE, PASSWORD

SMALL = b"Subject: small %d\n\n" + b"a small body line\n" * 20
BIG = b"Subject: big\n\n" + (b"x" * 76 + b"\n") * (WHOLE_MESSAGE // 77 + 100)


class ReadThreads:
    """Records each read of message bytes from an mbox, and whether it ran on the reactor thread."""

    def __init__(self, case, reactor_thread: threading.Thread) -> None:
        self.reads = 0
        self.on_reactor: list[tuple[int, int]] = []
        real = FileHandle.pread

        def pread(handle: FileHandle, n: int, off: int) -> bytes:
            self.reads += 1
            if threading.current_thread() is reactor_thread:
                self.on_reactor.append((n, off))
            return real(handle, n, off)

        case.patch(FileHandle, "pread", pread)

    def check(self, case) -> None:
        case.assertGreater(self.reads, 0)  # the test did read messages
        case.assertEqual(self.on_reactor, [], "message bytes read on the reactor thread")


class POP3ReadsTest(MboxServer):
    @defer.inlineCallbacks
    def test_retr_and_top_read_off_the_reactor_thread(self):
        store = self.ctx.store
        for i in range(6):
            yield store.deliver(ALICE, BytesSource(SMALL % i), "s@remote.test")
        yield store.deliver(ALICE, BytesSource(BIG), "s@remote.test")
        reads = ReadThreads(self, threading.current_thread())
        port = self.port.getHost().port

        def client():
            p = poplib.POP3("127.0.0.1", port, timeout=30)
            p.user(ALICE)
            p.pass_(PASSWORD)
            top = p.top(2, 1)[1]
            bodies = [p.retr(i)[1] for i in range(1, 8)]  # read ahead, then the big one streamed
            p.quit()
            return top, bodies

        top, bodies = yield self.in_client(client)
        self.assertEqual(top, [b"Subject: small 1", b"", b"a small body line"])
        self.assertEqual(bodies[3], (SMALL % 3).rstrip(b"\n").split(b"\n"))
        self.assertEqual(b"\n".join(bodies[6]) + b"\n", BIG)
        reads.check(self)
        yield self.all_closed()


class IMAPReadsTest(LoopbackIMAPCase):
    @defer.inlineCallbacks
    def test_fetch_body_reads_off_the_reactor_thread(self):
        for i in range(3):
            yield self.store.deliver(USER, BytesSource(SMALL % i), "s@remote.test")
        yield self.store.deliver(USER, BytesSource(BIG), "s@remote.test")
        reads = ReadThreads(self, threading.current_thread())

        def client():
            c = RawClient(self.port_number)
            try:
                c.login()
                c.cmd(b"S", b"SELECT INBOX")
                return b"".join(c.cmd(b"F", b"FETCH 1:4 (BODY.PEEK[HEADER] BODY[])"))
            finally:
                c.close()

        out = yield self.in_thread(client)
        self.assertIn(b"F OK", out)
        self.assertIn((SMALL % 2).replace(b"\n", b"\r\n"), out)
        self.assertIn(BIG.replace(b"\n", b"\r\n"), out)
        reads.check(self)
        yield self.settle()
