"""The SMTP client session on a StringTransport: bytes sent, per-recipient results."""

from __future__ import annotations

import io

from twisted.internet import defer, protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailsrv.outbound import body as body_module
from mailsrv.outbound import client
from mailsrv.outbound.client import RemoteReply, Session, _BodySender
from mailsrv.outbound.connections import ConnectionCache
from mailsrv.outbound.mx import Hop

HOP = Hop("mx.remote.test", "192.0.2.1", 25)


def _session(message=b"Subject: x\n\nhello\n.dot\n", recipients=("a@r.test", "b@r.test")):
    reactor = MemoryReactorClock()
    s = Session(
        reactor=reactor,
        pool=None,
        hop=HOP,
        helo="mail.example.test",
        sender="alice@example.test",
        recipients=list(recipients),
        message=io.BytesIO(message),
    )
    results = []
    s.result.addCallback(results.append)
    p = s.buildProtocol(None)
    t = StringTransport()
    p.makeConnection(t)
    return s, p, t, results


def _feed(p, t, *lines):
    for line in lines:
        p.dataReceived(line + b"\r\n")
    out = t.value()
    t.clear()
    return out


def test_transform_dot_stuffs_across_chunks():
    sender = _BodySender(None, None, None, None, lambda: None)
    chunks = [b".first\nsecond\n", b".third\n.", b"\n", b"x\n.", b"..\n"]
    out = b"".join(sender.transform(c) for c in chunks)
    assert out == b"..first\r\nsecond\r\n..third\r\n..\r\nx\r\n....\r\n"


def test_transaction_with_mixed_recipient_replies(monkeypatch):
    monkeypatch.setattr(body_module, "BODY_CHUNK", 7)  # many chunks, boundaries inside lines
    s, p, t, results = _session(recipients=("a@r.test", "b@r.test", "c@r.test"))
    assert _feed(p, t, b"220 mx.remote.test ESMTP") == b"EHLO mail.example.test\r\n"
    assert (
        _feed(p, t, b"250-mx.remote.test", b"250 8BITMIME") == b"MAIL FROM:<alice@example.test>\r\n"
    )
    assert _feed(p, t, b"250 2.1.0 ok") == b"RCPT TO:<a@r.test>\r\n"
    assert _feed(p, t, b"250 2.1.5 ok") == b"RCPT TO:<b@r.test>\r\n"
    assert _feed(p, t, b"550 5.1.1 no such user") == b"RCPT TO:<c@r.test>\r\n"
    assert _feed(p, t, b"451 4.3.0 try later") == b"DATA\r\n"
    body = _feed(p, t, b"354 go ahead")
    assert body == b"Subject: x\r\n\r\nhello\r\n..dot\r\n.\r\n"
    assert _feed(p, t, b"250 2.0.0 queued as X") == b"QUIT\r\n"
    (r,) = results
    assert r.stage == client.DONE
    assert r.replies["a@r.test"] == RemoteReply(250, "2.0.0 queued as X", "end of DATA")
    assert r.replies["b@r.test"].status == "5.1.1" and r.replies["b@r.test"].permanent
    assert str(r.replies["c@r.test"]) == "451 4.3.0 try later"
    assert not r.replies["c@r.test"].permanent and not r.replies["c@r.test"].accepted


def test_null_sender_and_all_recipients_refused():
    s, p, t, results = _session(recipients=("a@r.test",))
    s.sender = ""
    _feed(p, t, b"220 hi")
    assert _feed(p, t, b"250 hi") == b"MAIL FROM:<>\r\n"
    _feed(p, t, b"250 ok")
    assert _feed(p, t, b"550 5.7.1 go away") == b"QUIT\r\n"
    assert results[0].replies["a@r.test"] == RemoteReply(550, "5.7.1 go away", "RCPT TO")


def test_greeting_refused_means_try_the_next_host():
    s, p, t, results = _session()
    _feed(p, t, b"554 5.7.1 no service")
    (r,) = results
    assert r.before_transaction
    assert r.replies["a@r.test"].code == 554


def test_mail_from_refused_applies_to_every_recipient():
    s, p, t, results = _session()
    _feed(p, t, b"220 hi", b"250 hi")
    _feed(p, t, b"553 5.7.1 sender refused")
    (r,) = results
    assert not r.before_transaction
    assert {str(x) for x in r.replies.values()} == {"553 5.7.1 sender refused"}


def test_connection_lost_mid_data_is_temporary():
    s, p, t, results = _session()
    _feed(p, t, b"220 hi", b"250 hi", b"250 ok", b"250 ok", b"250 ok")
    _feed(p, t, b"354 go")
    p.connectionLost(Failure(ConnectionError("reset")))
    (r,) = results
    reply = r.replies["a@r.test"]
    assert reply.code == 0 and reply.status == "4.4.2"
    assert "lost connection with mx.remote.test while sending end of DATA" in reply.text


def test_ehlo_refused_falls_back_to_helo():
    s, p, t, results = _session()
    _feed(p, t, b"220 hi")
    assert _feed(p, t, b"502 what") == b"HELO mail.example.test\r\n"
    assert _feed(p, t, b"250 hi") == b"MAIL FROM:<alice@example.test>\r\n"


def test_tls_required_but_not_offered():
    s, p, t, results = _session()
    p.requireTransportSecurity = True
    p.heloFallback = False
    _feed(p, t, b"220 hi")
    _feed(p, t, b"250-hi", b"250 PIPELINING")
    (r,) = results
    assert r.before_transaction
    assert r.replies["a@r.test"].status == "4.7.4"


def test_timeout_is_temporary():
    s, p, t, results = _session()
    s.reactor.advance(client.COMMAND_TIMEOUT + 1)
    (r,) = results
    assert r.replies["a@r.test"].status == "4.4.2"


def test_failed_starttls_is_marked_for_a_plain_text_retry():
    s, p, t, results = _session()
    s.tls_context = p.context = object()  # offered and wanted, but this transport cannot do TLS
    _feed(p, t, b"220 hi")
    assert _feed(p, t, b"250-hi", b"250 STARTTLS") == b"STARTTLS\r\n"
    _feed(p, t, b"220 go ahead")
    (r,) = results
    assert r.tls_failed and r.before_transaction
    assert not r.replies["a@r.test"].permanent


def test_connection_kept_for_the_next_message_then_closed_when_idle():
    cache = ConnectionCache(idle_time=2.0)
    s, p, t, results = _session(recipients=("a@r.test",))
    s.cache, p.cache = cache, cache
    cache.key_for(p, "k")
    t.connected = True
    _feed(p, t, b"220 hi", b"250 hi", b"250 ok", b"250 ok", b"354 go")
    assert _feed(p, t, b"250 2.0.0 queued") == b""  # kept open, nothing sent
    assert results[0].replies["a@r.test"].accepted
    assert cache.take("other") is None
    kept = cache.take("k")
    assert kept is p

    second = Session(
        reactor=s.reactor,
        pool=None,
        hop=HOP,
        helo="mail.example.test",
        sender="bob@example.test",
        recipients=["c@r.test"],
        message=io.BytesIO(b"\n"),
        cache=cache,
        cache_key="k",
    )
    got = []
    second.run_on(kept).addCallback(got.append)
    assert t.value() == b"MAIL FROM:<bob@example.test>\r\n"
    t.clear()
    # The server had closed it meanwhile: a stale connection, to retry on a new one.
    p.connectionLost(Failure(ConnectionError("reset")))
    assert got[0].stale_connection

    s3, p3, t3, _ = _session(recipients=("a@r.test",))
    s3.cache, p3.cache = cache, cache
    cache.key_for(p3, "k")
    _feed(p3, t3, b"220 hi", b"250 hi", b"250 ok", b"250 ok", b"354 go", b"250 ok")
    s3.reactor.advance(2.0)
    assert t3.value() == b"QUIT\r\n"  # idle too long
    assert cache.take("k") is None


def test_a_reply_while_idle_gives_the_connection_up():
    cache = ConnectionCache(idle_time=2.0)
    s, p, t, results = _session(recipients=("a@r.test",))
    s.cache, p.cache = cache, cache
    cache.key_for(p, "k")
    t.connected = True
    _feed(p, t, b"220 hi", b"250 hi", b"250 ok", b"250 ok", b"354 go", b"250 ok")
    assert _feed(p, t, b"421 4.4.2 idle timeout") == b"QUIT\r\n"
    assert cache.take("k") is None
    assert p._idle_call is None  # the idle timer is gone too


def _pipelined_session(recipients=("a@r.test", "b@r.test", "c@r.test")):
    s, p, t, results = _session(recipients=recipients)
    _feed(p, t, b"220 mx.remote.test ESMTP")
    sent = _feed(p, t, b"250-mx.remote.test", b"250-PIPELINING", b"250 8BITMIME")
    return s, p, t, results, sent


def test_pipelining_sends_mail_rcpt_data_in_one_write():
    s, p, t, results, sent = _pipelined_session()
    assert sent == (
        b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<a@r.test>\r\n"
        b"RCPT TO:<b@r.test>\r\nRCPT TO:<c@r.test>\r\nDATA\r\n"
    )
    body = _feed(
        p,
        t,
        b"250 2.1.0 ok",
        b"250 2.1.5 ok",
        b"550 5.1.1 no such user",
        b"451 4.3.0 try later",
        b"354 go ahead",
    )
    assert body == b"Subject: x\r\n\r\nhello\r\n..dot\r\n.\r\n"
    assert _feed(p, t, b"250 2.0.0 queued as X") == b"QUIT\r\n"
    (r,) = results
    assert r.stage == client.DONE
    assert r.replies["a@r.test"] == RemoteReply(250, "2.0.0 queued as X", "end of DATA")
    assert r.replies["b@r.test"] == RemoteReply(550, "5.1.1 no such user", "RCPT TO")
    assert r.replies["c@r.test"] == RemoteReply(451, "4.3.0 try later", "RCPT TO")


def test_pipelining_mail_refused_is_every_recipients_reply():
    s, p, t, results, sent = _pipelined_session(recipients=("a@r.test", "b@r.test"))
    out = _feed(
        p,
        t,
        b"553 5.7.1 sender refused",
        b"503 5.5.1 need MAIL",
        b"503 5.5.1 need MAIL",
        b"503 5.5.1 need RCPT",
    )
    assert b"MAIL" not in out and b"." not in out  # no body, the session ends
    (r,) = results
    assert r.stage == client.MAIL and not r.before_transaction
    for rcpt in ("a@r.test", "b@r.test"):
        assert r.replies[rcpt] == RemoteReply(553, "5.7.1 sender refused", "MAIL FROM")


def test_pipelining_every_recipient_refused_sends_no_body():
    s, p, t, results, sent = _pipelined_session(recipients=("a@r.test",))
    out = _feed(p, t, b"250 ok", b"550 5.1.1 no such user", b"554 5.5.1 no valid recipients")
    assert b"Subject" not in out
    (r,) = results
    assert r.replies["a@r.test"] == RemoteReply(550, "5.1.1 no such user", "RCPT TO")


def test_pipelining_data_refused_is_the_accepted_recipients_reply():
    s, p, t, results, sent = _pipelined_session(recipients=("a@r.test", "b@r.test"))
    out = _feed(p, t, b"250 ok", b"250 ok", b"550 5.1.1 unknown", b"451 4.3.0 disk full")
    assert b"Subject" not in out
    (r,) = results
    assert r.replies["a@r.test"] == RemoteReply(451, "4.3.0 disk full", "DATA")
    assert r.replies["b@r.test"] == RemoteReply(550, "5.1.1 unknown", "RCPT TO")


def test_pipelining_on_a_kept_connection():
    cache = ConnectionCache(idle_time=2.0)
    s, p, t, results = _session(recipients=("a@r.test",))
    s.cache, p.cache = cache, cache
    cache.key_for(p, "k")
    t.connected = True
    _feed(p, t, b"220 hi", b"250-hi", b"250 PIPELINING")
    assert _feed(p, t, b"250 ok", b"250 ok", b"354 go").endswith(b"\r\n.\r\n")
    assert _feed(p, t, b"250 2.0.0 queued") == b""
    kept = cache.take("k")
    assert kept is p and results[0].replies["a@r.test"].accepted
    second = Session(
        reactor=s.reactor,
        pool=None,
        hop=HOP,
        helo="mail.example.test",
        sender="bob@example.test",
        recipients=["c@r.test"],
        message=io.BytesIO(b"x\n"),
        cache=cache,
        cache_key="k",
    )
    got = []
    second.run_on(kept).addCallback(got.append)
    assert _feed(p, t) == b"MAIL FROM:<bob@example.test>\r\nRCPT TO:<c@r.test>\r\nDATA\r\n"
    assert _feed(p, t, b"250 ok", b"250 ok", b"354 go") == b"x\r\n.\r\n"
    _feed(p, t, b"250 2.0.0 queued")
    assert got[0].stage == client.DONE and got[0].replies["c@r.test"].accepted
    # A kept connection the server closed while the group was on its way: stale, retried.
    third = Session(
        reactor=s.reactor,
        pool=None,
        hop=HOP,
        helo="mail.example.test",
        sender="bob@example.test",
        recipients=["d@r.test"],
        message=io.BytesIO(b"x\n"),
        cache=cache,
        cache_key="k",
    )
    got3 = []
    third.run_on(cache.take("k")).addCallback(got3.append)
    p.connectionLost(Failure(ConnectionError("reset")))
    assert got3[0].stale_connection


def test_transform_never_emits_a_bare_cr_or_lf():
    """Whatever the queue file holds, only CRLF goes out (RFC 5321 2.3.8), dot-stuffed."""
    sender = _BodySender(None, None, None, None, lambda: None)
    chunks = [b"part 3\r", b".\nMAIL FROM:<x>\r\n", b"a\rb\r", b"\r\n.\r", b"end"]
    out = b"".join(sender.transform(c) for c in chunks) + sender.flush()
    assert out == b"part 3\r\n..\r\nMAIL FROM:<x>\r\na\r\nb\r\n\r\n..\r\nend"


class _RawSink(protocol.Protocol):
    """A minimal SMTP receiver that keeps every byte it is sent."""

    def __init__(self, seen: list[bytes], closed: defer.Deferred) -> None:
        self.seen = seen
        self.closed = closed
        self.buffer = b""
        self.in_data = False

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed.callback(None)

    def connectionMade(self) -> None:
        self.transport.write(b"220 sink ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(data)
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.transport.write(b"250 2.0.0 ok\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            verb = line[:4].upper()
            if verb == b"DATA":
                self.in_data = True
                self.transport.write(b"354 go on\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.loseConnection()
            else:
                self.transport.write(b"250 ok\r\n")


class BareNewlineOnTheWire(unittest.TestCase):
    """The relay client against a raw loopback sink: no bare CR or LF on the wire."""

    @defer.inlineCallbacks
    def test_queue_file_with_bare_cr_and_lf(self):
        from twisted.internet import reactor

        seen: list[bytes] = []
        closed: defer.Deferred = defer.Deferred()
        factory = protocol.ServerFactory.forProtocol(lambda: _RawSink(seen, closed))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        message = (
            b"Subject: x\n\npart 1\npart 3\r.\r\nMAIL FROM:<alice@example.test>\n"
            b"RCPT TO:<victim@remote.test>\nDATA\nsmuggled\r\n.\r\nlone\rCR\r"
        )
        s = Session(
            reactor=reactor,
            pool=None,
            hop=Hop("sink", "127.0.0.1", port.getHost().port),
            helo="mail.example.test",
            sender="alice@example.test",
            recipients=["bob@remote.test"],
            message=io.BytesIO(message),
        )
        result = yield s.connect(5)
        self.assertEqual(result.replies["bob@remote.test"].code, 250)
        yield closed  # after QUIT
        wire = b"".join(seen)
        self.assertNotIn(b"\r", wire.replace(b"\r\n", b""))
        self.assertNotIn(b"\n", wire.replace(b"\r\n", b""))
        self.assertEqual(wire.count(b"\r\n.\r\n"), 1, wire)  # one message ends, once
        self.assertIn(b"\r\npart 3\r\n..\r\nMAIL FROM:<alice@example.test>\r\n", wire)
