"""
NOTIFY's MessageNew FETCH (RFC 5465 5.2) pushed between commands or during
IDLE is one response: a command (or DONE) that comes while its literal is
still being sent is answered after it, never inside it (RFC 3501 7: a
response's literal is its octets only).
"""

from __future__ import annotations

import re

from twisted.internet import defer

from tests.imap_loopback_support import RawClient
from tests.test_imap_notify import NotifyCase

LINE = b"0123456789" * 7 + b"\n"
END = b")\r\nI OK IDLE terminated\r\n"
BIG = b"Subject: big\n\n" + LINE * (2 * 1024 * 1024 // len(LINE))  # 2 MB: sent over many turns


class DoneDuringPushedFetch(NotifyCase):
    @defer.inlineCallbacks
    def test_done_is_answered_after_the_pushed_literal(self):
        port = self.port_number

        def script():
            a = RawClient(port, rcvbuf=4096)
            try:
                a.login()
                a.cmd(b"S", b"SELECT INBOX")
                a.cmd(b"N", b"NOTIFY SET (selected (MessageNew (UID BODY.PEEK[]) MessageExpunge))")
                a.send(b"I IDLE\r\n")
                assert a.file.readline().startswith(b"+ "), "no continuation"
                self.deliver(data=BIG)
                while True:
                    line = a.file.readline()
                    assert line, "closed"
                    if line.startswith(b"* 1 FETCH"):
                        break
                a.send(b"DONE\r\n")  # while the literal is on its way
                size = int(re.search(rb"\{(\d+)\}\r\n$", line).group(1))
                literal = a.file.read(size)
                rest = a.file.read(len(END))
                return literal, rest, a.cmd(b"A", b"NOOP")
            finally:
                a.close()

        literal, rest, noop = yield self.in_thread(script)
        self.assertEqual(literal, BIG.replace(b"\n", b"\r\n"))
        self.assertEqual(rest, END)
        self.assertEqual(noop, [b"A OK NOOP completed\r\n"])
        self.assertEqual(self.failures, [])

    @defer.inlineCallbacks
    def test_command_is_answered_after_the_pushed_literal(self):
        port = self.port_number

        def script():
            a = RawClient(port, rcvbuf=4096)
            try:
                a.login()
                a.cmd(b"S", b"SELECT INBOX")
                a.cmd(b"N", b"NOTIFY SET (selected (MessageNew (UID BODY.PEEK[]) MessageExpunge))")
                self.deliver(data=BIG)
                while True:
                    line = a.file.readline()
                    assert line, "closed"
                    if line.startswith(b"* 1 FETCH"):
                        break
                a.send(b"C ID NIL\r\n")  # answered at once by the server, not a catch-up
                size = int(re.search(rb"\{(\d+)\}\r\n$", line).group(1))
                literal = a.file.read(size)
                return literal, a.read_until(b"C")
            finally:
                a.close()

        literal, rest = yield self.in_thread(script)
        self.assertEqual(literal, BIG.replace(b"\n", b"\r\n"))
        self.assertEqual(rest[0], b")\r\n")
        self.assertEqual(rest[-1], b"C OK ID completed\r\n")
        self.assertEqual(self.failures, [])
