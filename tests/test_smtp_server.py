"""The ESMTP server's replies, on a StringTransport with the in-memory store."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.mail import smtp
from zope.interface.verify import verifyObject

from mailsrv.interfaces import IMessageSource
from mailsrv.localdelivery import ReturnPathSource
from mailsrv.smtp.delivery import (
    InboundDelivery,
    IncomingMessage,
    SubmissionDelivery,
)
from mailsrv.spool import BytesSource

from .test_smtp_helpers import PASSWORD, Session, make_context, read_inbox

ALICE = "alice@example.test"


def plain(user: str = ALICE, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def mx(**limits) -> Session:
    s = Session(make_context(**limits))
    assert s.cmd("EHLO client.example")[-1].startswith("250 ")
    return s


def submission(peer: str = "127.0.0.1", **kw) -> Session:
    s = Session(make_context(**kw.pop("limits", {})), submission=True, peer=peer, **kw)
    s.cmd("EHLO client.example")
    return s


def authed(**kw) -> Session:
    s = submission(**kw)
    assert s.cmd(f"AUTH PLAIN {plain()}") == ["235 2.7.0 Authentication successful"]
    return s


# --- the greeting and EHLO ---------------------------------------------------


def test_greeting_and_ehlo_on_the_mx():
    s = Session(make_context())
    assert s.greeting == ["220 mx.example.test ESMTP mailsrv"]
    lines = s.cmd("EHLO client.example")
    assert lines == [
        "250-mx.example.test Hello client.example",
        "250-PIPELINING",
        "250-SIZE 52428800",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250 ENHANCEDSTATUSCODES",
    ]


def test_ehlo_offers_starttls_when_the_transport_can():
    s = Session(make_context(), starttls=True)
    assert "250-STARTTLS" in s.cmd("EHLO c") or "250 STARTTLS" in s.cmd("EHLO c")


def test_ehlo_size_follows_the_config():
    s = Session(make_context(max_message_size=2048))
    assert "250-SIZE 2048" in s.cmd("EHLO c")


def test_helo_is_plain_smtp():
    s = Session(make_context())
    assert s.cmd("HELO client.example") == ["250 mx.example.test Hello client.example"]
    assert s.cmd("HELO") == ["501 5.5.4 HELO/EHLO requires a domain name"]


def test_mx_offers_no_auth_and_refuses_it():
    s = mx()
    assert s.cmd(f"AUTH PLAIN {plain()}") == ["503 5.5.1 Authentication not enabled"]


def test_submission_offers_auth_only_where_passwords_may_pass():
    far = Session(make_context(), submission=True, peer="192.0.2.7", starttls=True)
    lines = far.cmd("EHLO c")
    assert not any("AUTH" in line for line in lines)
    assert any("STARTTLS" in line for line in lines)
    assert far.cmd(f"AUTH PLAIN {plain()}") == [
        "538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    near = Session(make_context(), submission=True, peer="127.0.0.1")
    assert near.cmd("EHLO c")[-1] == "250 AUTH PLAIN LOGIN"
    tls = Session(make_context(), submission=True, peer="192.0.2.7", implicit_tls=True)
    lines = tls.cmd("EHLO c")
    assert lines[-1] == "250 AUTH PLAIN LOGIN"
    assert not any("STARTTLS" in line for line in lines)


def test_cleartext_never_refuses_auth_even_on_loopback():
    ctx = make_context()
    ctx = dataclasses.replace(ctx, config=_with_cleartext(ctx.config, "never"))
    s = Session(ctx, submission=True, peer="127.0.0.1")
    assert not any("AUTH" in line for line in s.cmd("EHLO c"))
    assert s.codes(f"AUTH PLAIN {plain()}\r\n") == ["538 5.7.11"]


def _with_cleartext(config, policy):
    from dataclasses import replace

    return replace(config, auth=replace(config.auth, cleartext=policy))


# --- sequence errors ------------------------------------------------------------


def test_commands_out_of_order():
    s = Session(make_context())
    assert s.codes("MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1"]
    s.cmd("EHLO c")
    assert s.codes("RCPT TO:<alice@example.test>\r\n") == ["503 5.5.1"]
    assert s.codes("DATA\r\n") == ["503 5.5.1"]
    assert s.codes("MAIL FROM:<a@b.test>\r\n") == ["250 2.1.0"]
    assert s.codes("MAIL FROM:<a@b.test>\r\n") == ["503 5.5.1"]
    assert s.codes("RCPT TO:<nobody@example.test>\r\n") == ["550 5.1.1"]
    assert s.codes("DATA\r\n") == ["554 5.5.1"]  # RFC 2920: no valid recipients
    assert s.codes("RSET\r\n") == ["250 2.0.0"]
    assert s.codes("RCPT TO:<alice@example.test>\r\n") == ["503 5.5.1"]


def test_simple_commands():
    s = mx()
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]
    assert s.codes("VRFY alice\r\n") == ["252 2.0.0"]
    assert s.codes("EXPN list\r\n") == ["502 5.5.1"]
    assert s.codes("HELP\r\n") == ["214 2.0.0"]
    assert s.codes("BDAT 10 LAST\r\n") == ["500 5.5.2"]
    assert s.codes("\xe9\xff\r\n") == ["500 5.5.2"]
    assert s.codes("QUIT\r\n") == ["221 2.0.0"]
    assert s.transport.disconnecting


# --- MAIL FROM parameters -----------------------------------------------------------


@pytest.mark.parametrize(
    "arg,code",
    [
        ("<a@remote.test>", "250 2.1.0"),
        ("<>", "250 2.1.0"),
        ("a@remote.test", "250 2.1.0"),
        (" <a@remote.test>", "250 2.1.0"),
        ("<a@remote.test> SIZE=1000", "250 2.1.0"),
        ("<a@remote.test> SIZE=52428801", "552 5.3.4"),
        ("<a@remote.test> SIZE=big", "501 5.5.4"),
        ("<a@remote.test> BODY=8BITMIME", "250 2.1.0"),
        ("<a@remote.test> BODY=7bit SIZE=10", "250 2.1.0"),
        ("<a@remote.test> BODY=BINARYMIME", "501 5.5.4"),
        ("<a@remote.test> SMTPUTF8", "250 2.1.0"),
        ("<a@remote.test> SMTPUTF8=yes", "501 5.5.4"),
        ("<a@remote.test> RET=HDRS", "555 5.5.4"),
        ("<a@remote.test> AUTH=<>", "555 5.5.4"),
        ("<a@remote.test> SIZE=1 SIZE=2", "501 5.5.4"),
        ("<a b@remote.test>", "501 5.1.7"),
        ("<a@@remote.test>", "501 5.1.7"),
        ("<a@remote..test>", "501 5.1.7"),
        ("<@relay.test:a@remote.test>", "250 2.1.0"),
        ("<a@remote.test", "501 5.5.4"),
        ("", "501 5.5.4"),
    ],
)
def test_mail_from(arg, code):
    s = mx()
    assert s.codes(f"MAIL FROM:{arg}\r\n") == [code]


def test_mail_parameters_need_ehlo():
    s = Session(make_context())
    s.cmd("HELO c")
    assert s.codes("MAIL FROM:<a@remote.test> SIZE=10\r\n") == ["555 5.5.4"]
    assert s.codes("MAIL FROM:<a@remote.test>\r\n") == ["250 2.1.0"]


# --- RCPT TO -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg,code",
    [
        ("<alice@example.test>", "250 2.1.5"),
        ("<alice@EXAMPLE.test>", "250 2.1.5"),
        ("<bob@other.test>", "550 5.1.1"),
        ("<nobody@example.test>", "550 5.1.1"),
        ("<someone@remote.test>", "554 5.7.1"),
        ("<alice@example.test.remote.test>", "554 5.7.1"),
        ("<alice%example.test@remote.test>", "554 5.7.1"),
        ("<alice@[127.0.0.1]>", "501 5.1.3"),
        ("<alice@127.0.0.1>", "501 5.1.3"),
        ("<alice@>", "501 5.1.3"),
        ("<@example.test>", "501 5.1.3"),
        ("<>", "501 5.1.3"),
        ('<"alice smith"@example.test>', "550 5.1.1"),
        ("<Postmaster>", "250 2.1.5"),
        ("<alice@example.test> NOTIFY=NEVER", "555 5.5.4"),
        ("alice@example.test", "250 2.1.5"),
        ("<alice@example.test", "501 5.5.4"),
    ],
)
def test_rcpt_to(arg, code):
    s = mx()
    s.cmd("MAIL FROM:<a@remote.test>")
    assert s.codes(f"RCPT TO:{arg}\r\n") == [code]


def test_recipient_limit():
    s = mx(max_recipients=2)
    s.cmd("MAIL FROM:<a@remote.test>")
    assert s.codes(
        "RCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
        "RCPT TO:<postmaster@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
    ) == ["250 2.1.5", "250 2.1.5", "452 4.5.3", "250 2.1.5"]


# --- DATA and delivery ------------------------------------------------------------


def test_message_is_stored_with_trace_headers():
    s = mx()
    lines = s.send(
        b"MAIL FROM:<sender@remote.test> BODY=8BITMIME\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        b"Subject: hello\r\n\r\n..leading dot\r\n\r\n8bit \xc3\xa9\xff\r\nFrom me\r\n.\r\n"
    )
    assert lines[:3] == [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    assert lines[3].startswith("250 2.0.0 Ok: queued as ")
    queue_id = lines[3].rsplit(" ", 1)[1]
    [msg] = read_inbox(s.ctx, ALICE)
    head, _, body = msg.partition(b"\n\n")
    assert body == b".leading dot\n\n8bit \xc3\xa9\xff\nFrom me\n"
    assert head.startswith(b"Return-Path: <sender@remote.test>\nReceived: from c")
    assert b"Received: from client.example (unknown [192.0.2.7])\n" in head
    assert f"\tby mx.example.test (mailsrv) with ESMTP id {queue_id}\n".encode() in head
    assert b"\tfor <alice@example.test>; Thu, 01 Jan 1970 00:00:00 +0000\n" in head
    assert head.endswith(b"\nSubject: hello")
    assert read_inbox(s.ctx, "bob@example.test") == []


def test_several_recipients_one_copy_each_and_no_for_clause():
    s = mx()
    lines = s.send(
        "MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
        "RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    )
    assert lines[-1].startswith("250 2.0.0")
    for user in (ALICE, "bob@example.test"):
        [msg] = read_inbox(s.ctx, user)
        assert msg.startswith(b"Return-Path: <>\n")
        assert b"\tfor <" not in msg
        assert msg.endswith(b"\n\nbody\n")


def test_headerless_message_gets_a_separator():
    s = mx()
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\njust text\r\n.\r\n")
    [msg] = read_inbox(s.ctx, ALICE)
    assert msg.endswith(b"; Thu, 01 Jan 1970 00:00:00 +0000\n\njust text\n")


def test_empty_message():
    s = mx()
    codes = s.codes("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n.\r\n")
    assert codes[-1] == "250 2.0.0"
    [msg] = read_inbox(s.ctx, ALICE)
    assert msg.endswith(b"+0000\n\n")


def test_data_with_argument():
    s = mx()
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert s.codes("DATA now\r\n") == ["501 5.5.4"]


def test_message_over_the_size_limit_is_refused_after_the_dot():
    s = mx(max_message_size=1024)
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    for _ in range(30):
        assert s.send(b"x" * 98 + b"\r\n") == []
    assert s.codes(".\r\n") == ["552 5.3.4"]
    assert read_inbox(s.ctx, ALICE) == []
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]
    assert s.proto._message is None


def test_long_command_line_gets_500_and_the_session_goes_on():
    s = mx()
    assert s.codes("NOOP " + "x" * 600 + "\r\n") == ["500 5.5.6"]
    assert s.codes("NOOP\r\n") == ["250 2.0.0"]
    # an endless line, in pieces: read and dropped, not buffered
    for _ in range(100):
        assert s.send(b"y" * 10000) == []
    assert len(s.proto._buffer) < 20000
    assert s.codes("\r\nNOOP\r\n") == ["500 5.5.6", "250 2.0.0"]


def test_long_text_line_is_stored_unchanged():
    s = mx()
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert s.send(b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\nmore\r\n") == []
    assert s.send(b"y" * 50000) == []
    assert s.codes("\r\n.\r\nNOOP\r\n") == ["250 2.0.0", "250 2.0.0"]
    [msg] = read_inbox(s.ctx, ALICE)
    assert msg.endswith(b"\n\n" + b"z" * 1200 + b"\nmore\n" + b"y" * 50000 + b"\n")


def test_endless_text_line_refuses_the_message_after_the_dot():
    s = mx()
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert s.send(b"Subject: x\r\n\r\n") == []
    for _ in range(30):
        assert s.send(b"z" * 50000) == []
    assert len(s.proto._buffer) < 2 * 1024 * 1024
    assert s.codes("\r\n.\r\nNOOP\r\n") == ["500 5.5.6", "250 2.0.0"]
    assert read_inbox(s.ctx, ALICE) == []


def test_998_octet_text_line_is_fine():
    s = mx()
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert s.codes(b"w" * 998 + b"\r\n.\r\n") == ["250 2.0.0"]
    [msg] = read_inbox(s.ctx, ALICE)
    assert msg.endswith(b"\n\n" + b"w" * 998 + b"\n")


def test_mail_loop_is_refused():
    s = mx(max_received_headers=3)
    hops = "".join(f"Received: from hop{i}\r\n\tby x; date\r\n" for i in range(4))
    codes = s.codes(
        "MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        + hops
        + "Subject: loop\r\n\r\nReceived: in the body is fine\r\n.\r\n"
    )
    assert codes[-1] == "554 5.4.6"
    assert read_inbox(s.ctx, ALICE) == []
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    hops = "".join(f"Received: from hop{i}\r\n" for i in range(3))
    assert s.codes(hops + "\r\nReceived: x\r\nReceived: y\r\n.\r\n") == ["250 2.0.0"]


class SlowStore:
    """A store whose deliveries wait until the test says so."""

    def __init__(self, inner):
        self.inner = inner
        self.pending: list[tuple[defer.Deferred, tuple]] = []

    def deliver(self, user, source, sender, folder="INBOX"):
        d = defer.Deferred()
        with source.open() as f:
            data = f.read()
        self.pending.append((d, (user, BytesSource(data), sender)))
        return d

    def release(self, fail=False):
        pending, self.pending = self.pending, []
        for d, args in pending:
            if fail:
                d.errback(OSError("disk on fire"))
            else:
                self.inner.deliver(*args)
                d.callback(None)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _slow_session(**kw) -> tuple[Session, SlowStore]:
    from mailsrv.store.memory import MemoryMailStore

    store = SlowStore(MemoryMailStore())
    s = Session(make_context(store=store, **kw))
    return s, store


def test_pipelined_transactions_get_replies_in_order_and_250_waits_for_the_store():
    s, store = _slow_session()
    lines = s.send(
        "EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
        "DATA\r\nSubject: one\r\n\r\n1\r\n.\r\n"
        "MAIL FROM:<b@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: two\r\n\r\n2\r\n.\r\n"
        "QUIT\r\n"
    )
    codes = [" ".join(line.split(" ", 2)[:2]) for line in lines if line[3:4] == " "]
    assert codes == ["250 ENHANCEDSTATUSCODES", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End"]
    assert len(store.pending) == 2
    assert not s.transport.disconnecting
    store.release()
    codes = s.codes(b"")
    assert codes == ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End"]
    store.release()
    assert s.codes(b"") == ["250 2.0.0", "221 2.0.0"]
    assert [m.endswith(b"\n\n1\n") for m in read_inbox(s.ctx, ALICE)] == [True, False]
    assert len(read_inbox(s.ctx, "bob@example.test")) == 1


def test_store_failure_is_451_and_the_session_goes_on():
    s, store = _slow_session()
    s.send("EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n")
    store.release(fail=True)
    assert s.codes(b"") == ["451 4.3.0"]
    assert s.codes("MAIL FROM:<a@r.test>\r\n") == ["250 2.1.0"]
    assert read_inbox(s.ctx, ALICE) == []


def test_client_gone_during_data_discards_the_message():
    s = mx()
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: x\r\n")
    message = s.proto._message
    assert message is not None
    s.close()
    assert message._source.size > 0 and message._source.open().read() == b""
    assert read_inbox(s.ctx, ALICE) == []


# --- errors and time ---------------------------------------------------------------


def test_garbage_gets_the_client_dropped_with_421():
    s = Session(make_context(max_errors=5))
    lines = s.send("garbage\r\n" * 4)
    assert lines == ["500 5.5.2 Syntax error, command unrecognized"] * 4
    assert not s.transport.disconnecting
    lines = s.send("garbage\r\n" * 3)
    assert lines == [
        "500 5.5.2 Syntax error, command unrecognized",
        "421 4.7.0 Too many errors, closing connection",
    ]
    assert s.transport.disconnecting


def test_http_request_is_dropped():
    s = Session(make_context())
    assert s.codes("GET / HTTP/1.1\r\nHost: x\r\n") == ["421 4.7.0"]
    assert s.transport.disconnecting


def test_idle_timeout():
    ctx = make_context(timeout=60)
    s = Session(ctx)
    ctx.reactor.advance(59)
    s.cmd("EHLO c")
    ctx.reactor.advance(59)
    assert not s.transport.disconnecting
    ctx.reactor.advance(2)
    assert s.take() == ["421 4.4.2 Timeout, closing connection"]
    assert s.transport.disconnecting


def test_no_timeout_while_the_store_works():
    s, store = _slow_session(timeout=60)
    s.send("EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n")
    s.ctx.reactor.advance(120)
    assert not s.transport.disconnecting
    store.release()
    assert s.codes(b"") == ["250 2.0.0"]
    s.ctx.reactor.advance(61)
    assert s.transport.disconnecting
    s.close()
    assert s.ctx.reactor.getDelayedCalls() == []


# --- STARTTLS -------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext_and_resets_the_session():
    s = Session(make_context(), starttls=True)
    s.cmd("EHLO c")
    lines = s.send("STARTTLS\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert lines == ["220 2.0.0 Ready to start TLS"]
    assert s.transport.tls_started is s.ctx.tls
    assert s.codes("MAIL FROM:<a@r.test>\r\n") == ["503 5.5.1"]  # EHLO again first
    lines = s.cmd("EHLO c")
    assert not any("STARTTLS" in line for line in lines)
    assert s.codes("STARTTLS\r\n") == ["503 5.5.1"]


def test_starttls_unavailable():
    s = mx()
    assert s.codes("STARTTLS\r\n") == ["454 4.7.0"]


# --- submission ----------------------------------------------------------------------


def test_submission_needs_auth_before_mail():
    s = submission()
    assert s.codes("MAIL FROM:<alice@example.test>\r\n") == ["530 5.7.0"]


def test_auth_plain_and_sender_must_be_the_user():
    s = authed()
    assert s.cmd("EHLO c")[-1] == "250 ENHANCEDSTATUSCODES"  # no second AUTH on offer
    assert s.codes(f"AUTH PLAIN {plain()}\r\n") == ["503 5.5.1"]
    assert s.codes("MAIL FROM:<bob@example.test>\r\n") == ["553 5.7.1"]
    assert s.codes("MAIL FROM:<>\r\n") == ["553 5.7.1"]
    assert s.codes("MAIL FROM:<alice@Example.TEST> AUTH=<>\r\n") == ["250 2.1.0"]
    s.cmd("RSET")
    assert s.codes("MAIL FROM:<Alice@example.test>\r\n") == ["250 2.1.0"]


def test_submission_delivers_locally_and_queues_remote_mail_with_date_and_message_id():
    s = authed()
    lines = s.send(
        "MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
        "RCPT TO:<carol@remote.test>\r\nRCPT TO:<dave@far.test>\r\nDATA\r\n"
        "From: Alice <alice@example.test>\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"
    )
    assert lines[-1].startswith("250 2.0.0 Ok: queued as")
    [msg] = read_inbox(s.ctx, "bob@example.test")
    assert msg.startswith(b"Return-Path: <alice@example.test>\nReceived: from c")
    assert b" with ESMTPA id " in msg
    head, _, body = msg.partition(b"\n\n")
    assert body == b"hello\n"
    assert b"\nDate: Thu, 01 Jan 1970 00:00:00 +0000\n" in head + b"\n"
    assert b"\nMessage-ID: <19700101000000." in head
    assert head.index(b"Subject: hi") < head.index(b"Date:")
    [(sender, rcpts, data)] = s.ctx.queue.queued
    assert sender == ALICE and rcpts == ["carol@remote.test", "dave@far.test"]
    assert not data.startswith(b"Return-Path")  # added at final delivery only
    assert data.startswith(b"Received: from c")
    assert data.endswith(b"\n\nhello\n")
    assert data.partition(b"\n\n")[0] == head.partition(b"\n")[2]


def test_submission_keeps_existing_date_and_message_id():
    s = authed()
    s.send(
        "MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-Id: <x@y>\r\n\r\nb\r\n.\r\n"
    )
    [msg] = read_inbox(s.ctx, "bob@example.test")
    assert msg.count(b"Date:") == 1 and msg.count(b"Message-I") == 1


def test_mx_never_adds_date_or_message_id():
    s = mx()
    s.send(
        "MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: x\r\n\r\nb\r\n.\r\n"
    )
    [msg] = read_inbox(s.ctx, ALICE)
    assert b"Date:" not in msg and b"Message-ID" not in msg


def test_submission_without_a_queue_refuses_remote_recipients():
    ctx = make_context(queue=None)
    s = Session(ctx, submission=True, peer="127.0.0.1")
    s.cmd("EHLO c")
    s.cmd(f"AUTH PLAIN {plain()}")
    s.cmd("MAIL FROM:<alice@example.test>")
    assert s.codes("RCPT TO:<carol@remote.test>\r\n") == ["451 4.3.0"]
    assert s.codes("RCPT TO:<nobody@example.test>\r\n") == ["550 5.1.1"]
    assert s.codes("RCPT TO:<bob@example.test>\r\n") == ["250 2.1.5"]


def test_queue_failure_is_451():
    s = authed()
    s.ctx.queue.fail = True
    codes = s.codes(
        "MAIL FROM:<alice@example.test>\r\nRCPT TO:<carol@remote.test>\r\nDATA\r\nx\r\n.\r\n"
    )
    assert codes[-1] == "451 4.3.0"


def test_auth_login_with_and_without_initial_response():
    s = submission()
    assert s.cmd("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert s.cmd(base64.b64encode(ALICE.encode())) == ["334 UGFzc3dvcmQ6"]
    assert s.cmd(base64.b64encode(PASSWORD.encode())) == ["235 2.7.0 Authentication successful"]
    s = submission()
    assert s.cmd(b"AUTH LOGIN " + base64.b64encode(ALICE.encode())) == ["334 UGFzc3dvcmQ6"]
    assert s.codes(base64.b64encode(PASSWORD.encode()) + b"\r\n") == ["235 2.7.0"]


def test_auth_plain_without_initial_response_and_abort():
    s = submission()
    assert s.cmd("AUTH PLAIN") == ["334 "]
    assert s.codes(plain() + "\r\n") == ["235 2.7.0"]
    s = submission()
    s.cmd("AUTH PLAIN")
    assert s.codes("*\r\n") == ["501 5.7.0"]
    assert s.codes("AUTH PLAIN !!!notbase64\r\n") == ["501 5.5.2"]
    assert s.codes("AUTH CRAM-MD5\r\n") == ["504 5.5.4"]
    assert s.codes("AUTH PLAIN " + base64.b64encode(b"only-one-part").decode() + "\r\n") == [
        "501 5.5.2"
    ]


def test_auth_during_a_transaction_or_before_ehlo():
    s = Session(make_context(), submission=True, peer="127.0.0.1")
    assert s.codes(f"AUTH PLAIN {plain()}\r\n") == ["503 5.5.1"]


def test_failed_auth_is_delayed_then_throttled():
    s = submission()
    ctx = s.ctx
    for _ in range(3):
        assert s.cmd(f"AUTH PLAIN {plain(password='wrong')}") == []  # the checker's delay
        ctx.reactor.advance(1.0)
        assert s.take() == ["535 5.7.8 Authentication credentials invalid"]
    # max_failures = 3: further attempts are refused without a check, even a right one
    assert s.codes(f"AUTH PLAIN {plain()}\r\n") == ["454 4.7.0"]
    other = Session(ctx, submission=True, peer="127.0.0.2")
    other.cmd("EHLO c")
    assert other.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]


def test_authzid_must_match():
    s = submission()
    token = base64.b64encode(f"bob@example.test\0{ALICE}\0{PASSWORD}".encode()).decode()
    # Refused like a wrong password (mailsrv.auth.sasl): after the failure delay.
    assert s.codes(f"AUTH PLAIN {token}\r\n") == []
    s.ctx.reactor.advance(1.0)
    assert s.take() == ["535 5.7.8 Authentication credentials invalid"]


def test_auth_with_unknown_user_gets_the_same_answer():
    s = submission()
    s.cmd(f"AUTH PLAIN {plain(user='nobody@example.test')}")
    s.ctx.reactor.advance(1.0)
    assert s.take() == ["535 5.7.8 Authentication credentials invalid"]


# --- seams -----------------------------------------------------------------------------


def test_interfaces():
    ctx = make_context()
    assert verifyObject(smtp.IMessageDelivery, InboundDelivery(ctx))
    assert verifyObject(smtp.IMessageDelivery, SubmissionDelivery(ctx, ALICE))
    msg = IncomingMessage(
        ctx, queue_id="X", sender="", recipients=[ALICE], trace=b"", submission=False, client="c"
    )
    assert verifyObject(smtp.IMessage, msg)
    assert verifyObject(IMessageSource, ReturnPathSource("a@r.test", BytesSource(b"b")))


def test_twisted_delivery_path_still_works():
    """validateTo's callable gives a message usable the way Twisted's SMTP uses it."""
    ctx = make_context()
    delivery = InboundDelivery(ctx)
    delivery.validateFrom((b"c", b"1.2.3.4"), "x@r.test")
    message = delivery.validateTo(ALICE)()
    for line in (b"Subject: t", b"", b"body"):
        message.lineReceived(line)
    done = []
    message.eomReceived().addCallback(done.append)
    assert done
    assert read_inbox(ctx, ALICE)[0].endswith(b"Subject: t\n\nbody\n")


def test_return_path_source_reads_across_the_join():
    src = ReturnPathSource("", BytesSource(b"x" * 100_000))
    assert src.size == 16 + 100_000
    with src.open() as f:
        assert f.read(20) == b"Return-Path: <>\nxxxx"
        assert len(f.read()) == 100_000 - 4


def test_return_path_source_replaces_one_at_the_top():
    src = ReturnPathSource("a@r.test", BytesSource(b"Return-Path: <old>\n\t<x>\nSubject: s\n\nb\n"))
    with src.open() as f:
        assert f.read() == b"Return-Path: <a@r.test>\nSubject: s\n\nb\n"


# --- DATA in any chunking ----------------------------------------------------------


_body_line = st.one_of(
    st.sampled_from([b"", b".", b"..", b".x", b"From x", b">From y", b"Subject: s", b" folded"]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)


@settings(max_examples=150, deadline=None)
@given(
    headers=st.lists(
        st.sampled_from([b"Subject: a", b"X-A: b", b"\tcont", b"Received: x"]), max_size=4
    ),
    body=st.lists(_body_line, max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=20),
)
def test_data_arrives_the_same_in_any_chunking(headers, body, cuts):
    s = mx()
    s.send("MAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    lines = [b"X-First: 1"] + headers + [b""] + body
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    wire += b".\r\nNOOP\r\n"
    replies_seen = []
    pos = 0
    for cut in cuts:
        replies_seen += s.send(wire[pos : pos + cut])
        pos += cut
    replies_seen += s.send(wire[pos:])
    assert [r[:9] for r in replies_seen] == ["250 2.0.0", "250 2.0.0"]
    [msg] = read_inbox(s.ctx, ALICE)
    stored = msg.partition(b" +0000\n")[2]  # after Return-Path and Received
    assert stored == b"".join(line + b"\n" for line in lines)


def test_reading_pauses_while_a_reply_is_pending_and_much_input_waits():
    s, store = _slow_session()
    s.send("EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n")
    assert s.transport.producerState == "producing"
    s.send(b"NOOP\r\n" * 20000)
    assert s.transport.producerState == "paused"
    store.release()
    assert s.transport.producerState == "producing"
    assert s.codes(b"") == ["250 2.0.0"] + ["250 2.0.0"] * 20000


def test_connection_lost_while_the_store_works_leaves_no_timer():
    s, store = _slow_session(timeout=60)
    s.send("EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n")
    s.close()
    store.release()
    assert s.ctx.reactor.getDelayedCalls() == []
    assert len(read_inbox(s.ctx, ALICE)) == 1  # received in full: delivered all the same


class PickyStore:
    """Stores for everyone but C{broken}."""

    def __init__(self, inner, broken):
        self.inner = inner
        self.broken = broken

    def deliver(self, user, source, sender, folder="INBOX"):
        if user == self.broken:
            return defer.fail(OSError("bad disk"))
        return self.inner.deliver(user, source, sender, folder)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_partial_local_failure_queues_the_rest_instead_of_a_451():
    from mailsrv.store.memory import MemoryMailStore

    s = Session(make_context(store=PickyStore(MemoryMailStore(), "bob@example.test")))
    codes = s.codes(
        "EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\n"
        "RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    )
    assert codes[-1] == "250 2.0.0"
    assert len(read_inbox(s.ctx, ALICE)) == 1
    [(sender, rcpts, data)] = s.ctx.queue.queued
    assert (sender, rcpts) == ("a@r.test", ["bob@example.test"])
    assert data.startswith(b"Received: ")  # the relayer's local delivery adds Return-Path


def test_partial_local_failure_without_a_queue_is_451():
    from mailsrv.store.memory import MemoryMailStore

    ctx = make_context(store=PickyStore(MemoryMailStore(), "bob@example.test"), queue=None)
    s = Session(ctx)
    codes = s.codes(
        "EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\n"
        "RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    )
    assert codes[-1] == "451 4.3.0"


def test_all_local_deliveries_failing_is_451_not_queued():
    from mailsrv.store.memory import MemoryMailStore

    s = Session(make_context(store=PickyStore(MemoryMailStore(), ALICE)))
    codes = s.codes(
        "EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n"
    )
    assert codes[-1] == "451 4.3.0"
    assert s.ctx.queue.queued == []


def test_rejections_are_logged_without_the_body():
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        s = mx(max_message_size=1024)
        s.send(
            "MAIL FROM:<a@r.test>\r\nRCPT TO:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
        )
        s.send("DATA\r\nSubject: secret-subject\r\n\r\n" + "secret-body\r\n" * 200 + ".\r\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) for e in seen)
    assert "reject recipient <x@remote.test> from 192.0.2.7: 554 5.7.1 Relay access denied" in text
    assert "reject message " in text and "552 5.3.4" in text
    assert "secret" not in text


def test_starttls_after_a_loopback_login_forgets_the_login():
    s = Session(make_context(), submission=True, peer="127.0.0.1", starttls=True)
    s.cmd("EHLO c")
    assert s.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]
    assert s.codes("STARTTLS\r\n") == ["220 2.0.0"]
    s.proto.startedTLS = True
    s.cmd("EHLO c")
    assert s.codes("MAIL FROM:<alice@example.test>\r\n") == ["530 5.7.0"]
    assert s.codes(f"AUTH PLAIN {plain()}\r\n") == ["235 2.7.0"]


def test_a_client_that_does_not_read_replies_stops_being_read():
    s = mx()
    assert s.transport.producer is s.proto
    s.proto.pauseProducing()  # what the transport does when its write buffer is full
    assert s.transport.producerState == "producing"
    assert s.send(b"NOOP\r\n" * 1000) == []
    assert s.transport.producerState == "producing"
    assert s.send(b"NOOP\r\n" * 20000) == []
    assert s.transport.producerState == "paused"  # 126 kB unread: stop reading
    s.proto.resumeProducing()
    assert s.transport.producerState == "producing"
    assert s.codes(b"") == ["250 2.0.0"] * 21000


def test_a_client_that_reads_nothing_is_aborted_at_the_timeout():
    ctx = make_context(timeout=60)
    s = Session(ctx)
    s.proto.pauseProducing()  # its replies pile up unread
    ctx.reactor.advance(61)
    assert s.take() == []
    assert s.transport.disconnecting


def test_after_421_a_stuck_client_is_aborted_at_the_timeout():
    ctx = make_context(timeout=60, max_errors=1)
    s = Session(ctx)
    assert s.codes("bad\r\n") == ["500 5.5.2", "421 4.7.0"]
    aborted = []
    s.transport.abortConnection = lambda: aborted.append(True)
    ctx.reactor.advance(61)
    assert aborted == [True]


def test_bare_cr_or_lf_in_a_header_or_body_line_is_refused():
    """RFC 5321 2.3.8, line by line (headers) and in bulk (body), in any chunking."""
    for data in (
        "Subject: x\nBcc: y\r\n\r\nbody\r\n",
        "Subject: x\r\n\r\nbody\rmore\r\n",
        "Subject: x\r\n\r\nbody\r\n\n.\r\n",
    ):
        s = Session(make_context())
        codes = s.codes(
            "EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
            + data
            + ".\r\nNOOP\r\n"
        )
        assert codes[-2:] == ["550 5.6.0", "250 2.0.0"], (data, codes)
        assert read_inbox(s.ctx, ALICE) == []


def test_a_spool_file_that_cannot_be_written_is_452_and_the_session_goes_on(monkeypatch):
    """A full disk at the spool's file (/dev/full: every write is ENOSPC)."""
    import mailsrv.spool

    monkeypatch.setattr(
        mailsrv.spool.tempfile, "TemporaryFile", lambda **kw: open("/dev/full", "w+b")
    )
    s = Session(make_context())
    body = ("y" * 78 + "\r\n") * 5000  # past SPILL_AT: written to a file
    codes = s.codes(
        "EHLO c\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        "Subject: big\r\n\r\n" + body + ".\r\nNOOP\r\n"
    )
    assert codes[-2:] == ["452 4.3.1", "250 2.0.0"]
    assert read_inbox(s.ctx, ALICE) == []
