"""
Hostile and malformed IMAP input over real loopback: every command gets a
plain answer (BAD or NO, never an internal error), and no client can stall
the server for the others.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, threads

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
            [b'* LIST (\\NoInferiors) "/" ' + long_name + b"\r\n", b"m OK LIST completed\r\n"],
        )


class BigListTest(LoopbackIMAPCase):
    """A big LIST is sent as its client reads, and meanwhile other clients are served."""

    @defer.inlineCallbacks
    def test_other_clients_served_during_big_list(self):
        home = self.config.mail_dir / "example.test" / "alice"
        stem = "a-folder-with-a-name-long-enough-that-two-thousand-of-them-fill-the-buffers-"
        stem += "x" * 60
        for i in range(2000):
            d = home / f"d{i // 100:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{stem}{i:04d}").touch()
        port = self.port_number
        reactor = self.reactor

        def server_side(proto) -> tuple[bytes | None, bool]:
            """The server's view of A: the command under way, and whether A's writes wait."""
            return threads.blockingCallFromThread(
                reactor, lambda: defer.succeed((proto._busy, proto.transport.producerPaused))
            )

        def shrink_send_buffer(proto) -> None:
            # Small kernel buffers: the response cannot all be queued while A does not read.
            proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)

        def client() -> dict[str, object]:
            a = RawClient(port, rcvbuf=16384)
            b = RawClient(port)
            try:
                a.login()
                b.login()
                proto_a = self.protocols[0]
                threads.blockingCallFromThread(
                    reactor, lambda: defer.succeed(shrink_send_buffer(proto_a))
                )
                a.send(b'l LIST "" "*"\r\n')  # and A does not read its answer yet
                deadline = time.monotonic() + 10
                while server_side(proto_a) != (b"l", True) and time.monotonic() < deadline:
                    time.sleep(0.01)
                waiting = server_side(proto_a)
                noop = b.cmd(b"n", b"NOOP")
                during = server_side(proto_a)
                listed = a.read_until(b"l")
                return {"waiting": waiting, "noop": noop, "during": during, "listed": listed}
            finally:
                a.close()
                b.close()

        out = yield self.in_thread(client)
        yield self.settle()
        self.assertEqual(out["waiting"], (b"l", True))  # A's LIST waits for A to read
        self.assertEqual(out["noop"], [b"n OK NOOP completed\r\n"])
        self.assertEqual(out["during"][0], b"l")  # B was served while A's LIST was under way
        listed = out["listed"]
        self.assertEqual(listed[-1], b"l OK LIST completed\r\n")
        self.assertIn(b'* LIST (\\NoInferiors) "/" d19/' + stem.encode() + b"1999\r\n", listed)
        self.assertIn(b'* LIST (\\Noselect \\HasChildren) "/" d07\r\n', listed)
        special = len(self.config.imap.special_folders)
        count = len([x for x in listed if x.startswith(b"* LIST")])
        self.assertEqual(count, 2000 + 20 + 1 + special)  # folders, directories, INBOX
        self.assertEqual(self.failures, [])


class InternalErrorInputsTest(LoopbackIMAPCase):
    """Inputs that reached an internal error: each now gets a plain BAD or NO."""

    @defer.inlineCallbacks
    def test_each_input_gets_a_plain_answer(self):
        port = self.port_number

        def client() -> dict[str, list[bytes]]:
            c = RawClient(port)
            try:
                c.login()
                out = {}
                c.cmd(b"c", b"CREATE Empty")
                c.cmd(b"s", b"SELECT Empty")
                out["store-star-empty"] = c.cmd(b"a", b"STORE * +FLAGS (\\Seen)")
                out["fetch-star-empty"] = c.cmd(b"b", b"FETCH * FLAGS")
                out["uid-fetch-empty"] = c.cmd(b"b2", b"UID FETCH 1:* FLAGS")
                for i in range(2):
                    c.send(b"p APPEND INBOX {12+}\r\nSubject: %d\r\n\r\n" % i)
                    c.read_until(b"p")
                c.cmd(b"s", b"SELECT INBOX")
                out["move-to-self"] = c.cmd(b"m", b"MOVE 1:* INBOX")
                out["fetch-after-move"] = c.cmd(b"f", b"FETCH * (UID FLAGS)")
                out["create-long"] = c.cmd(b"k", b"CREATE " + b"y" * 200)
                out["status-nesting"] = c.cmd(b"t", b"STATUS INBOX (MESSAGES (()")
                out["store-no-list"] = c.cmd(b"u", b"STORE 1 FLAGS")
                # a failed SELECT leaves no folder selected (RFC 3501 6.3.1)
                out["select-long"] = c.cmd(b"l", b"SELECT " + b"x" * 300)
                out["noop"] = c.cmd(b"n", b"NOOP")
                return out
            finally:
                c.close()

        out = yield self.in_thread(client)
        yield self.settle()
        self.assertEqual(out["store-star-empty"], [b"a BAD Invalid message sequence number\r\n"])
        self.assertEqual(out["fetch-star-empty"], [b"b BAD Invalid message sequence number\r\n"])
        self.assertEqual(out["uid-fetch-empty"], [b"b2 OK FETCH completed\r\n"])
        # RFC 6851 4.3: the copies the MOVE made are announced before it completes.
        self.assertIn(b"* 2 EXISTS\r\n", out["move-to-self"])
        self.assertEqual(out["move-to-self"][-1], b"m OK MOVE completed\r\n")
        self.assertEqual(
            out["fetch-after-move"],
            [b"* 2 FETCH (UID 4 FLAGS (\\Recent))\r\n", b"f OK FETCH completed\r\n"],
        )
        self.assertEqual(
            out["select-long"],
            [
                b"* OK [CLOSED] Previous mailbox closed.\r\n",
                b"l NO [CANNOT] Mailbox name is too long\r\n",
            ],
        )
        self.assertEqual(out["create-long"], [b"k NO [CANNOT] Mailbox name is too long\r\n"])
        self.assertFalse((self.config.mail_dir / "example.test" / "alice" / ("y" * 200)).exists())
        for key, tag in (("status-nesting", b"t"), ("store-no-list", b"u")):
            self.assertEqual(out[key], [tag + b" BAD Syntax error in arguments\r\n"])
        self.assertEqual(out["noop"], [b"n OK NOOP completed\r\n"])
        self.assertEqual(self.failures, [])


class UnderAMailboxTest(LoopbackIMAPCase):
    """A name below a mailbox (a file on disk), e.g. INBOX/x, names nothing that can exist."""

    @defer.inlineCallbacks
    def test_names_below_a_mailbox(self):
        port = self.port_number

        def client() -> dict[str, list[bytes]]:
            c = RawClient(port)
            try:
                c.login()
                out = {}
                c.cmd(b"c", b"CREATE Work")
                c.cmd(b"a", b"APPEND INBOX {1+}\r\nx")
                out["select"] = c.cmd(b"s", b"SELECT INBOX/x")
                out["status"] = c.cmd(b"t", b"STATUS Work/x (MESSAGES)")
                out["rename-inbox"] = c.cmd(b"r", b"RENAME INBOX Work/y/INBOX")
                c.cmd(b"s2", b"SELECT INBOX")
                out["copy"] = c.cmd(b"k", b"COPY 1 Work/x")
                out["move"] = c.cmd(b"m", b"MOVE 1 INBOX/x")
                out["append"] = c.cmd(b"p", b"APPEND Work/x {1+}\r\ny")
                return out
            finally:
                c.close()

        out = yield self.in_thread(client)
        yield self.settle()
        for key, answer in out.items():
            self.assertEqual(len(answer), 1, (key, answer))
            self.assertIn(b" NO ", answer[0], (key, answer))
            self.assertNotIn(b"SERVERBUG", answer[0], (key, answer))
        self.assertEqual(self.failures, [])
        home = self.config.mail_dir / "example.test" / "alice"
        self.assertTrue((home / "INBOX").is_file())
        self.assertEqual((home / "Work").read_bytes(), b"")


class ConcurrentSubscriptionsTest(LoopbackIMAPCase):
    """Two sessions of one user change subscriptions at once: each change is saved, none fails."""

    @defer.inlineCallbacks
    def test_two_sessions_subscribe_at_once(self):
        port = self.port_number

        def client() -> list[list[bytes]]:
            a, b = RawClient(port), RawClient(port)
            try:
                a.login()
                b.login()
                for c in (a, b):
                    c.send(b"".join(b"s%d SUBSCRIBE Box%d\r\n" % (i, i % 3) for i in range(40)))
                return [a.read_until(b"s39"), b.read_until(b"s39")]
            finally:
                a.close()
                b.close()

        answers = yield self.in_thread(client)
        yield self.settle()
        for lines in answers:
            self.assertEqual(len(lines), 40)
            self.assertTrue(all(b" OK SUBSCRIBE completed" in line for line in lines), lines)
        self.assertEqual(self.failures, [])
        subs = self.tmp / "imap" / "example.test" / "alice.subscriptions"
        self.assertIn("Box2\n", subs.read_text())
        # No temporary file left; the lock file beside it serialises the changes.
        self.assertEqual(
            sorted(p.name for p in subs.parent.iterdir()),
            ["alice.subscriptions", "alice.subscriptions.lock"],
        )


class SelectedFolderGoneTest(LoopbackIMAPCase):
    """The folder a session has selected is deleted or renamed by another session meanwhile."""

    @defer.inlineCallbacks
    def test_selected_folder_deleted_and_renamed_meanwhile(self):
        port = self.port_number

        def client() -> list[list[bytes]]:
            a, b = RawClient(port), RawClient(port)
            try:
                a.login()
                b.login()
                out = []
                for i in range(6):
                    name = b"Box%d" % i
                    b.cmd(b"c", b"CREATE " + name)
                    b.cmd(b"p", b"APPEND " + name + b" {1+}\r\nx")
                    a.cmd(b"s", b"SELECT " + name)
                    # The other session's change and this one's NOOP at the same moment.
                    change = b"DELETE " + name if i % 2 else b"RENAME " + name + b" Old" + name
                    b.send(b"d " + change + b"\r\n")
                    a.send(b"n NOOP\r\n")
                    b.read_until(b"d")
                    out.append(a.read_until(b"n"))
                    out.append(a.cmd(b"f", b"FETCH 1:* FLAGS"))
                return out
            finally:
                a.close()
                b.close()

        answers = yield self.in_thread(client)
        yield self.settle()
        for lines in answers:
            self.assertTrue(lines, answers)
            self.assertNotIn(b"SERVERBUG", b"".join(lines))
            self.assertNotIn(b"BYE", b"".join(lines))
        self.assertEqual(self.failures, [])
