"""IMAP URLs (RFC 5092) with URLAUTH's tail (RFC 4467): mailsrv.imap.imapurl."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsrv.imap import imapurl
from mailsrv.imap.imapurl import ImapUrl, InvalidURL, parse


def test_absolute_message_part_with_every_field():
    url = parse(
        "imap://fred;AUTH=*@Mail.Example.COM:1143/INBOX;UIDVALIDITY=785799047"
        "/;UID=113330/;SECTION=1.5.9/;PARTIAL=10.200"
    )
    assert url == ImapUrl(
        text=url.text,
        absolute=True,
        user="fred",
        auth="*",
        host="mail.example.com",
        port=1143,
        mailbox="INBOX",
        uidvalidity=785799047,
        uid=113330,
        section="1.5.9",
        partial=(10, 200),
    )
    assert url.is_message_part


def test_rfc5092_examples():
    # RFC 5092 8's examples.
    url = parse("imap://michael@example.org/INBOX")
    assert (url.user, url.host, url.mailbox, url.uid) == ("michael", "example.org", "INBOX", None)
    url = parse("imap://psicorp.example.org/~peter/%E6%97%A5%E6%9C%AC%E8%AA%9E/%E5%8F%B0%E5%8C%97")
    assert url.mailbox == "~peter/日本語/台北"
    assert url.mailbox_wire == b"~peter/&ZeVnLIqe-/&U,BTFw-"
    url = parse("imap://;AUTH=GSSAPI@minbari.example.org/gray-council/;uid=20/;section=1.2")
    assert (url.user, url.auth, url.mailbox, url.uid, url.section) == (
        None,
        "GSSAPI",
        "gray-council",
        20,
        "1.2",
    )
    url = parse("imap://;AUTH=*@minbari.example.org/gray%20council?SUBJECT%20shadows")
    assert (url.mailbox, url.search, url.is_message_part) == (
        "gray council",
        "SUBJECT shadows",
        False,
    )
    url = parse("imap://john;AUTH=*@minbari.example.org/babylon5/personel")
    assert (url.user, url.mailbox) == ("john", "babylon5/personel")
    url = parse("imap://minbari.example.org")
    assert (url.host, url.mailbox) == ("minbari.example.org", None)


def test_relative_forms():
    url = parse("/INBOX;UIDVALIDITY=785799047/;UID=113330;SECTION=1.5.9".replace(";SEC", "/;SEC"))
    assert (url.absolute, url.mailbox, url.uidvalidity, url.uid, url.section) == (
        False,
        "INBOX",
        785799047,
        113330,
        "1.5.9",
    )
    url = parse("/Drafts/;UID=7")
    assert (url.mailbox, url.uid, url.section) == ("Drafts", 7, None)
    url = parse(";UID=20/;SECTION=HEADER")
    assert (url.mailbox, url.uid, url.section) == (None, 20, "HEADER")
    url = parse(";SECTION=1.MIME/;PARTIAL=0")
    assert (url.uid, url.section, url.partial) == (None, "1.MIME", (0, None))
    assert parse(";PARTIAL=5.6").partial == (5, 6)
    url = parse("//fred@host/INBOX/;UID=1")
    assert (url.absolute, url.user, url.host, url.mailbox, url.uid) == (
        False,
        "fred",
        "host",
        "INBOX",
        1,
    )


def test_keywords_are_case_insensitive_and_values_kept():
    url = parse("IMAP://HOST/Sent;uidvalidity=3/;uid=4/;section=header.fields%20(TO%20FROM)")
    assert (url.mailbox, url.uidvalidity, url.uid, url.section) == (
        "Sent",
        3,
        4,
        "header.fields (TO FROM)",
    )


def test_mailbox_with_escaped_characters():
    url = parse("/a%3Bb%25c%20d/;UID=1")
    assert url.mailbox == "a;b%c d"
    assert parse("/&-x/;UID=1").mailbox_wire == b"&--x"  # "&" is itself in the URL


def test_resolved_against_the_selected_mailbox():
    assert parse(";UID=5").resolved("INBOX", 9) == ImapUrl(
        text=";UID=5", mailbox="INBOX", uidvalidity=9, uid=5
    )
    assert parse("Archive/;UID=1").resolved("Sent").mailbox == "Sent/Archive"
    assert parse("/Archive/;UID=1").resolved("Sent").mailbox == "Archive"
    assert parse(";UID=5").resolved(None).mailbox is None


def test_urlauth_tail():
    text = (
        "imap://joe@example.com/INBOX/;uid=20/;section=1.2;urlauth=submit+fred"
        ":internal:91354a473744909de610943775f92038"
    )
    url = parse(text)
    assert (url.uid, url.section, url.access) == (20, "1.2", "submit+fred")
    assert url.rump == "imap://joe@example.com/INBOX/;uid=20/;section=1.2;urlauth=submit+fred"
    assert (url.mechanism, url.token) == ("INTERNAL", "91354a473744909de610943775f92038")
    rump = parse(
        "imap://joe@example.com/INBOX/;uid=20;EXPIRE=2026-12-07T00:00:00.5+02:00;URLAUTH=anonymous"
    )
    assert rump.expire == datetime(
        2026, 12, 7, 0, 0, 0, 500000, tzinfo=timezone(timedelta(hours=2))
    )
    assert (rump.section, rump.access, rump.mechanism, rump.token) == (
        None,
        "anonymous",
        None,
        None,
    )
    assert rump.rump == rump.text
    assert parse("imap://h/INBOX/;UID=1;URLAUTH=user+a%40b").access == "user+a@b"
    assert parse("imap://h/INBOX/;UID=1;EXPIRE=2026-01-01T00:00:00Z;URLAUTH=authuser").expire == (
        datetime(2026, 1, 1, tzinfo=UTC)
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "imap://",
        "imap://@host/INBOX",
        "imap://host:0/INBOX",
        "imap://host:99999/INBOX",
        "imap://u;FOO=x@host/INBOX",
        "/INBOX/;UID=0",
        "/INBOX/;UID=",
        "/INBOX/;UID=4294967296",
        "/INBOX/;UID=x",
        "/INBOX;UIDVALIDITY=0/;UID=1",
        "/INBOX/;UID=1;SECTION=1",
        "/INBOX/;UID=1/;SECTION=",
        "/INBOX/;UID=1/;PARTIAL=1.0",
        "/INBOX/;UID=1/;PARTIAL=x",
        "/INBOX/;UID=1/;FOO=1",
        "/INBOX;FOO=1",
        "/;UID=1",
        "/IN BOX/;UID=1",
        "/INBOX%2/;UID=1",
        "/%FF/;UID=1",
        ";UID=1;URLAUTH=anonymous",  # iurlauth only after a mailbox (RFC 5092 11)
        "INBOX/;UID=1;URLAUTH=anonymous",
        "imap://h/INBOX/;UID=1;URLAUTH=nobody",
        "imap://h/INBOX/;UID=1;URLAUTH=submit+",
        "imap://h/INBOX/;UID=1;URLAUTH=anonymous:internal:abc",
        "imap://h/INBOX/;UID=1;URLAUTH=anonymous:internal",
        "imap://h/INBOX/;UID=1;EXPIRE=2026-13-01T00:00:00Z;URLAUTH=anonymous",
        "imap://h/INBOX/;UID=1;EXPIRE=yesterday;URLAUTH=anonymous",
        "imap://h/INBOX/;UID=1;EXPIRE=2026-01-01T00:00:00Z",
        "imap://h/INBOX;URLAUTH=anonymous",
        "/INBOX/;UID=1\x00",
        "/INBOX/;UID=1/;SECTION=1/;URLAUTH=anonymous",
    ],
)
def test_refused(text):
    with pytest.raises(InvalidURL):
        parse(text)


def test_absolute_only():
    with pytest.raises(InvalidURL, match="imap://"):
        parse("/INBOX/;UID=1", relative=False)
    assert parse("imap://h/INBOX/;UID=1", relative=False).uid == 1


def test_bytes_taken_as_ascii():
    assert parse(b"/INBOX/;UID=3").uid == 3
    with pytest.raises(InvalidURL):
        parse("/INB\xf6X/;UID=3".encode("latin-1"))


_NAME = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(name=_NAME, uid=st.integers(1, 2**32 - 1), section=st.sampled_from(["", "1.2", "TEXT"]))
def test_escaped_names_round_trip(name, uid, section):
    escaped = "".join(
        c
        if c.isascii() and (c.isalnum() or c in "-._")
        else "".join(f"%{b:02X}" for b in c.encode())
        for c in name
    )
    text = f"/{escaped}/;UID={uid}" + (f"/;SECTION={section}" if section else "")
    url = parse(text)
    assert (url.mailbox, url.uid, url.section or "") == (name, uid, section)


@given(st.text(max_size=60))
def test_parse_raises_only_invalid_url(text):
    try:
        parse(text)
    except InvalidURL:
        pass


def test_percent_decode():
    assert imapurl.percent_decode("a%20%e6%97%a5") == "a 日".encode()
