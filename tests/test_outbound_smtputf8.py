"""SMTPUTF8 out (RFC 6531): the relay client's session on a StringTransport, and its DSNs."""

from __future__ import annotations

import io

from twisted.internet.testing import MemoryReactorClock, StringTransport

from mailsrv.outbound import client
from mailsrv.outbound.client import Session
from mailsrv.outbound.dsn import FAILED, build_dsn
from mailsrv.outbound.envelope import Envelope, Recipient
from mailsrv.outbound.mx import Hop
from mailsrv.outbound.smtputf8 import header_has_utf8

HOP = Hop("mx.remote.test", "192.0.2.1", 25)


def _session(sender, recipients, utf8_header=False):
    s = Session(
        reactor=MemoryReactorClock(),
        pool=None,
        hop=HOP,
        helo="mail.example.test",
        sender=sender,
        recipients=list(recipients),
        message=io.BytesIO(b"Subject: x\n\nhello\n"),
        utf8_header=utf8_header,
    )
    results = []
    s.result.addCallback(results.append)
    p = s.buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    return p, t, results


def _feed(p, t, *lines):
    for line in lines:
        p.dataReceived(line + b"\r\n")
    out = t.value()
    t.clear()
    return out


def test_a_server_offering_smtputf8_gets_it_and_the_utf8_paths():
    p, t, results = _session("jösé@example.test", ["müller@bücher.example"])
    _feed(p, t, b"220 hi")
    sent = _feed(p, t, b"250-mx.remote.test", b"250 SMTPUTF8")
    assert sent == "MAIL FROM:<jösé@example.test> SMTPUTF8\r\n".encode()
    assert _feed(p, t, b"250 ok") == "RCPT TO:<müller@bücher.example>\r\n".encode()
    assert _feed(p, t, b"250 ok") == b"DATA\r\n"
    _feed(p, t, b"354 go")
    _feed(p, t, b"250 2.0.0 queued")
    assert results[0].replies["müller@bücher.example"].accepted


def test_pipelined_with_smtputf8():
    p, t, results = _session("a@example.test", ["jösé@r.test", "b@r.test"])
    _feed(p, t, b"220 hi")
    sent = _feed(p, t, b"250-mx.remote.test", b"250-PIPELINING", b"250 SMTPUTF8")
    assert sent == (
        "MAIL FROM:<a@example.test> SMTPUTF8\r\nRCPT TO:<jösé@r.test>\r\n"
        "RCPT TO:<b@r.test>\r\nDATA\r\n".encode()
    )


def test_a_server_without_smtputf8_fails_the_utf8_recipients_permanently():
    p, t, results = _session("jösé@example.test", ["a@r.test", "b@r.test"])
    _feed(p, t, b"220 hi")
    # Nothing is sent but QUIT: the sender's local part needs SMTPUTF8.
    assert _feed(p, t, b"250-mx.remote.test", b"250 8BITMIME") == b"QUIT\r\n"
    (r,) = results
    assert not r.before_transaction  # no other MX is tried: a bounce now
    for addr in ("a@r.test", "b@r.test"):
        reply = r.replies[addr]
        assert reply.permanent and reply.status == "5.6.7"  # RFC 6531 3.7.4.1
        assert "the next hop mx.remote.test does not support SMTPUTF8" in reply.text


def test_only_the_utf8_recipients_fail_and_the_others_go_in_ascii():
    p, t, results = _session("a@example.test", ["jösé@r.test", "b@bücher.example"])
    _feed(p, t, b"220 hi")
    assert _feed(p, t, b"250 mx.remote.test") == b"MAIL FROM:<a@example.test>\r\n"
    # RFC 6531 3.2: a U-label domain goes as its A-labels without SMTPUTF8.
    assert _feed(p, t, b"250 ok") == b"RCPT TO:<b@xn--bcher-kva.example>\r\n"
    assert _feed(p, t, b"250 ok") == b"DATA\r\n"
    _feed(p, t, b"354 go")
    _feed(p, t, b"250 2.0.0 queued")
    (r,) = results
    assert r.replies["jösé@r.test"].status == "5.6.7" and r.replies["jösé@r.test"].permanent
    assert r.replies["b@bücher.example"].accepted


def test_a_utf8_header_needs_smtputf8_too():
    p, t, results = _session("a@example.test", ["b@r.test"], utf8_header=True)
    _feed(p, t, b"220 hi")
    assert _feed(p, t, b"250 mx.remote.test") == b"QUIT\r\n"
    reply = results[0].replies["b@r.test"]
    assert reply.permanent and reply.status == "5.6.9"
    assert "UTF-8 header" in reply.text


def test_an_ascii_message_flagged_smtputf8_goes_without_it_where_not_offered():
    p, t, results = _session("a@example.test", ["b@r.test"])
    _feed(p, t, b"220 hi")
    assert _feed(p, t, b"250 mx.remote.test") == b"MAIL FROM:<a@example.test>\r\n"


def test_our_own_permanent_reasons():
    assert client.RemoteReply(0, "5.6.7 no").permanent
    assert not client.RemoteReply(0, "4.4.2 later").permanent


def test_a_dsn_naming_a_utf8_address_is_a_global_one():
    # RFC 6533: message/global-delivery-status, the utf-8 address type, UTF-8 fields.
    env = Envelope("0A", "jösé@example.test", [Recipient("müller@r.test", status="5.6.7")], 1, 1)
    raw = build_dsn(
        hostname="h",
        envelope=env,
        recipients=env.recipients,
        action=FAILED,
        original_headers=b"Subject: x\n",
        now=1,
    )
    assert "To: jösé@example.test\n".encode() in raw
    assert b'report-type="global-delivery-status"' in raw
    assert b"Content-Type: message/global-delivery-status\n" in raw
    assert "Final-Recipient: utf-8; müller@r.test\nAction: failed\nStatus: 5.6.7\n".encode() in raw
    assert b"=?utf-8?" not in raw  # no RFC 2047 encoded-word in an address
    ascii_env = Envelope("0B", "a@example.test", [Recipient("b@r.test", status="5.1.1")], 1, 1)
    raw = build_dsn(
        hostname="h",
        envelope=ascii_env,
        recipients=ascii_env.recipients,
        action=FAILED,
        original_headers=b"Subject: x\n",
        now=1,
    )
    assert b"Content-Type: message/delivery-status\n" in raw
    assert b"Final-Recipient: rfc822; b@r.test\n" in raw


def test_header_has_utf8_reads_the_header_only_and_rewinds():
    f = io.BytesIO(b"XXSubject: plain\n\nbody \xc3\xa9\n")
    assert not header_has_utf8(f, 2) and f.tell() == 2
    assert header_has_utf8(io.BytesIO("Subject: é\n\nbody\n".encode()), 0)
    assert not header_has_utf8(io.BytesIO(b"Subject: x\r\n\r\n\xc3\xa9"), 0)
    assert header_has_utf8(io.BytesIO("Subject: é".encode()), 0)  # no body at all
