"""SMTPUTF8 in (RFC 6531): the ESMTP server's replies on a StringTransport, the in-memory store."""

from __future__ import annotations

import base64

from .test_smtp_helpers import PASSWORD, Session, make_context, read_inbox

JOSE = "jösé@example.test"


def mx(ctx=None) -> Session:
    s = Session(ctx or make_context())
    assert s.cmd("EHLO client.example")[-1].startswith("250 ")
    return s


def authed(ctx) -> Session:
    s = Session(ctx, submission=True, peer="127.0.0.1")
    s.cmd("EHLO client.example")
    token = base64.b64encode(f"\0alice@example.test\0{PASSWORD}".encode()).decode()
    assert s.codes(f"AUTH PLAIN {token}\r\n") == ["235 2.7.0"]
    return s


def test_ehlo_offers_smtputf8_and_helo_clients_cannot_use_it():
    s = mx()
    assert "250-SMTPUTF8" in s.cmd("EHLO c")
    h = Session(make_context())
    h.cmd("HELO c")
    # RFC 1869 6: parameters only after EHLO.
    assert h.codes("MAIL FROM:<a@remote.test> SMTPUTF8\r\n") == ["555 5.5.4"]


def test_utf8_sender_and_recipient_need_the_smtputf8_parameter():
    s = mx()
    # RFC 6531 3.7.4.1: 553 5.6.7 without SMTPUTF8.
    assert s.codes("MAIL FROM:<jösé@remote.test>\r\n".encode()) == ["553 5.6.7"]
    assert s.codes("MAIL FROM:<a@remote.test>\r\n") == ["250 2.1.0"]
    assert s.codes("RCPT TO:<jösé@example.test>\r\n".encode()) == ["553 5.6.7"]
    assert s.codes("RSET\r\nMAIL FROM:<jösé@remote.test> SMTPUTF8\r\n".encode()) == [
        "250 2.0.0",
        "250 2.1.0",
    ]
    # The parameter belongs to its transaction: RSET ends it.
    assert s.codes("RSET\r\nMAIL FROM:<a@remote.test>\r\n") == ["250 2.0.0", "250 2.1.0"]
    assert s.codes("RCPT TO:<jösé@example.test>\r\n".encode()) == ["553 5.6.7"]


def test_smtputf8_takes_no_value():
    assert mx().codes("MAIL FROM:<a@remote.test> SMTPUTF8=1\r\n") == ["501 5.5.4"]


def test_bytes_that_are_not_utf8_are_a_syntax_error_never_a_crash():
    s = mx()
    assert s.codes(b"MAIL FROM:<j\xf6s\xe9@remote.test> SMTPUTF8\r\n") == ["501 5.1.7"]
    assert s.codes(b"MAIL FROM:<j\xf6s\xe9@remote.test>\r\n") == ["501 5.1.7"]
    assert s.codes(b"MAIL FROM:<a@remote.test> SMTPUTF8\r\n") == ["250 2.1.0"]
    assert s.codes(b"RCPT TO:<\xff\xfe@example.test>\r\n") == ["501 5.1.3"]
    assert s.codes("RCPT TO:<a@bü_cher.example>\r\n".encode()) == ["501 5.1.3"]
    assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]  # the session goes on


def test_mail_to_a_utf8_local_user_is_stored_with_its_trace():
    ctx = make_context()
    ctx.passwords.users[JOSE] = PASSWORD
    s = mx(ctx)
    lines = s.send(
        "MAIL FROM:<ñandú@remote.test> SMTPUTF8\r\n"
        "RCPT TO:<jösé@example.test>\r\n"
        "DATA\r\n"
        "From: ñandú@remote.test\r\nSubject: héllo\r\n\r\nbody\r\n.\r\n".encode()
    )
    assert [line[:3] for line in lines] == ["250", "250", "354", "250"]
    [message] = read_inbox(ctx, JOSE)
    assert b"with UTF8SMTP id" in message  # RFC 6531 3.7.3
    assert "for <jösé@example.test>".encode() in message
    assert message.startswith("Return-Path: <ñandú@remote.test>\n".encode())
    assert "Subject: héllo".encode() in message


def test_a_u_label_domain_is_one_domain_with_its_a_label():
    ctx = make_context()
    s = mx(ctx)
    s.send(b"MAIL FROM:<a@remote.test> SMTPUTF8\r\n")
    # example.test written with full-width letters: the same domain under UTS-46.
    assert s.codes("RCPT TO:<alice@ｅｘａｍｐｌｅ.test>\r\n".encode()) == ["250 2.1.5"]


def test_relayed_mail_keeps_its_smtputf8_flag_and_a_label_domain_in_the_queue():
    ctx = make_context()
    s = authed(ctx)
    lines = s.send(
        "MAIL FROM:<alice@example.test> SMTPUTF8\r\n"
        "RCPT TO:<müller@bücher.example>\r\n"
        "RCPT TO:<bob@remote.test>\r\n"
        "DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
        "MAIL FROM:<alice@example.test>\r\n"
        "RCPT TO:<bob@remote.test>\r\n"
        "DATA\r\nSubject: y\r\n\r\nbody\r\n.\r\n".encode()
    )
    assert [line[:3] for line in lines].count("250") == 7
    queued = ctx.queue.queued
    assert [q[1] for q in queued] == [
        ["müller@xn--bcher-kva.example", "bob@remote.test"],
        ["bob@remote.test"],
    ]
    assert ctx.queue.smtputf8 == [True, False]
