"""
The ENVELOPE address parser (RFC 5322 3.4, RFC 3501 7.4.2): each expected
list is what Dovecot 2.3 answers for the same header value.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsrv.imap.envelope import Address, address_list, envelope, parse_addresses

CASES = [
    (b"a@b.test", b'((NIL NIL "a" "b.test"))'),
    (b'"Doe, John" <j@d.test>', b'(("Doe, John" NIL "j" "d.test"))'),
    (
        b'team: a@x.org, "B B" <b@y.org>;, solo@z.org',
        b'((NIL NIL "team" NIL)(NIL NIL "a" "x.org")("B B" NIL "b" "y.org")(NIL NIL NIL NIL)'
        b'(NIL NIL "solo" "z.org"))',
    ),
    (b"undisclosed-recipients:;", b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'),
    (
        b'"Quoted Group": a@b.org;, Empty:;',
        b'((NIL NIL "Quoted Group" NIL)(NIL NIL "a" "b.org")(NIL NIL NIL NIL)'
        b'(NIL NIL "Empty" NIL)(NIL NIL NIL NIL))',
    ),
    # A group inside a group is malformed: its name is a mailbox, the rest skipped.
    (
        b"g1: a@b.c, g2: d@e.f;",
        b'((NIL NIL "g1" NIL)(NIL NIL "a" "b.c")(NIL NIL "g2" "MISSING_DOMAIN")(NIL NIL NIL NIL))',
    ),
    (b"Ann <@r1.org,@r2.org:ann@example.org>", b'(("Ann" "@r1.org,@r2.org" "ann" "example.org"))'),
    (b"<@relay.net:bob@example.net>", b'((NIL "@relay.net" "bob" "example.net"))'),
    (b"<user-from (comment)@ (comment) domain.org>", b'((NIL NIL "user-from" "domain.org"))'),
    (
        b"x@y.org (Comment Name), (c1) y@z.org",
        b'(("Comment Name" NIL "x" "y.org")(NIL NIL "y" "z.org"))',
    ),
    (
        b'Foo Bar   Baz <a@b.c>, @, <>, "" <e@f>',
        b'(("Foo Bar Baz" NIL "a" "b.c")(NIL NIL "MISSING_MAILBOX" "MISSING_DOMAIN")'
        b'(NIL NIL "MISSING_MAILBOX" "MISSING_DOMAIN")(NIL NIL "e" "f"))',
    ),
    (
        b'"john doe"@example.org, nodomain, a@[127.0.0.1]',
        b'((NIL NIL "john doe" "example.org")(NIL NIL "nodomain" "MISSING_DOMAIN")'
        b'(NIL NIL "a" "[127.0.0.1]"))',
    ),
    (
        b"=?utf-8?q?J=C3=B6rg?= <j@example.org>",
        b'(("=?utf-8?q?J=C3=B6rg?=" NIL "j" "example.org"))',
    ),
    (
        b'"Joe \\"Q\\" Public" <joe@example.org>',
        b'(("Joe \\"Q\\" Public" NIL "joe" "example.org"))',
    ),
    (b"J\xc3\xb6rg <j@example.org>", b'(({5}\r\nJ\xc3\xb6rg NIL "j" "example.org"))'),
    # A stray ">" ends the list (it once made the reader loop for ever).
    (b"a@b>, c@d>", b'((NIL NIL "a" "b"))'),
    (b"", b"NIL"),
    (b" , ,", b"NIL"),
]


@pytest.mark.parametrize(("value", "expected"), CASES)
def test_address_lists_as_dovecot_gives_them(value, expected):
    assert address_list(value) == expected


def test_envelope_defaults_and_nils():
    assert envelope(b"Subject:\r\nSender: <>\r\n\r\n") == (
        b'(NIL "" NIL ((NIL NIL "MISSING_MAILBOX" "MISSING_DOMAIN")) NIL NIL NIL NIL NIL NIL)'
    )
    # Only the header counts; the first of a repeated field wins.
    assert envelope(b"From: a@b.c\r\nFrom: x@y.z\r\n\r\nTo: t@u.v\r\n") == (
        b'(NIL NIL ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) '
        b"NIL NIL NIL NIL NIL)"
    )


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(list('<>@,;:()"\\[]. \t') + ["a", "b.c", "=?x?q?y?="]),
            st.text(max_size=6),
        ),
        max_size=30,
    ).map("".join)
)
def test_any_text_gives_well_formed_addresses(text):
    addresses = parse_addresses(text)
    in_group = False
    for a in addresses:
        assert isinstance(a, Address)
        if a.host is None:  # a group marker: start (a name) or end (all NIL)
            if a.mailbox is None:
                assert in_group and a == Address(None, None, None, None)
                in_group = False
            else:
                assert not in_group and a.name is None and a.adl is None
                in_group = True
        else:
            assert a.mailbox and a.host
    assert not in_group
    address_list(text.encode("utf-8", "surrogatepass"))
