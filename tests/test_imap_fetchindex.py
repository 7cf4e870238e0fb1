"""
FETCH of the items the index holds (UID, FLAGS, RFC822.SIZE, INTERNALDATE,
MODSEQ), formatted a batch at a time from the index's columns: byte for byte
the responses of the per-message formatters, and sent as the client reads
while other sessions are served.
"""

from __future__ import annotations

import itertools
import socket
import time

import pytest
from twisted.internet import defer, threads

from mailsrv.imap.account import RECENT
from mailsrv.imap.fetch import internal_date
from mailsrv.imap.fetchindex import INDEX_ITEMS, DateTexts, IndexFetch
from mailsrv.imap.fetchitems import MessageFetch, simple_formatters, simple_response
from mailsrv.imap.responses import flag_list
from mailsrv.interfaces import MessageInfo
from mailsrv.store.infos import InfoList
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER, Harness

FLAG_SETS = [
    frozenset(),
    frozenset({"\\Seen"}),
    frozenset({"\\Seen", "\\Flagged", "$Label1"}),
    frozenset({"\\Answered", "\\Draft", "\\Deleted", "\\Seen", "\\Flagged"}),
    frozenset({"Grüße", "$Junk"}),  # a keyword that is not ASCII (UTF8=ACCEPT)
]
DATES = [0.0, 1.9, 86399.5, 1_700_000_000.25, 951_782_400.0, 253402300799.0, 253402300800.0]


def infos(n: int) -> list[MessageInfo]:
    return [
        MessageInfo(
            uid=3 * i + 1,
            size=100 + i * 37,
            flags=FLAG_SETS[i % len(FLAG_SETS)],
            internal_date=DATES[i % len(DATES)] + i * 3607,
            modseq=10 + i * i,
        )
        for i in range(n)
    ]


def expected(view: list[MessageInfo], seqs, items, recent) -> bytes:
    """The responses as the per-message formatters write them."""
    fields = simple_formatters(items)
    out = []
    for seq in seqs:
        info = view[seq - 1]
        flags = sorted(info.flags) + ([RECENT] if info.uid in recent else [])
        out.append(simple_response(seq, MessageFetch(None, info, flag_list(flags)), fields))
    return b"".join(out)


ORDERS = [
    ["FLAGS"],
    ["UID", "FLAGS"],
    ["FLAGS", "UID"],
    ["UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    ["UID", "FLAGS", "MODSEQ"],
    ["MODSEQ", "RFC822.SIZE", "INTERNALDATE", "UID", "FLAGS"],
]


@pytest.mark.parametrize("items", ORDERS)
@pytest.mark.parametrize("columns", [False, True], ids=["list", "InfoList"])
def test_index_lines_are_those_of_the_per_message_formatters(items, columns):
    view = infos(40)
    held = InfoList.of(view) if columns else view
    recent = {view[i].uid for i in (0, 3, 4, 39)}
    fetch = IndexFetch(items)
    for seqs in (range(1, 41), range(5, 17), [1, 2, 9, 30, 40], range(40, 41)):
        for rec in (set(), recent):
            assert fetch.lines(held, seqs, rec) == expected(view, seqs, items, rec)


def test_every_order_of_every_index_item():
    view = infos(12)
    held = InfoList.of(view)
    for k in range(1, len(INDEX_ITEMS) + 1):
        for items in itertools.permutations(sorted(INDEX_ITEMS), k):
            got = IndexFetch(list(items)).lines(held, range(1, 13), {view[2].uid})
            assert got == expected(view, range(1, 13), list(items), {view[2].uid})


def test_dates_as_internal_date_writes_them():
    texts = DateTexts()
    for ts in DATES + [-0.5, -86400.0, 59.999, 1e12, 1_234_567_890.0]:
        assert texts.text(ts) == internal_date(ts), ts
        assert texts.text(ts) == internal_date(ts), ts  # from the day's cached start too


def test_a_fetch_of_many_messages_over_the_memory_store_is_every_line_in_order(tmp_path):
    h = Harness(tmp_path)
    for i in range(2100):  # past one batch of the command
        h.deliver(b"Subject: %d\n\nbody %d\n" % (i, i))
    h.store.open_folder(USER, "INBOX").result.change_flags([5, 2050], ("\\Flagged", "$Work"))
    c = h.connect()
    c.login()
    c.select()  # the messages are \Recent to this session
    view = h.store.open_folder(USER, "INBOX").result.messages()
    recent = {info.uid for info in view}
    for cmd, items in (
        (b"f UID FETCH 1:* (FLAGS)", ["UID", "FLAGS"]),
        (
            b"f FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE)",
            ["UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE"],
        ),
        (b"f FETCH 2000:2003,7 (FLAGS)", ["FLAGS"]),
    ):
        seqs = [7, 2000, 2001, 2002, 2003] if b"2000" in cmd else range(1, 2101)
        assert c.cmd(cmd) == expected(view, seqs, items, recent) + b"f OK FETCH completed\r\n"
    other = h.connect()
    other.login()
    assert other.cmd(b"e ENABLE CONDSTORE").endswith(b"e OK ENABLE completed\r\n")
    other.select()  # not recent to this one
    out = other.cmd(b"f UID FETCH 1:* (FLAGS MODSEQ)")
    assert out == expected(view, range(1, 2101), ["UID", "FLAGS", "MODSEQ"], set()) + (
        b"f OK FETCH completed\r\n"
    )


class IndexFetchLoopbackTest(LoopbackIMAPCase):
    """A FETCH of index items over a 6000-message mbox, on a real socket."""

    @defer.inlineCallbacks
    def test_sent_as_read_and_others_served_meanwhile(self):
        n = 6000
        inbox = self.config.mail_dir / "example.test" / "alice" / "INBOX"
        inbox.parent.mkdir(parents=True, exist_ok=True)
        inbox.write_bytes(
            b"".join(
                b"From a@example.test Sat Jan  1 00:00:00 2022\nSubject: %d\n\nbody %d\n\n" % (i, i)
                for i in range(n)
            )
        )
        port = self.port_number
        reactor = self.reactor

        def server_side(proto) -> tuple[bytes | None, bool]:
            return threads.blockingCallFromThread(
                reactor, lambda: defer.succeed((proto._busy, proto.transport.producerPaused))
            )

        def shrink_send_buffer(proto) -> None:
            proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)

        def client() -> dict[str, object]:
            a = RawClient(port, rcvbuf=16384)
            b = RawClient(port)
            try:
                a.login()
                b.login()
                b.cmd(b"s", b"SELECT INBOX")  # the messages are \\Recent to B
                b.cmd(b"t", b"STORE 2,5999 +FLAGS.SILENT (\\Flagged $Work)")
                a.cmd(b"s", b"SELECT INBOX")
                proto_a = self.protocols[0]
                threads.blockingCallFromThread(
                    reactor, lambda: defer.succeed(shrink_send_buffer(proto_a))
                )
                a.send(b"f UID FETCH 1:* (FLAGS)\r\n")  # and A does not read its answer yet
                deadline = time.monotonic() + 10
                while server_side(proto_a) != (b"f", True) and time.monotonic() < deadline:
                    time.sleep(0.01)
                waiting = server_side(proto_a)
                noop = b.cmd(b"n", b"NOOP")
                during = server_side(proto_a)
                return {
                    "waiting": waiting,
                    "noop": noop,
                    "during": during,
                    "got": a.read_until(b"f"),
                }
            finally:
                a.close()
                b.close()

        out = yield self.in_thread(client)
        yield self.settle()
        self.assertEqual(out["waiting"], (b"f", True))  # A's FETCH waits for A to read
        self.assertEqual(out["noop"], [b"n OK NOOP completed\r\n"])
        self.assertEqual(out["during"][0], b"f")  # B was served while A's FETCH was under way
        got = out["got"]
        self.assertEqual(got[-1], b"f OK FETCH completed\r\n")
        want = [b"* %d FETCH (UID %d FLAGS ())\r\n" % (i, i) for i in range(1, n + 1)]
        want[1] = b"* 2 FETCH (UID 2 FLAGS ($Work \\Flagged))\r\n"
        want[5998] = b"* 5999 FETCH (UID 5999 FLAGS ($Work \\Flagged))\r\n"
        self.assertEqual(got[:-1], want)
        self.assertEqual(self.failures, [])
