"""The envelope parsers and the trace headers: pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsrv.smtp import received
from mailsrv.smtp.address import (
    AddressError,
    ArgumentError,
    DomainLiteralError,
    parse_mail_from,
    parse_mailbox,
    parse_params,
    parse_rcpt_to,
)

atext = st.sampled_from(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
)
atom = st.text(atext, min_size=1, max_size=10)
dot_string = st.lists(atom, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z").filter(lambda s: not s.isdigit())
domain = st.lists(label, min_size=1, max_size=4).map(".".join)


@given(dot_string, domain)
def test_valid_addresses_round_trip(local, dom):
    address = f"{local}@{dom}"
    assert parse_mailbox(address.encode()) == address
    assert parse_mail_from(f"FROM:<{address}>".encode()).address == address
    assert parse_rcpt_to(f"TO:<{address}>".encode(), "x.test").address == address


@given(st.binary(max_size=80))
def test_parsers_never_crash(data):
    for parse in (parse_mail_from, lambda b: parse_rcpt_to(b, "x.test")):
        try:
            arg = parse(b"FROM:" + data if parse is parse_mail_from else b"TO:" + data)
        except (AddressError, ArgumentError):
            continue
        assert "\r" not in arg.address and "\n" not in arg.address
        assert arg.address.isascii()


@given(st.binary(max_size=60))
def test_parsed_addresses_have_no_dangerous_characters(data):
    try:
        address = parse_mailbox(data)
    except AddressError:
        return
    local, _, dom = address.rpartition("@")
    assert local and dom
    assert not any(c in dom for c in "/\\[]<> ")
    assert all(32 < ord(c) < 127 for c in dom)


def test_domain_is_lowered_local_part_kept():
    assert parse_mailbox(b"Alice@EXAMPLE.Test") == "Alice@example.test"


@pytest.mark.parametrize(
    "path",
    [b"a@[1.2.3.4]", b"a@[IPv6:::1]"],
)
def test_domain_literals(path):
    with pytest.raises(DomainLiteralError):
        parse_mailbox(path)


@pytest.mark.parametrize(
    "path",
    [
        b"",
        b"a",
        b"@b",
        b"a@",
        b"a@b@c",
        b"a..b@c",
        b".a@c",
        b"a.@c",
        b"a b@c",
        b"a@-b.c",
        b"a@b-.c",
        b"a@b..c",
        b"a@1.2.3.4",
        b"\xc3\xa9@c",
        b"a@\xc3\xa9",
        b"a" * 65 + b"@c",
        b"a@" + b"b" * 64,
        b"a@b\x00c",
    ],
)
def test_bad_mailboxes(path):
    with pytest.raises(AddressError):
        parse_mailbox(path)


def test_quoted_local_part_and_source_route():
    assert parse_mailbox(b'"a b"@c.test') == '"a b"@c.test'
    assert parse_mail_from(b'FROM:<"a>b"@c.test> SIZE=5').address == '"a>b"@c.test'
    assert parse_mailbox(b"@r1.test,@r2.test:a@c.test") == "a@c.test"


def test_params():
    assert parse_params(b" SIZE=100  BODY=8BITMIME auth=<> x-flag") == {
        "SIZE": "100",
        "BODY": "8BITMIME",
        "AUTH": "<>",
        "X-FLAG": None,
    }
    for bad in (b"=1", b"SIZE=", b"S_IZE=1", b"SIZE=a=b", b"SIZE=1 size=2"):
        with pytest.raises(ArgumentError):
            parse_params(bad)


def test_mail_and_rcpt_arguments():
    assert parse_mail_from(b"from:<>").address == ""
    assert parse_mail_from(b"FROM: <a@b.test>").address == "a@b.test"
    assert parse_rcpt_to(b"TO:<postmaster>", "example.test").address == "postmaster@example.test"
    assert parse_rcpt_to(b"TO:<POSTMASTER>", "example.test").address == "postmaster@example.test"
    for bad in (b"FROM:<a@b.test>SIZE=1", b"TO:<a@b.test>", b"FROM:", b"FROM <a@b.test>"):
        with pytest.raises(ArgumentError):
            parse_mail_from(bad)
    with pytest.raises(AddressError):
        parse_rcpt_to(b"TO:<>", "example.test")


def test_received_header():
    h = received.received_header(
        helo="client(evil)\x01",
        client_ip="::1",
        client_name=None,
        hostname="mx.example.test",
        protocol="ESMTPSA",
        queue_id="ABC",
        recipient=None,
        tls_info="using TLSv1.3 with cipher X (256/256 bits)",
        now=86400.0,
    )
    assert h == (
        b"Received: from client?evil?? (unknown [IPv6:::1])\n"
        b"\t(using TLSv1.3 with cipher X (256/256 bits))\n"
        b"\tby mx.example.test (mailsrv) with ESMTPSA id ABC;\n"
        b"\tFri, 02 Jan 1970 00:00:00 +0000\n"
    )


def test_with_protocol():
    assert received.with_protocol(False, True, True) == "SMTP"
    assert received.with_protocol(True, False, False) == "ESMTP"
    assert received.with_protocol(True, True, False) == "ESMTPS"
    assert received.with_protocol(True, False, True) == "ESMTPA"
    assert received.with_protocol(True, True, True) == "ESMTPSA"


def test_queue_ids_are_distinct_and_fixed_length():
    ids = {received.new_queue_id(1_700_000_000.0) for _ in range(1000)}
    assert len(ids) == 1000
    assert {len(i) for i in ids} == {12}
