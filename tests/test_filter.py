"""
The spam filter step: verdicts and thresholds, the spamc and rspamd wire
formats, the filter command's convention, the timeout and the fallback on a
task.Clock, and what an SMTP client sees and what is stored for each verdict.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv import config as configmod
from mailsrv.filter import command, rspamd, spamd
from mailsrv.filter.step import FilterStep, build_filter
from mailsrv.filter.verdict import (
    ACCEPT,
    DEFER,
    JUNK,
    REJECT,
    Envelope,
    FilterError,
    IFilter,
    Thresholds,
    Verdict,
)
from mailsrv.spool import BytesSource

from .test_smtp_helpers import Session, _result, make_context, read_inbox

ALICE = "alice@example.test"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
ENVELOPE = Envelope("Q1", "bob@remote.test", (ALICE,), "192.0.2.7", user=None)


# verdicts


def test_thresholds_follow_the_daemon_unless_set():
    assert Thresholds().action(3.0, ACCEPT) == ACCEPT
    assert Thresholds().action(30.0, REJECT) == REJECT
    assert Thresholds().action(6.0, JUNK) == JUNK
    assert Thresholds().action(0.0, DEFER) == DEFER
    # Our own reject score replaces the daemon's reject: below it, junk.
    assert Thresholds(reject=50).action(30.0, REJECT) == JUNK
    assert Thresholds(reject=50).action(60.0, ACCEPT) == REJECT
    assert Thresholds(junk=10).action(6.0, JUNK) == ACCEPT
    assert Thresholds(junk=10).action(12.0, ACCEPT) == JUNK


def test_reject_reply_carries_the_filters_reason_made_safe():
    reply = Verdict(REJECT, reason="spam\r\n550 injected\x00").reply
    assert (reply.code, reply.enhanced) == (550, "5.7.1")  # RFC 3463 3.8
    assert "\r" not in reply.text and "\n" not in reply.text and reply.text.startswith("spam")
    assert Verdict(REJECT).reply.text == "Message rejected as spam"
    assert (Verdict(DEFER).reply.code, Verdict(DEFER).reply.enhanced) == (451, "4.7.1")
    assert Verdict(JUNK).reply is None and Verdict(ACCEPT).reply is None


# spamd: the spamc protocol


def test_spamc_request_on_the_wire():
    source = BytesSource(b"Subject: hi\n\nbody\n")
    p = spamd.SpamcProtocol(source, "alice")
    t = StringTransport()
    p.makeConnection(t)
    while t.producer is not None:  # a pull producer: StringTransport never asks
        t.producer.resumeProducing()
    assert t.value() == (
        b"SYMBOLS SPAMC/1.5\r\nContent-length: 18\r\nUser: alice\r\n\r\nSubject: hi\n\nbody\n"
    )
    p.dataReceived(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 12\r\n")
    p.dataReceived(b"Spam: True ; 1000.5 / 5.0\r\n\r\nGTUBE,NO_DATE")
    p.connectionLost()
    assert _result(p.done) == (True, 1000.5, 5.0, ["GTUBE", "NO_DATE"])


def test_spamd_answers_parsed():
    ok = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.2 / 5.0\r\n\r\n"
    assert spamd.parse_response(ok) == (False, 1.2, 5.0, [])
    for bad in (
        b"",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"SPAMD/1.0 76 Bad header line: foo\r\n\r\n",  # EX_PROTOCOL
        b"SPAMD/1.1 0 EX_OK\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; x / 5.0\r\n\r\n",
    ):
        with pytest.raises(FilterError):
            spamd.parse_response(bad)


def test_spamd_verdict_fields_and_thresholds():
    f = spamd.SpamdFilter(None, "127.0.0.1", 783, Thresholds(reject=20))
    v = f._verdict((True, 1000.0, 5.0, ["GTUBE"]))
    assert v.action == REJECT
    assert b"X-Spam-Flag: YES\n" in v.headers
    assert b"X-Spam-Status: Yes, score=1000.0 required=5.0 tests=GTUBE\n" in v.headers
    clean = f._verdict((False, 0.5, 5.0, []))
    assert clean.action == ACCEPT and b"X-Spam-Flag" not in clean.headers
    assert b"X-Spam-Status: No, score=0.5 required=5.0\n" in clean.headers


# rspamd: the HTTP protocol


def test_rspamd_envelope_fields():
    env = Envelope("Q9", "bob@remote.test", ("a@x.test", "b@x.test"), "192.0.2.7", "h.test", "u")
    h = rspamd.request_headers(env)
    assert h.getRawHeaders(b"IP") == [b"192.0.2.7"]
    assert h.getRawHeaders(b"Helo") == [b"h.test"]
    assert h.getRawHeaders(b"From") == [b"bob@remote.test"]
    assert h.getRawHeaders(b"Rcpt") == [b"a@x.test", b"b@x.test"]
    assert h.getRawHeaders(b"User") == [b"u"]
    assert h.getRawHeaders(b"Queue-Id") == [b"Q9"]
    assert not h.hasHeader(b"Hostname")  # no confirmed reverse name: rspamd looks it up
    named = rspamd.request_headers(dataclasses.replace(env, client_name="mx.remote.test"))
    assert named.getRawHeaders(b"Hostname") == [b"mx.remote.test"]


def test_rspamd_answers_parsed():
    answer = {
        "action": "reject",
        "score": 1500.0,
        "required_score": 15.0,
        "symbols": {"GTUBE": {}},
        "messages": {"smtp_message": "Gtube pattern"},
    }
    v = rspamd.parse_result(json.dumps(answer).encode(), Thresholds())
    assert v.action == REJECT and v.reply.text == "Gtube pattern"
    assert b"X-Rspamd-Action: reject\n" in v.headers
    assert b"X-Spam-Status: Yes, score=1500.0 required=15.0 tests=GTUBE\n" in v.headers
    for action, ours in rspamd.ACTIONS.items():
        body = json.dumps({"action": action, "score": 1.0}).encode()
        assert rspamd.parse_result(body, Thresholds()).action == ours
    for bad in (b"", b"[]", b'{"action": "eat it", "score": 1}', b'{"action": "reject"}'):
        with pytest.raises(FilterError):
            rspamd.parse_result(bad, Thresholds())


# the command's convention


@pytest.mark.parametrize(("code", "action"), [(0, ACCEPT), (1, JUNK), (2, REJECT), (75, DEFER)])
def test_command_exit_codes(code, action):
    v = command.verdict(code, b"X-Spam-Flag: YES\nnot a field\n", b"bad mail\nmore\n")
    assert v.action == action
    assert v.headers == b"X-Spam-Flag: YES\n"
    assert v.reason == "bad mail"


def test_command_other_exit_code_is_a_failure():
    with pytest.raises(FilterError):
        command.verdict(3, b"", b"")


# the step: timeout and fallback, on a task.Clock


@implementer(IFilter)
class ScriptedFilter:
    """A filter whose answer the test gives (a verdict, an error, or none yet)."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer
        self.cancelled = 0
        self.seen: list[tuple[bytes, Envelope]] = []

    def check(self, message_source, envelope):
        with message_source.open() as f:
            self.seen.append((f.read(), envelope))
        if isinstance(self.answer, Verdict):
            return defer.succeed(self.answer)
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)

        def cancel(d):
            self.cancelled += 1

        return defer.Deferred(cancel)


def test_filters_provide_the_interface():
    verifyObject(IFilter, spamd.SpamdFilter(None, "127.0.0.1", 783, Thresholds()))
    verifyObject(IFilter, rspamd.RspamdFilter(task.Clock(), "http://127.0.0.1:1", Thresholds()))
    verifyObject(IFilter, command.CommandFilter(None, ("/bin/true",)))
    verifyObject(IFilter, ScriptedFilter())


@pytest.mark.parametrize(("on_failure", "action"), [("accept", ACCEPT), ("defer", DEFER)])
def test_timeout_follows_on_failure(on_failure, action):
    clock = task.Clock()
    client = ScriptedFilter()
    d = FilterStep(client, clock, 30, on_failure).check(BytesSource(b"x\n"), ENVELOPE)
    clock.advance(29)
    assert not d.called
    clock.advance(1)
    assert _result(d).action == action
    assert client.cancelled == 1  # the scan is stopped


@pytest.mark.parametrize(("on_failure", "action"), [("accept", ACCEPT), ("defer", DEFER)])
def test_failure_follows_on_failure(on_failure, action):
    client = ScriptedFilter(FilterError("connection refused"))
    d = FilterStep(client, task.Clock(), 30, on_failure).check(BytesSource(b"x\n"), ENVELOPE)
    assert _result(d).action == action


# config


def test_filter_config():
    c = configmod.parse('[filter]\nspamd = "127.0.0.1:7830"\nreject_score = 20\ntimeout = "5s"\n')
    assert c.filter.spamd == ("127.0.0.1", 7830)
    assert (c.filter.timeout, c.filter.reject_score, c.filter.on_failure) == (5, 20.0, "accept")
    assert build_filter(c.filter, task.Clock()) is not None
    assert build_filter(configmod.parse("").filter, task.Clock()) is None
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse(
            '[filter]\nspamd = "x:y"\nrspamd = "ftp://a"\ncommand = ["rel"]\non_failure = "drop"\n'
        )
    text = str(e.value)
    for key in ("filter.rspamd", "filter.command", "filter.on_failure"):
        assert key in text
    with pytest.raises(configmod.ConfigError, match="one of rspamd, spamd and command"):
        configmod.parse('[filter]\nspamd = "127.0.0.1"\nrspamd = "http://127.0.0.1:11333"\n')


# the step in an SMTP session


def filtered(verdict: Any, **kw: Any) -> tuple[Session, ScriptedFilter]:
    client = ScriptedFilter(verdict)
    ctx = make_context()
    step = FilterStep(client, ctx.reactor, 30, kw.pop("on_failure", "accept"))
    s = Session(dataclasses.replace(ctx, filter=step), **kw)
    assert s.cmd("EHLO client.example")[-1].startswith("250 ")
    return s, client


def send(
    s: Session, body: str = "Subject: hi\r\nX-Spam-Flag: NO\r\nX-Spam-Status: No\r\n\r\nhi\r\n"
):
    assert s.codes("MAIL FROM:<bob@remote.test>\r\n") == ["250 2.1.0"]
    assert s.codes(f"RCPT TO:<{ALICE}>\r\n") == ["250 2.1.5"]
    assert s.cmd("DATA")[0].startswith("354")
    return s.send(body + ".\r\n")


def read_folder(ctx, user: str, name: str) -> list[bytes]:
    folder = _result(ctx.store.open_folder(user, name))
    out = []
    for info in folder.messages():
        with folder.open_message(info.uid) as f:
            out.append(f.read().replace(b"\r\n", b"\n"))
    folder.close()
    return out


def test_reject_answers_550_and_stores_nothing():
    s, client = filtered(Verdict(REJECT, reason="Gtube pattern"))
    assert send(s) == ["550 5.7.1 Gtube pattern"]
    assert read_inbox(s.ctx, ALICE) == []
    [(message, envelope)] = client.seen
    assert envelope.client_ip == "192.0.2.7" and envelope.recipients == (ALICE,)
    assert b"Received: " in message and b"\nhi\n" in message
    # The client's own X-Spam-* fields never reach the filter or the mailbox.
    assert b"X-Spam" not in message


def test_defer_answers_451():
    s, _ = filtered(Verdict(DEFER))
    assert [line[:9] for line in send(s)] == ["451 4.7.1"]
    assert read_inbox(s.ctx, ALICE) == []


def test_failure_with_on_failure_defer_answers_451():
    s, _ = filtered(FilterError("refused"), on_failure="defer")
    assert [line[:9] for line in send(s)] == ["451 4.7.1"]


def test_accept_adds_the_filters_fields_and_drops_the_senders():
    s, _ = filtered(Verdict(ACCEPT, headers=b"X-Spam-Status: No, score=0.1\n"))
    assert send(s)[0].startswith("250 ")
    [stored] = read_inbox(s.ctx, ALICE)
    assert stored.count(b"X-Spam") == 1
    assert b"X-Spam-Status: No, score=0.1\n" in stored
    head = stored.split(b"\n\n")[0]
    assert head.index(b"Received:") < head.index(b"X-Spam-Status") < head.index(b"Subject:")


def test_junk_is_filed_into_junk_when_the_user_has_it():
    s, _ = filtered(Verdict(JUNK, headers=b"X-Spam-Flag: YES\n"))
    _result(s.ctx.store.create_folder(ALICE, "Junk"))
    assert send(s)[0].startswith("250 ")
    assert read_inbox(s.ctx, ALICE) == []
    [stored] = read_folder(s.ctx, ALICE, "Junk")
    assert b"X-Spam-Flag: YES\n" in stored


def test_junk_goes_to_the_inbox_without_a_junk_folder():
    s, _ = filtered(Verdict(JUNK, headers=b"X-Spam-Flag: YES\n"))
    assert send(s)[0].startswith("250 ")
    [stored] = read_inbox(s.ctx, ALICE)
    assert b"X-Spam-Flag: YES\n" in stored


def test_submission_is_not_filtered():
    s, client = filtered(Verdict(REJECT), submission=True, peer="127.0.0.1")
    assert s.ctx.filter is not None
    import base64

    from .test_smtp_helpers import PASSWORD

    auth = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    assert s.codes(f"AUTH PLAIN {auth}\r\n") == ["235 2.7.0"]
    assert s.codes(f"MAIL FROM:<{ALICE}>\r\n") == ["250 2.1.0"]
    assert s.codes(f"RCPT TO:<{ALICE}>\r\n") == ["250 2.1.5"]
    assert s.cmd("DATA")[0].startswith("354")
    assert s.send(f"From: {ALICE}\r\nSubject: x\r\n\r\nhi\r\n.\r\n")[0].startswith("250 ")
    assert client.seen == []
    assert len(read_inbox(s.ctx, ALICE)) == 1
