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
    NonASCIIAddressError,
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
        assert arg.address.isascii() or arg.smtputf8  # UTF-8 only with SMTPUTF8


@given(st.binary(max_size=60))
def test_utf8_parsing_never_crashes_and_keeps_domains_ascii(data):
    try:
        address = parse_mailbox(data, utf8=True)
    except AddressError:
        return
    local, _, dom = address.rpartition("@")
    assert local and dom
    assert all(32 < ord(c) < 127 for c in dom)  # A-labels (RFC 5890)
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in local)


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


def test_utf8_local_parts_and_u_label_domains_with_smtputf8():
    # RFC 6531 3.3: UTF8-non-ascii in the local part, U-labels in the domain;
    # the domain comes back as lower-case A-labels, the local part as sent.
    arg = parse_mail_from("FROM:<Jösé@Bücher.example> SMTPUTF8".encode())
    assert arg.address == "Jösé@xn--bcher-kva.example"
    assert arg.smtputf8 and arg.needs_smtputf8
    assert parse_mailbox('"jö sé"@example.test'.encode(), utf8=True) == '"jö sé"@example.test'
    assert parse_mailbox("用户@例子.测试".encode(), utf8=True) == "用户@xn--fsqu00a.xn--0zwm56d"
    rcpt = parse_rcpt_to("TO:<a@bücher.example>".encode(), "x.test", utf8=True)
    assert rcpt.address == "a@xn--bcher-kva.example" and not rcpt.needs_smtputf8
    # Without SMTPUTF8 the same paths are refused as non-ASCII (RFC 6531 3.7.4.1).
    with pytest.raises(NonASCIIAddressError):
        parse_mail_from("FROM:<jösé@example.test>".encode())
    with pytest.raises(NonASCIIAddressError):
        parse_rcpt_to("TO:<a@bücher.example>".encode(), "x.test")


@pytest.mark.parametrize(
    "path",
    [
        b"j\xf6s\xe9@example.test",  # Latin-1, not UTF-8
        b"\xc3@example.test",  # a truncated sequence
        b"a@b\xc3\xbc_cher.example",  # not IDNA2008
        b"a@xn--b\xc3\xbc.example",
        "a\u0085b@example.test".encode(),  # a C1 control
        "a\u200bb@example.test".encode(),  # a format character
        "é".encode() * 33 + b"@example.test",  # 66 octets: RFC 5321 4.5.3.1.1 counts octets
        "a b@exämple.test".encode(),
    ],
)
def test_bad_utf8_mailboxes(path):
    with pytest.raises(AddressError) as e:
        parse_mailbox(path, utf8=True)
    assert not isinstance(e.value, NonASCIIAddressError)


def test_invalid_utf8_without_smtputf8_is_a_syntax_error():
    with pytest.raises(AddressError) as e:
        parse_mailbox(b"j\xf6s@example.test")
    assert not isinstance(e.value, NonASCIIAddressError)


def test_with_protocol():
    assert received.with_protocol(False, True, True) == "SMTP"
    # RFC 6531 3.7.3
    assert received.with_protocol(True, False, False, smtputf8=True) == "UTF8SMTP"
    assert received.with_protocol(True, True, True, smtputf8=True) == "UTF8SMTPSA"
    assert received.with_protocol(True, False, False) == "ESMTP"
    assert received.with_protocol(True, True, False) == "ESMTPS"
    assert received.with_protocol(True, False, True) == "ESMTPA"
    assert received.with_protocol(True, True, True) == "ESMTPSA"


def test_queue_ids_are_distinct_and_fixed_length():
    ids = {received.new_queue_id(1_700_000_000.0) for _ in range(1000)}
    assert len(ids) == 1000
    assert {len(i) for i in ids} == {20}


def test_an_ipv4_client_of_a_dual_stack_listener_is_shown_as_ipv4():
    # A listener on :: sees IPv4 clients as ::ffff:a.b.c.d; Received shows the IPv4 literal.
    assert received.address_literal("::ffff:192.0.2.7") == "[192.0.2.7]"
    assert received.address_literal("2001:db8::1") == "[IPv6:2001:db8::1]"
    assert received.address_literal("192.0.2.7") == "[192.0.2.7]"
