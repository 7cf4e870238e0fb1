"""
Hostile and malformed IMAP input over real loopback: every command gets a
plain answer (BAD or NO, never an internal error), and no client can stall
the server for the others.
"""

from __future__ import annotations

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
