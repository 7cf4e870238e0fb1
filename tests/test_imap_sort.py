"""
The pure parts of SORT and THREAD: the RFC 5256 base subject, the sort keys
of a header, the sort program, the ESEARCH line, the threading algorithms
and the thread-list syntax (RFC 5256 4 examples), and the key cache.
"""

from __future__ import annotations

import pytest

from mailsrv.imap.basesubject import base_subject, casemap, decode_header
from mailsrv.imap.esearch import ReturnSyntaxError, esearch_line, parse_return
from mailsrv.imap.search import SearchError
from mailsrv.imap.sort import Entry, parse_program, sort_entries
from mailsrv.imap.sortfields import SortFieldCache, first_address, message_keys
from mailsrv.imap.thread import ordered_subject, references, thread_list

# (raw Subject, base subject, reply or forward) - RFC 5256 2.1 steps 1-6.
BASE_SUBJECTS = [
    (b"Hello", "Hello", False),
    (b"Re: Hello", "Hello", True),
    (b"RE: re: rE:Hello", "Hello", True),
    (b"Fw: Hello", "Hello", True),
    (b"FWD: Hello", "Hello", True),
    (b"Re[2]: Hello", "Hello", True),  # subj-refwd with a subj-blob before ":"
    (b"Re [list]: Hello", "Hello", True),
    (b"[list] Re: Hello", "Hello", True),  # *subj-blob subj-refwd
    (b"[list] Hello", "Hello", False),  # step 4: a leading blob goes
    (b"[a] [b] Hello", "Hello", False),
    (b"[PATCH]", "[PATCH]", False),  # step 4: not if nothing would be left
    (b"[a] [PATCH]", "[PATCH]", False),
    (b"Hello (fwd)", "Hello", True),  # step 2: subj-trailer
    (b"Hello (FWD) (fwd)  ", "Hello", True),
    (b"[fwd: Hello]", "Hello", True),  # step 6
    (b"[Fwd: Re: Hello (fwd)]", "Hello", True),
    (b"[fwd: [fwd: Hello]]", "Hello", True),
    (b"  Hello \t  world  ", "Hello world", False),  # step 1: white space
    (b"Hello\r\n world", "Hello world", False),  # a continuation
    (b"Re:", "", True),
    (b"", "", False),
    (b"Ready: set", "Ready: set", False),  # "re" must be followed by *WSP [blob] ":"
    (b"Fwdx: set", "Fwdx: set", False),
    (b"=?utf-8?q?Re=3A_caf=C3=A9?=", "café", True),  # step 1: RFC 2047 first
    (b"=?ISO-8859-1?Q?Re:_Caf=E9?= =?utf-8?b?IG9wZW4=?=", "Café open", True),
    (b"Re: =?utf-8?b?w5xiZXJ3ZWlzdW5n?=", "Überweisung", True),
    ("Re: Grüße".encode(), "Grüße", True),  # 8-bit UTF-8 as it is
]


@pytest.mark.parametrize("raw,base,reply", BASE_SUBJECTS)
def test_base_subject(raw, base, reply):
    assert base_subject(raw) == (base, reply)


def test_decode_header_joins_adjacent_words_and_keeps_bad_ones():
    # RFC 2047 6.2: white space between adjacent encoded-words is dropped;
    # a character split over two words of one charset stays whole.
    assert decode_header("=?utf-8?q?a?= =?utf-8?q?b?=") == "ab"
    assert decode_header("=?utf-8?q?=C3?= =?utf-8?q?=A9?=") == "é"
    assert decode_header("x =?utf-8?q?a?= y") == "x a y"
    assert decode_header("=?utf-8?b?!!!?=") == "=?utf-8?b?!!!?="
    assert decode_header("=?x-unknown?q?abc?=") == "abc"


def test_ascii_casemap_maps_only_ascii_letters():
    # RFC 4790 9.2: "_" sorts after the letters; non-ASCII octets stay as they are.
    assert casemap("abc_") == b"ABC_"
    assert casemap("é") == "é".encode()
    assert casemap("b") < casemap("_") < casemap("é")


@pytest.mark.parametrize(
    "raw,want",
    [
        (b"ann@a.test", ("", "ann", "a.test")),
        (b"Ann Smith <ann@a.test>", ("Ann Smith", "ann", "a.test")),
        (b'"Smith, Ann" <ann@a.test>, bob@b.test', ("Smith, Ann", "ann", "a.test")),
        (b"ann@a.test (Ann Comment)", ("Ann Comment", "ann", "a.test")),
        (b"<@route.test:ann@a.test>", ("", "ann", "a.test")),
        (b"=?utf-8?q?R=C3=A9mi?= <remi@e.test>", ("Rémi", "remi", "e.test")),
        (b"list: ann@a.test, bob@b.test;", ("", "list", "")),
        (b'"odd local"@x.test', ("", "odd local", "x.test")),
        (b"", ("", "", "")),
        (b"undisclosed-recipients:;", ("", "undisclosed-recipients", "")),
    ],
)
def test_first_address(raw, want):
    assert first_address(raw) == want


def test_message_keys():
    keys = message_keys(
        b"From: Ann <ann@a.test>\r\nTo: bob@b.test\r\nCc: Cat <cat@c.test>\r\n"
        b"Subject: Re: [x] hello\r\n world\r\nDate: Mon, 1 Jan 2024 10:00:00 +0200\r\n"
        b"Message-ID: <1@x.test>\r\nReferences: <a@x.test>\r\n <b@x.test>\r\n"
        b"In-Reply-To: <c@x.test>\r\nSubject: second subject\r\n\r\n"
    )
    assert keys.subject == b"HELLO WORLD" and keys.reply
    assert keys.sent == 1704096000.0  # 08:00 UTC
    assert (keys.from_mailbox, keys.from_display) == (b"ANN", b"ANN")
    assert (keys.to_mailbox, keys.to_display) == (b"BOB", b"BOB@B.TEST")
    assert keys.cc_mailbox == b"CAT"
    assert keys.message_id == b"1@x.test"
    assert keys.references == (b"a@x.test", b"b@x.test")
    # Without References, the first msg-id of In-Reply-To (RFC 5256 3, REFERENCES 1).
    keys = message_keys(b"In-Reply-To: <c@x> <d@x>\r\nDate: someday\r\n\r\n")
    assert keys.references == (b"c@x",) and keys.sent is None and keys.subject == b""


def test_parse_program():
    assert parse_program(b"(REVERSE date subject) UTF-8 ALL") == (
        [("DATE", True), ("SUBJECT", False)],
        b"UTF-8 ALL",
    )
    assert parse_program(b"(DISPLAYFROM) x")[0] == [("DISPLAYFROM", False)]
    for bad in (b"DATE UTF-8", b"()", b"(REVERSE)", b"(DATE", b"(REVERSE REVERSE DATE)", b"(X)"):
        with pytest.raises(SearchError):
            parse_program(bad)


def test_parse_return():
    assert parse_return(b"(DATE) UTF-8 ALL") == (None, b"(DATE) UTF-8 ALL")
    assert parse_return(b"RETURN (min COUNT) (DATE)") == (frozenset({"MIN", "COUNT"}), b" (DATE)")
    assert parse_return(b"RETURN () (DATE)")[0] == frozenset({"ALL"})  # RFC 4731 3.1
    for bad in (b"RETURN (PARTIAL 1:5) (DATE)", b"RETURN MIN (DATE)", b"RETURN (MIN"):
        with pytest.raises(ReturnSyntaxError):
            parse_return(bad)


def test_esearch_line():
    every = frozenset({"MIN", "MAX", "COUNT", "ALL"})
    # RFC 5267 3: MIN/MAX are the first and last in sort order; ALL keeps the order.
    assert (
        esearch_line(b"A1", True, every, [5, 3, 4, 9, 10, 11, 1])
        == b'ESEARCH (TAG "A1") UID MIN 5 MAX 1 ALL 5,3:4,9:11,1 COUNT 7'
    )
    assert esearch_line(b"A2", False, every, []) == b'ESEARCH (TAG "A2") COUNT 0'
    assert esearch_line(b"A3", False, frozenset({"MIN"}), []) == b'ESEARCH (TAG "A3")'


def _entry(seq: int, header: bytes, internal: float = 0.0, size: int = 100) -> Entry:
    return Entry(seq, seq * 10, size, internal, message_keys(header))


def _msg(mid: str, refs: str = "", subject: str = "s", hour: int = 0) -> bytes:
    head = f"Message-ID: <{mid}@x>\r\nSubject: {subject}\r\n"
    head += f"Date: Mon, 1 Jan 2024 {hour:02d}:00:00 +0000\r\n"
    if refs:
        head += "References: " + " ".join(f"<{r}@x>" for r in refs.split()) + "\r\n"
    return head.encode() + b"\r\n"


def test_sort_entries_ties_keep_mailbox_order_and_date_falls_back():
    entries = [
        _entry(1, b"Subject: b\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n", 5.0),
        _entry(2, b"Subject: a\r\nDate: bad\r\n\r\n", 1704103200.0),  # INTERNALDATE: 10:00
        _entry(3, b"Subject: Re: a\r\nDate: Mon, 1 Jan 2024 09:00:00 +0000\r\n\r\n", 9.0),
        _entry(4, b"Subject: b\r\n\r\n", 1.0),
    ]

    def seqs(program):
        return [e.seq for e in sort_entries(program, entries)]

    assert seqs([("SUBJECT", False)]) == [2, 3, 1, 4]
    assert seqs([("SUBJECT", True)]) == [1, 4, 2, 3]  # REVERSE: ties still in mailbox order
    assert seqs([("DATE", False)]) == [4, 3, 1, 2]
    assert seqs([("SUBJECT", False), ("REVERSE" and "DATE", True)]) == [2, 3, 1, 4]
    assert seqs([("ARRIVAL", False)]) == [4, 1, 3, 2]


def test_thread_list_syntax_rfc5256_example():
    # RFC 5256 4: "(2)(3 6 (4 23)(44 7 96))".
    msgs = {
        2: _msg("m2", hour=1),
        3: _msg("m3", hour=2),
        6: _msg("m6", "m3", hour=3),
        4: _msg("m4", "m3 m6", hour=4),
        23: _msg("m23", "m3 m6 m4", hour=5),
        44: _msg("m44", "m3 m6", hour=6),
        7: _msg("m7", "m3 m6 m44", hour=7),
        96: _msg("m96", "m3 m6 m44 m7", hour=8),
    }
    entries = [_entry(seq, head) for seq, head in sorted(msgs.items())]
    # distinct subjects, so that step 5 gathers nothing
    for e in entries:
        e.keys.subject = b"S%d" % e.seq
    roots = references(entries)
    assert thread_list(roots, lambda e: e.seq) == b"(2)(3 6 (4 23)(44 7 96))"


def test_references_dummy_parent_and_subject_gathering():
    # Two replies to a message not in the mailbox: "((3)(5))" (RFC 5256 4).
    entries = [
        _entry(3, _msg("a", "gone", "Re: x", 1)),
        _entry(5, _msg("b", "gone", "Re: x", 2)),
        _entry(7, _msg("c", "", "other", 0)),
    ]
    assert thread_list(references(entries), lambda e: e.seq) == b"(7)((3)(5))"
    # Step 5: a reply without references joins the thread of its base subject.
    entries = [
        _entry(1, _msg("a", "", "topic", 1)),
        _entry(2, _msg("b", "", "Re: topic", 2)),
        _entry(3, _msg("c", "", "topic", 3)),
    ]
    assert thread_list(references(entries), lambda e: e.seq) == b"((1 2)(3))"


def test_references_loops_duplicates_and_deep_chains():
    entries = [
        _entry(1, _msg("a", "b", "one", 1)),
        _entry(2, _msg("b", "a", "two", 2)),  # a loop: b is a's parent already
        _entry(3, _msg("a", "", "three", 3)),  # a duplicate Message-ID: a thread of its own
    ]
    assert thread_list(references(entries), lambda e: e.seq) == b"(2 1)(3)"
    chain = [_entry(1, _msg("m0", "", "deep", 0))]
    for i in range(1, 5000):  # no recursion: a chain deeper than Python's stack
        chain.append(_entry(i + 1, _msg(f"m{i}", f"m{i - 1}", "Re: deep", 0)))
    out = thread_list(references(chain), lambda e: e.seq)
    assert out == b"(" + b" ".join(b"%d" % i for i in range(1, 5001)) + b")"


def test_ordered_subject():
    entries = [
        _entry(1, _msg("a", "", "Re: b", 3)),
        _entry(2, _msg("b", "", "a", 2)),
        _entry(3, _msg("c", "", "b", 1)),
        _entry(4, _msg("d", "", "B", 4)),
        _entry(5, _msg("e", "", "a", 5)),
    ]
    assert thread_list(ordered_subject(entries), lambda e: e.seq) == b"(3 (1)(4))(2 5)"


def test_sort_field_cache_bounds_and_drops_stale_folders():
    cache = SortFieldCache(limit=5)
    keys = message_keys(b"Subject: x\r\n\r\n")
    cache.add("f1", {1: keys, 2: keys, 3: keys}, live=3)
    assert set(cache.folder("f1")) == {1, 2, 3} and len(cache) == 3
    cache.add("f2", {1: keys, 2: keys, 3: keys}, live=3)
    assert cache.folder("f1") == {} and len(cache) == 3  # f1 was used least recently
    cache.add("f2", {4: keys}, live=4)
    assert set(cache.folder("f2")) == {1, 2, 3, 4}
