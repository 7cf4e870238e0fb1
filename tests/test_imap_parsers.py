"""Properties of the IMAP parsers: MIME structure, FETCH and SEARCH syntax."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsrv.imap import mime
from mailsrv.imap.fetch import FetchSyntaxError, parse_fetch
from mailsrv.imap.search import BadCharset, SearchError, parse, tokenize

_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"--A",
                b"--A--",
                b"--B",
                b"--B--",
                b"",
                b"Content-Type: multipart/mixed; boundary=A",
                b'Content-Type: multipart/alternative; boundary="B"',
                b"Content-Type: message/rfc822",
                b"Content-Type: text/plain",
                b"Subject: x",
                b"From: a@b",
                b" folded",
                b"body text",
            ]
        ),
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=60,
)


def _walk(part):
    yield part
    for c in part.children:
        yield from _walk(c)
    if part.message is not None:
        yield from _walk(part.message)


@settings(max_examples=300, deadline=None)
@given(_lines)
def test_scan_never_fails_and_ranges_stay_inside(lines):
    data = b"".join(line + b"\r\n" for line in lines)
    root = mime.scan(io.BytesIO(data))
    assert root.body_end == len(data)
    for part in _walk(root):
        assert 0 <= part.header_start <= part.body_start <= part.body_end <= len(data)
        assert part.lines >= 0
    mime.body_structure(root, True)
    mime.body_structure(root, False)
    for path in ([], [1], [1, 1], [2], [2, 1], [3]):
        for text in ("", "MIME", "HEADER", "TEXT"):
            rng = mime.section_range(root, path, text)
            if rng is not None:
                assert 0 <= rng[0] <= rng[1] <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fetch_parser_raises_only_syntax_errors(line):
    try:
        parse_fetch(line)
    except FetchSyntaxError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_search_parser_raises_only_search_errors(line):
    try:
        parse(tokenize(line))
    except (SearchError, BadCharset):
        pass


def test_fetch_macros_and_sections():
    req = parse_fetch(b"FAST")
    assert req.simple == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"] and not req.needs_disk
    req = parse_fetch(b"(UID BODY.PEEK[1.2.MIME] BODY[HEADER.FIELDS (A B)]<5.10> RFC822)")
    names = [s.name for s in req.sections]
    assert names == [b"BODY[1.2.MIME]", b"BODY[HEADER.FIELDS (A B)]", b"RFC822"]
    assert req.sections[1].partial == (5, 10) and req.marks_seen
    for bad in (b"(FLAGS", b"BODY[0]", b"BODY[FOO]", b"NOPE", b"()"):
        with pytest.raises(FetchSyntaxError):
            parse_fetch(bad)


def test_envelope_address_shapes():
    env = mime.envelope(
        b'From: "Doe, John" <j@d.test>\r\nTo: a@b.test, Ann <ann@c.test>\r\n'
        b"Cc: undisclosed-recipients:;\r\nSubject: =?utf-8?q?x?=\r\n\r\n"
    )
    assert env == (
        b'(NIL "=?utf-8?q?x?=" (("Doe, John" NIL "j" "d.test")) (("Doe, John" NIL "j" "d.test")) '
        b'(("Doe, John" NIL "j" "d.test")) ((NIL NIL "a" "b.test")("Ann" NIL "ann" "c.test")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) NIL NIL NIL)'
    )


def test_search_number_list_in_pieces():
    from array import array

    from mailsrv.imap.responses import number_list as _number_list

    assert _number_list([]) == b""
    assert _number_list(array("q", [1, 22, 333, 4]), piece=2) == b" 1 22 333 4"
    assert _number_list(list(range(1, 6)), piece=3) == b" 1 2 3 4 5"


def test_search_nesting_limit():
    from mailsrv.imap.search import MAX_NESTING

    deepest = b"(" * (MAX_NESTING - 1) + b"ALL" + b")" * (MAX_NESTING - 1)
    assert parse(tokenize(deepest))[0] == "and"
    with pytest.raises(SearchError):
        parse(tokenize(b"(" + deepest + b")"))
    with pytest.raises(SearchError):
        parse(tokenize(b"NOT " * MAX_NESTING + b"ALL"))


def _reference_list_regex(pattern: str):
    """The plain translation of a LIST pattern to a regular expression (backtracking)."""
    import re

    out = []
    for c in pattern:
        out.append(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c))
    return re.compile("".join(out), re.S)


@settings(max_examples=400, deadline=None)
@given(
    pattern=st.text(alphabet="ab/*%", max_size=12),
    name=st.text(alphabet="ab/", max_size=12),
)
def test_list_pattern_agrees_with_reference(pattern, name):
    from mailsrv.imap.listmatch import ListPattern

    expected = _reference_list_regex(pattern).fullmatch(name) is not None
    assert ListPattern(pattern).match(name) == expected


def test_list_pattern_inbox_any_case_and_many_stars():
    from mailsrv.imap.listmatch import ListPattern

    assert ListPattern("inbox").match("INBOX")
    assert ListPattern("Inbox/%").match("INBOX/x")
    assert not ListPattern("inboxes").match("INBOX")
    assert not ListPattern("*" * 5000 + "b").match("a" * 500)
    assert ListPattern("%" * 50 + "*" + "%" * 50 + "b").match("a/" * 200 + "b")


def test_search_header_over_lines_without_a_field_name():
    from mailsrv.imap.search import Matcher
    from mailsrv.interfaces import MessageInfo

    block = b"Subject: hello\r\ngarbage without a colon\r\n: no name\r\n\r\n"
    info = MessageInfo(1, 100, frozenset(), 0.0)

    def search(program: bytes) -> bool:
        tree = parse(tokenize(program))
        m = Matcher(tree, 1, 1, set(), lambda raw, last: range(1, last + 1))
        return m.match(1, info, lambda: block, lambda: block)

    assert not search(b'HEADER "" garbage')
    assert not search(b'HEADER "" ""')
    assert search(b"HEADER Subject hello")
    assert not search(b"HEADER Subject nothere")


@pytest.mark.parametrize("key", [b"KEYWORD", b"UNKEYWORD", b"UID", b"LARGER", b"HEADER x"])
def test_search_key_argument_is_not_a_parenthesis(key):
    with pytest.raises(SearchError):
        parse(tokenize(key + b"( $Label1)"))


_SEARCH_WORDS = st.sampled_from(
    [b"(", b")", b"NOT", b"OR", b"ALL", b"KEYWORD", b"UNKEYWORD", b"UID", b"LARGER", b"SMALLER"]
    + [b"HEADER", b"SUBJECT", b"BODY", b"TEXT", b"FROM", b"SENTON", b"SINCE", b"SEEN", b"NEW"]
    + [b'""', b"x", b"Subject", b"1:*", b"*", b"2,4:3", b"0", b"1-Jan-2024", b"$L", b'"a b"']
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_SEARCH_WORDS, min_size=1, max_size=12))
def test_search_programs_parse_and_match_or_raise_search_errors(words):
    """Any program of search words either fails to parse with a SearchError or evaluates."""
    from mailsrv.imap.search import Matcher
    from mailsrv.interfaces import MessageInfo

    block = b"Subject: a b\r\nno colon here\r\n: empty name\r\nDate: bad\r\n\r\n"
    info = MessageInfo(3, 100, frozenset({"$L"}), 0.0)
    try:
        tree = parse(tokenize(b" ".join(words)))
    except SearchError:
        return

    def seqset(raw, last):
        if not isinstance(raw, bytes) or not raw[:1].isdigit() and raw != b"*":
            raise ValueError(raw)
        return range(1, last + 1)

    try:
        Matcher(tree, 5, 7, set(), seqset).match(2, info, lambda: block, lambda: block)
    except SearchError:
        pass
