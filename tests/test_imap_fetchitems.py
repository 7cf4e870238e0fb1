"""The FETCH item table: each item name a client may ask for has one formatter."""

from __future__ import annotations

import pytest

from mailsrv.imap import mime
from mailsrv.imap.fetch import STREAM_AT, FetchSyntaxError, Stream, parse_fetch
from mailsrv.imap.fetchitems import (
    FETCH_ITEMS,
    MessageFetch,
    formatters,
    message_response,
    prepare_batch,
    simple_formatters,
    simple_response,
)
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from tests.test_imap_harness import USER, Harness

MESSAGE = (
    b"From: Ann <ann@example.test>\nTo: bob@example.test\nSubject: Hi\n"
    b"Message-ID: <m1@example.test>\n\nhello\n"
)
ITEM_NAMES = [
    "UID",
    "FLAGS",
    "RFC822.SIZE",
    "INTERNALDATE",
    "ENVELOPE",
    "BODYSTRUCTURE",
    "BODY",
    "MODSEQ",
]


def folder_with(*messages: bytes):
    store = MemoryMailStore(clock=lambda: 1_700_000_000.0)
    for data in messages:
        assert store.deliver(USER, BytesSource(data), "s@example.test").called
    d = store.open_folder(USER, "INBOX")
    assert d.called
    return d.result


def test_every_item_name_the_parser_accepts_has_a_formatter():
    for name in ITEM_NAMES:
        assert parse_fetch(b"(" + name.encode() + b")").order == [name]
        assert callable(FETCH_ITEMS[name])
    for macro in (b"ALL", b"FAST", b"FULL"):
        for item in parse_fetch(macro).order:
            assert item in FETCH_ITEMS
    assert sorted(FETCH_ITEMS) == sorted(ITEM_NAMES)


def test_an_unknown_item_has_no_formatter_and_is_refused():
    with pytest.raises(FetchSyntaxError):
        parse_fetch(b"(UID BOGUS)")
    with pytest.raises(KeyError):
        simple_formatters(["BOGUS"])


def test_an_unknown_item_is_bad_over_the_protocol(tmp_path):
    h = Harness(tmp_path)
    h.deliver(MESSAGE)
    c = h.connect()
    c.login()
    c.select()
    assert c.cmd(b"f FETCH 1 (UID BOGUS)") == (
        b"f BAD Illegal syntax: Unknown fetch attribute BOGUS\r\n"
    )
    assert c.cmd(b"f UID FETCH 1 BOGUS").startswith(b"f BAD ")


def test_each_formatter_writes_its_field():
    folder = folder_with(MESSAGE)
    info = folder.messages()[0]
    with folder.open_message(info.uid) as f:
        root = mime.scan(f)
    m = MessageFetch(folder, info, b"(\\Seen)", None, root)
    assert FETCH_ITEMS["UID"](m) == b"UID 1"
    assert FETCH_ITEMS["FLAGS"](m) == b"FLAGS (\\Seen)"
    assert FETCH_ITEMS["RFC822.SIZE"](m) == b"RFC822.SIZE %d" % info.size
    assert FETCH_ITEMS["INTERNALDATE"](m) == b'INTERNALDATE "14-Nov-2023 22:13:20 +0000"'
    assert FETCH_ITEMS["ENVELOPE"](m) == b"ENVELOPE " + root.envelope
    assert m.new_envelope == root.envelope  # to be cached
    assert FETCH_ITEMS["BODYSTRUCTURE"](m) == b"BODYSTRUCTURE " + mime.body_structure(root, True)
    assert FETCH_ITEMS["BODY"](m) == b"BODY " + mime.body_structure(root, False)


def test_envelope_without_structure_reads_the_header_once():
    folder = folder_with(MESSAGE)
    info = folder.messages()[0]
    m = MessageFetch(folder, info, b"()")
    field = FETCH_ITEMS["ENVELOPE"](m)
    assert field == b"ENVELOPE " + mime.envelope(folder.read_headers(info.uid))
    assert m.header == folder.read_headers(info.uid)
    cached = MessageFetch(folder, info, b"()", envelope=b"(CACHED)")
    assert FETCH_ITEMS["ENVELOPE"](cached) == b"ENVELOPE (CACHED)"
    assert cached.new_envelope is None and cached.header is None


def test_simple_response_in_request_order():
    folder = folder_with(MESSAGE)
    info = folder.messages()[0]
    fields = simple_formatters(["FLAGS", "UID", "RFC822.SIZE"])
    out = simple_response(7, MessageFetch(None, info, b"(\\Recent)"), fields)
    assert out == b"* 7 FETCH (FLAGS (\\Recent) UID 1 RFC822.SIZE %d)\r\n" % info.size


def test_sections_are_literals_and_large_ones_streams():
    big = b"Subject: big\n\n" + b"x" * (STREAM_AT + 10) + b"\n"
    folder = folder_with(MESSAGE, big)
    small, large = folder.messages()
    req = parse_fetch(b"(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY[TEXT]<0.5>)")
    pieces = message_response(1, MessageFetch(folder, small, b"()"), formatters(req.order))
    assert pieces == [
        b"* 1 FETCH (UID 1 BODY[HEADER.FIELDS (SUBJECT)] {15}\r\nSubject: Hi\r\n\r\n"
        b" BODY[TEXT]<0> {5}\r\nhello)\r\n"
    ]
    req = parse_fetch(b"(BODY[] UID)")
    pieces = message_response(2, MessageFetch(folder, large, b"()"), formatters(req.order))
    assert pieces == [
        b"* 2 FETCH (BODY[] {%d}\r\n" % large.size,
        Stream(large.uid, 0, large.size),
        b" UID 2)\r\n",
    ]


def test_prepare_batch_marks_a_vanished_message_and_returns_what_to_cache():
    folder = folder_with(MESSAGE)
    info = folder.messages()[0]
    gone = type(info)(uid=99, flags=frozenset(), size=10, internal_date=0.0)
    job = [(1, info, b"()", None, None), (2, gone, b"()", None, None)]
    out = prepare_batch(folder, job, ["ENVELOPE", "BODYSTRUCTURE"], True)
    pieces, new_env, new_root = out[0]
    assert new_env == new_root.envelope
    assert pieces[0].startswith(b"* 1 FETCH (ENVELOPE (")
    assert out[1] is None
