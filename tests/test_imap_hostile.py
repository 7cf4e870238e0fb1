"""
Hostile and malformed IMAP input over real loopback: every command gets a
plain answer (BAD or NO, never an internal error), and no client can stall
the server for the others.
"""

from __future__ import annotations

import time

from twisted.internet import defer

from tests.imap_loopback_support import LoopbackIMAPCase, RawClient


class SearchNestingTest(LoopbackIMAPCase):
    """RFC 3501 6.4.4: deeply nested or unbalanced search programs are a syntax error."""

    @defer.inlineCallbacks
    def test_deep_and_unbalanced_search_is_bad(self):
        port = self.port_number

        def client() -> dict[str, bytes]:
            c = RawClient(port)
            try:
                c.login()
                c.cmd(b"s", b"SELECT INBOX")
                out = {}
                programs = {
                    "nested": b"(" * 400 + b"ALL" + b")" * 400,
                    "unbalanced": b"(" * 20000,
                    "not-chain": b"NOT " * 5000 + b"ALL",
                    "or-chain": b"OR ALL " * 5000 + b"ALL",
                }
                for name, program in programs.items():
                    out[name] = c.cmd(b"t", b"SEARCH " + program)[-1]
                out["shallow"] = c.cmd(b"u", b"SEARCH " + b"(" * 20 + b"ALL" + b")" * 20)[-1]
                return out
            finally:
                c.close()

        out = yield self.in_thread(client)
        yield self.settle()
        for name in ("nested", "unbalanced", "not-chain", "or-chain"):
            self.assertTrue(out[name].startswith(b"t BAD "), (name, out[name]))
            self.assertNotIn(b"SERVERBUG", out[name])
        self.assertTrue(out["shallow"].startswith(b"u OK"), out["shallow"])
        self.assertEqual(self.failures, [])


class ListPatternTest(LoopbackIMAPCase):
    """RFC 3501 6.3.8: LIST wildcards cost the same however many there are."""

    @defer.inlineCallbacks
    def test_many_stars_answer_at_once_and_others_are_served(self):
        port = self.port_number
        long_name = b"a" * 40

        def client() -> dict[str, object]:
            c = RawClient(port)
            try:
                c.login()
                assert c.cmd(b"c", b"CREATE " + long_name)[-1].startswith(b"c OK")
                start = time.monotonic()
                # A regular expression backtracks C(40+9, 9) ways here before failing.
                c.send(b'l LIST "" "' + b"*" * 9 + b'b"\r\n')
                try:
                    other = RawClient(port, timeout=2)
                    greeting = other.greeting
                    other.close()
                except OSError as e:
                    greeting = repr(e).encode()
                greeting_after = time.monotonic() - start
                listed = c.read_until(b"l")
                list_after = time.monotonic() - start
                star = c.cmd(b"m", b'LIST "" "*' + long_name[-3:] + b'"')
                return {
                    "greeting": greeting,
                    "greeting_after": greeting_after,
                    "listed": listed,
                    "list_after": list_after,
                    "star": star,
                }
            finally:
                c.close()

        out = yield self.in_thread(client)
        yield self.settle()
        self.assertTrue(out["greeting"].startswith(b"* OK"), out["greeting"])
        self.assertLess(out["greeting_after"], 2.0)
        self.assertEqual(out["listed"], [b"l OK LIST completed\r\n"])
        self.assertLess(out["list_after"], 2.0)
        self.assertEqual(
            out["star"],
            [b'* LIST (\\HasNoChildren) "/" ' + long_name + b"\r\n", b"m OK LIST completed\r\n"],
        )
