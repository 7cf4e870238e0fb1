"""
Sender authentication, piece by piece: DMARC records, alignment with the
public suffix list and pct= sampling, the Authentication-Results field,
DNS that does not answer, the timeouts on a task.Clock, the SPF memo, and
what the SMTP server does with the checks (StringTransport sessions).
"""

from __future__ import annotations

import base64
import dataclasses
import socket
import time
from typing import Any

import pytest
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from mailsrv import config as configmod
from mailsrv.authres.dkimverify import DkimResult, verify_arc, verify_dkim
from mailsrv.authres.dmarc import Dmarc, DmarcRecord, DmarcResult, from_domains, parse_record
from mailsrv.authres.header import authentication_results, dropped_field
from mailsrv.authres.resolver import DnsTempError, Resolver
from mailsrv.authres.spf import SpfResult, check_spf
from mailsrv.authres.step import TIMEOUT, SenderAuthentication, build_authentication
from mailsrv.filter.verdict import ACCEPT, JUNK, REJECT, Envelope
from mailsrv.smtp.checks import IMessageCheck, message_checks
from mailsrv.spool import BytesSource

from . import authres_reference as reference
from .authres_support import SenderKey, arc_sealed, message
from .test_smtp_helpers import PASSWORD, Session, make_context, read_inbox

ALICE = "alice@example.test"
ENVELOPE = Envelope("Q1", "bob@good.test", (ALICE,), "192.0.2.7", helo="client.test")


class ZoneResolver(Resolver):
    """An in-memory twin of L{Resolver}'s TXT lookups (names under broken. fail)."""

    def __init__(self, zone: dict[str, list[str]]) -> None:
        self.zone = zone

    def txt(self, name: str) -> list[bytes]:
        if name.endswith("broken.test"):
            raise DnsTempError(f"DNS TXT {name}: SERVFAIL")
        return [t.encode() for t in self.zone.get(name.rstrip("."), [])]


def spf(result: str, domain: str = "good.test") -> SpfResult:
    return SpfResult(result, "mailfrom", f"bob@{domain}", domain)


def headers(from_value: str) -> list[tuple[bytes, bytes]]:
    return [(b"From", f" {from_value}".encode()), (b"Subject", b" x")]


# DMARC


def test_dmarc_records_parsed_as_rfc_7489_6_3_says():
    assert parse_record("v=DMARC1; p=reject") == DmarcRecord("reject", "reject")
    assert parse_record("v=DMARC1;p=quarantine;sp=none;pct=20;adkim=s;aspf=s") == DmarcRecord(
        "quarantine", "none", "s", "s", 20
    )
    assert parse_record("v=DMARC1; p=bogus") == DmarcRecord("none", "none")  # 6.6.3
    assert parse_record("v=DMARC1") == DmarcRecord("none", "none")
    assert parse_record("v=DMARC1; p=reject; pct=500").pct == 100
    assert parse_record("p=reject; v=DMARC1") is None  # v= must come first
    assert parse_record("v=spf1 -all") is None


def test_from_domains_are_every_author_domain():
    assert from_domains(headers("Bob <Bob@Good.Test>")) == ["good.test"]
    assert from_domains(headers("a@x.test, b@y.test")) == ["x.test", "y.test"]
    assert from_domains(headers("a@x.test") + headers("b@x.test")) == ["x.test"]
    assert from_domains(headers("a@x.test, undisclosed-recipients:;")) == ["x.test"]
    assert from_domains(headers("nobody")) == []
    assert from_domains([(b"Subject", b"no from")]) == []


def test_alignment_uses_the_public_suffix_list():
    d = Dmarc()
    assert d.organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert d.aligned("mail.example.co.uk", "example.co.uk", "r")
    assert not d.aligned("mail.example.co.uk", "example.co.uk", "s")
    assert not d.aligned("a.co.uk", "b.co.uk", "r")  # co.uk is a public suffix
    assert d.aligned("bounce.good.test", "good.test", "r")


ZONE = {
    "_dmarc.good.test": ["v=DMARC1; p=reject"],
    "_dmarc.org.test": ["v=DMARC1; p=quarantine; sp=reject"],
    "_dmarc.half.test": ["v=DMARC1; p=reject; pct=50"],
    "_dmarc.twice.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
}


def test_dmarc_pass_needs_one_aligned_pass():
    d, zone = Dmarc(), ZoneResolver(ZONE)
    assert d.evaluate(headers("b@good.test"), spf("pass"), [], zone).result == "pass"
    other = spf("pass", "other.test")
    signed = [DkimResult("pass", "mail.good.test")]
    assert d.evaluate(headers("b@good.test"), other, signed, zone).result == "pass"
    failed = d.evaluate(headers("b@good.test"), other, [DkimResult("fail", "good.test")], zone)
    assert (failed.result, failed.policy, failed.disposition) == ("fail", "reject", "reject")


def test_subdomains_take_sp_and_unknown_domains_none():
    d, zone = Dmarc(), ZoneResolver(ZONE)
    sub = d.evaluate(headers("b@mail.org.test"), spf("fail"), [], zone)
    assert (sub.result, sub.policy) == ("fail", "reject")  # the org domain's sp=
    top = d.evaluate(headers("b@org.test"), spf("fail"), [], zone)
    assert top.policy == "quarantine"
    assert d.evaluate(headers("b@nowhere.test"), spf("fail"), [], zone).result == "none"
    # RFC 7489 6.6.3: two records, no DMARC.
    assert d.evaluate(headers("b@twice.test"), spf("fail"), [], zone).result == "none"
    assert d.evaluate(headers("b@broken.test"), spf("fail"), [], zone).result == "temperror"
    assert d.evaluate([], spf("pass"), [], zone).result == "permerror"


def test_a_from_naming_too_many_domains_is_quarantined_unlooked_up():
    many = ", ".join(f"a@d{i}.test" for i in range(6)) + ", b@good.test"
    result = Dmarc().evaluate(headers(many), spf("pass"), [], ZoneResolver({}))
    assert (result.result, result.disposition) == ("fail", "quarantine")


def test_pct_samples_and_steps_down_the_others():
    # RFC 7489 6.6.4: outside the sample, reject becomes quarantine.
    zone = ZoneResolver(ZONE)
    inside = Dmarc(chance=lambda: 0.2).evaluate(headers("b@half.test"), spf("fail"), [], zone)
    outside = Dmarc(chance=lambda: 0.7).evaluate(headers("b@half.test"), spf("fail"), [], zone)
    assert (inside.disposition, outside.disposition) == ("reject", "quarantine")


# the field


def test_one_field_with_every_result_folded():
    field = authentication_results(
        "mx.example.test",
        spf("softfail"),
        [DkimResult("pass", "good.test", "sel", "abcdefgh")],
        Dmarc().evaluate(headers("b@x.test"), None, [], ZoneResolver({})),
        ("none", "no (ARC) chain\r\n"),
    )
    assert field == (
        b"Authentication-Results: mx.example.test;\n"
        b"\tspf=softfail smtp.mailfrom=bob@good.test;\n"
        b"\tdkim=pass header.d=good.test header.s=sel header.b=abcdefgh;\n"
        b"\tdmarc=none header.from=x.test;\n"
        b"\tarc=none (no  ARC  chain)\n"
    )
    helo = SpfResult("pass", "helo", "mx.good.test", "mx.good.test")
    assert b"spf=pass smtp.helo=mx.good.test" in authentication_results("h", helo, [], None, None)


def test_authentication_results_from_outside_are_dropped_arc_kept():
    assert dropped_field(b"authentication-results")
    assert not dropped_field(b"arc-authentication-results")  # RFC 8617 4.1.1
    assert not dropped_field(b"received")


# DNS


def test_a_name_server_that_never_answers_gives_temperror():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        resolver = Resolver((silent.getsockname(),), timeout=0.3)
        result = check_spf(resolver, "127.0.0.1", "client.test", "bob@good.test", "mx")
        assert (result.result, result.identity) == ("temperror", "mailfrom")
        with pytest.raises(DnsTempError):
            resolver.txt("_dmarc.good.test")
        # dkimpy's key lookup too: temperror, not fail (RFC 6376 6.1.2).
        key = SenderKey()
        signed = key.sign(message("bob@good.test", "x"), "good.test")
        [dkim] = verify_dkim(signed, resolver)
        assert (dkim.result, dkim.domain) == ("temperror", "good.test")


def test_an_identity_without_a_domain_is_none():
    resolver = Resolver((("127.0.0.1", 9),), timeout=0.1)
    assert check_spf(resolver, "127.0.0.1", "[127.0.0.1]", "", "mx").result == "none"
    assert check_spf(resolver, "127.0.0.1", "localhost", "", "mx").result == "none"


def test_arc_chains_pass_and_fail():
    key = SenderKey()
    zone = ZoneResolver({"sel._domainkey.lists.test": [key.record]})
    sealed = arc_sealed(key, message("bob@good.test", "x"))
    assert verify_arc(sealed, zone)[0] == "pass"
    assert verify_arc(sealed.replace(b"Hello.", b"Changed."), zone)[0] == "fail"
    assert verify_arc(message("bob@good.test", "x"), zone)[0] == "none"


# the step, on a task.Clock


class Pool:
    """A thread pool twin: records the work and fires only when told."""

    def __init__(self) -> None:
        self.work: list[tuple[Any, defer.Deferred]] = []
        self.calls = 0

    def __call__(self, f: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.work.append((f, d))
        self.calls += 1
        return d

    def run_all(self) -> None:
        while self.work:
            f, d = self.work.pop(0)
            d.callback(f())


def authentication(pool: Any, clock: Any = None, resolver: Any = None, **kw: Any):
    return SenderAuthentication(
        resolver=resolver or ZoneResolver({}),
        in_pool=pool,
        clock=clock or task.Clock(),
        authserv_id="mx.example.test",
        **kw,
    )


def _result(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    [value] = out
    return value


def test_the_step_is_a_message_check():
    verifyObject(IMessageCheck, authentication(Pool()))


def test_spf_that_does_not_answer_in_time_is_temperror_and_deferred_when_asked():
    clock, pool = task.Clock(), Pool()
    auth = authentication(pool, clock, spf_reject=True)
    d = auth.mail("192.0.2.7", "client.test", "bob@good.test")
    assert d is not None and not d.called
    clock.advance(TIMEOUT)
    failure = _result(d)
    assert (failure.value.reply.code, failure.value.reply.enhanced) == (451, "4.7.24")


def test_checks_that_do_not_finish_in_time_give_temperror():
    clock, pool = task.Clock(), Pool()
    auth = authentication(pool, clock)
    assert auth.mail("192.0.2.7", "client.test", "bob@good.test") is None  # reported only
    d = auth.check(BytesSource(message("bob@good.test", "x")), ENVELOPE)
    clock.advance(TIMEOUT)  # SPF
    clock.advance(TIMEOUT)  # DKIM, ARC, DMARC
    verdict = _result(d)
    assert verdict.action == ACCEPT
    assert b"spf=temperror" in verdict.headers
    assert b"dkim=temperror" in verdict.headers and b"dmarc=temperror" in verdict.headers


def test_spf_is_asked_once_per_envelope_within_the_memo():
    clock, pool = task.Clock(), Pool()
    auth = authentication(pool, clock)
    first = auth.spf("192.0.2.7", "client.test", "bob@good.test")
    assert auth.spf("192.0.2.7", "client.test", "Bob@Good.Test") is first
    assert auth.spf("192.0.2.8", "client.test", "bob@good.test") is not first
    clock.advance(301)
    assert auth.spf("192.0.2.7", "client.test", "bob@good.test") is not first


def _verdict_for(data: bytes, zone: dict[str, list[str]], spf_result: str, **kw: Any) -> Any:
    pool = Pool()
    auth = authentication(pool, resolver=ZoneResolver(zone), **kw)
    lookup = auth.spf(ENVELOPE.client_ip, ENVELOPE.helo or "", ENVELOPE.sender)
    pool.work.clear()
    lookup._done(spf(spf_result, ENVELOPE.sender.rpartition("@")[2]))
    d = auth.check(BytesSource(data), ENVELOPE)
    pool.run_all()
    return _result(d)


def test_dmarc_dispositions_become_verdicts():
    zone = {"_dmarc.good.test": ["v=DMARC1; p=reject"]}
    data = message("bob@good.test", "x")
    rejected = _verdict_for(data, zone, "softfail")
    assert rejected.action == REJECT
    assert (rejected.reply.code, rejected.reply.enhanced) == (550, "5.7.1")
    assert rejected.reply.text == "Email rejected per DMARC policy for good.test"
    reported = _verdict_for(data, zone, "softfail", dmarc_reject=False)
    assert reported.action == ACCEPT and b"dmarc=fail" in reported.headers
    quarantined = _verdict_for(data, {"_dmarc.good.test": ["v=DMARC1; p=quarantine"]}, "fail")
    assert quarantined.action == JUNK
    assert _verdict_for(data, zone, "pass").action == ACCEPT


def test_a_message_over_the_cap_is_not_verified_nor_refused():
    zone = {"_dmarc.good.test": ["v=DMARC1; p=reject"]}
    data = message("bob@good.test", "big", body="x" * 2000 + "\r\n")
    verdict = _verdict_for(data, zone, "softfail", max_verify=1000)
    assert verdict.action == ACCEPT
    assert b"dkim=neutral (message too large to verify)" in verdict.headers
    assert b"dmarc=fail" in verdict.headers


def test_a_header_that_cannot_be_parsed_gives_permerror():
    verdict = _verdict_for(b"no colon here\r\n\r\nbody\r\n", {}, "pass")
    assert verdict.action == ACCEPT
    assert b"dkim=permerror" in verdict.headers and b"dmarc=permerror" in verdict.headers


# the SMTP server


def _context(pool: Pool, **kw: Any) -> Any:
    ctx = make_context()
    return dataclasses.replace(ctx, authentication=authentication(pool, ctx.reactor, **kw))


def test_mail_is_answered_at_once_when_spf_is_only_reported():
    pool = Pool()
    s = Session(_context(pool))
    s.cmd("EHLO client.test")
    assert s.codes("MAIL FROM:<bob@good.test>\r\n") == ["250 2.1.0"]
    assert len(pool.work) == 1  # SPF started, not waited for
    assert s.codes(f"RCPT TO:<{ALICE}>\r\n") == ["250 2.1.5"]
    assert s.cmd("DATA")[0].startswith("354")
    forged = "Authentication-Results: mx.example.test; dmarc=pass\r\n"
    assert s.send(f"From: bob@good.test\r\n{forged}Subject: x\r\n\r\nhi\r\n.\r\n") == []
    pool.run_all()  # SPF (its DNS fails here: temperror), then DKIM, ARC, DMARC
    [reply] = s.take()
    assert reply.startswith("250 ")
    assert pool.calls == 2  # the SPF result of MAIL was used at the end of DATA
    [stored] = read_inbox(s.ctx, ALICE)
    assert stored.count(b"Authentication-Results:") == 1
    assert b"Authentication-Results: mx.example.test;\n\tspf=temperror" in stored


def test_mail_waits_for_spf_when_it_may_refuse():
    pool = Pool()
    s = Session(_context(pool, spf_reject=True))
    s.cmd("EHLO client.test")
    s.proto.dataReceived(b"MAIL FROM:<bob@good.test>\r\n")
    assert s.take() == []
    f, d = pool.work.pop(0)
    d.callback(SpfResult("fail", "mailfrom", "bob@good.test", "good.test"))
    [reply] = s.take()
    assert reply.startswith("550 5.7.23 SPF validation failed: good.test")


def test_submission_mail_is_not_checked():
    pool = Pool()
    ctx = _context(pool, spf_reject=True)
    assert message_checks(ctx, submission=True) == []
    assert message_checks(ctx, submission=False) == [ctx.authentication]
    s = Session(ctx, submission=True, peer="127.0.0.1")
    s.cmd("EHLO client.test")
    auth = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    assert s.codes(f"AUTH PLAIN {auth}\r\n") == ["235 2.7.0"]
    assert s.codes(f"MAIL FROM:<{ALICE}>\r\n") == ["250 2.1.0"]
    assert s.codes(f"RCPT TO:<{ALICE}>\r\n") == ["250 2.1.5"]
    assert s.cmd("DATA")[0].startswith("354")
    forged = "Authentication-Results: mx.example.test; spf=pass\r\n"
    assert s.send(f"From: {ALICE}\r\n{forged}Subject: x\r\n\r\nhi\r\n.\r\n")[0].startswith("250 ")
    assert pool.work == []
    [stored] = read_inbox(s.ctx, ALICE)
    assert b"Authentication-Results: mx.example.test; spf=pass" in stored  # the user's own


# config


def test_the_checks_are_built_unless_turned_off(tmp_path):
    base = '[server]\nhostname = "mx.example.test"\ndomains = ["example.test"]\n'
    built = build_authentication(configmod.parse(base, "<test>", tmp_path), task.Clock(), Pool())
    assert built is not None and (built.spf_reject, built.dmarc_reject) == (False, True)
    assert built.authserv_id == "mx.example.test"
    off = configmod.parse(base + "[policy]\nauthentication_checks = false\n", "<test>", tmp_path)
    assert build_authentication(off, task.Clock(), Pool()) is None


@pytest.mark.parametrize(
    "from_fields",
    [
        "From: bob@good.test, undisclosed-recipients:;\r\n",  # a group with no address
        "From: Bob <bob@good.test>>\r\n",  # a stray '>' parses as a second, empty address
        "From: bob@good.test, x\r\n",  # a second address without a domain
        "From: bob@good.test\r\nFrom: eve@elsewhere.test\r\n",  # two From fields
        "From: eve@elsewhere.test, bob@good.test\r\n",  # two domains, the second p=reject
    ],
)
def test_odd_from_fields_do_not_escape_dmarc_reject(from_fields):
    # RFC 7489 6.6.1: every author domain is evaluated and the strictest
    # failing policy applies; a malformed From: must not turn a p=reject
    # failure into permerror (and a 250) while the MUA shows good.test.
    pool = Pool()
    zone = ZoneResolver({"_dmarc.good.test": ["v=DMARC1; p=reject"]})
    s = Session(_context(pool, resolver=zone))
    s.cmd("EHLO client.test")
    # An envelope sender not aligned with good.test: its SPF cannot pass DMARC.
    assert s.codes("MAIL FROM:<eve@spoofer.test>\r\n") == ["250 2.1.0"]
    assert s.codes(f"RCPT TO:<{ALICE}>\r\n") == ["250 2.1.5"]
    assert s.cmd("DATA")[0].startswith("354")
    assert s.send(f"{from_fields}Subject: spoofed\r\n\r\nhi\r\n.\r\n") == []
    pool.run_all()
    [reply] = s.take()
    assert reply.startswith("550 5.7.1 Email rejected per DMARC policy for good.test"), reply
    assert read_inbox(s.ctx, ALICE) == []


def test_an_aligned_check_that_could_not_be_made_defers_rather_than_refuses():
    # SPF of the aligned envelope sender has no answer (temperror) and the
    # message is unsigned: DMARC cannot tell, so p=reject is a 451, never a 550.
    pool = Pool()
    zone = ZoneResolver({"_dmarc.good.test": ["v=DMARC1; p=reject"]})
    s = Session(_context(pool, resolver=zone))
    s.cmd("EHLO client.test")
    assert s.codes("MAIL FROM:<bob@good.test>\r\n") == ["250 2.1.0"]
    assert s.codes(f"RCPT TO:<{ALICE}>\r\n") == ["250 2.1.5"]
    assert s.cmd("DATA")[0].startswith("354")
    assert s.send("From: bob@good.test\r\nSubject: x\r\n\r\nhi\r\n.\r\n") == []
    pool.run_all()
    [reply] = s.take()
    assert reply.startswith("451 4.7.0 DMARC policy for good.test could not be checked"), reply
    assert read_inbox(s.ctx, ALICE) == []
    # With dmarc_reject false, only the field tells it.
    reported = _verdict_for(message("bob@good.test", "x"), ZONE, "temperror", dmarc_reject=False)
    assert reported.action == ACCEPT and b"dmarc=temperror" in reported.headers


def test_a_selector_that_is_no_domain_name_is_not_a_temporary_error():
    # A made-up s= (an empty label, a name over 255 octets) cannot be looked
    # up: the signature fails; it must not pass for a DNS error (temperror).
    resolver = Resolver((("127.0.0.1", 9),), timeout=0.3)
    assert resolver.txt("a..b._domainkey.good.test") == []
    assert resolver.txt("x" * 300 + "._domainkey.good.test") == []
    signed = SenderKey().sign(message("bob@good.test", "x"), "good.test")
    [result] = verify_dkim(signed.replace(b"s=sel", b"s=a..b"), resolver)
    assert result.result != "temperror", result


def test_lookups_a_sender_chose_hold_no_thread_past_the_step():
    # Five signatures whose keys a name server never answers for: the pool
    # thread was held five query timeouts (and DMARC's after them), long
    # after the step had timed out; now it stops within the step's time.
    key = SenderKey()
    data = message("bob@good.test", "slow")
    for domain in ("a.test", "b.test", "c.test", "d.test", "e.test"):
        data = key.sign(data, domain)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        resolver = Resolver((silent.getsockname(),), timeout=0.4)
        pool = Pool()
        auth = authentication(pool, resolver=resolver, timeout=1.0)
        lookup = auth.spf(ENVELOPE.client_ip, ENVELOPE.helo or "", ENVELOPE.sender)
        pool.work.clear()
        lookup._done(spf("softfail"))
        d = auth.check(BytesSource(data), ENVELOPE)
        start = time.monotonic()
        pool.run_all()
        held = time.monotonic() - start
    verdict = _result(d)
    assert held < 1.5, held  # 5 x 0.4 s for the keys, 2 x 0.4 s for DMARC before
    assert verdict.headers.count(b"dkim=temperror") == 5
    assert b"dmarc=temperror" in verdict.headers


def test_mail_after_mail_starts_one_spf_evaluation_at_a_time():
    # MAIL, RSET, MAIL... answered at once each started an SPF evaluation: a
    # client could queue them without end before every other message's checks.
    pool = Pool()
    s = Session(_context(pool))
    s.cmd("EHLO client.test")
    for i in range(10):
        assert s.codes(f"MAIL FROM:<bob{i}@good.test>\r\nRSET\r\n") == ["250 2.1.0", "250 2.0.0"]
    assert len(pool.work) == 1
    # A message that gets to the end of DATA has its own sender's SPF then.
    assert s.codes("MAIL FROM:<carol@good.test>\r\n") == ["250 2.1.0"]
    assert s.codes(f"RCPT TO:<{ALICE}>\r\n") == ["250 2.1.5"]
    assert s.cmd("DATA")[0].startswith("354")
    assert s.send("From: carol@good.test\r\nSubject: x\r\n\r\nhi\r\n.\r\n") == []
    pool.run_all()
    [reply] = s.take()
    assert reply.startswith("250 ")
    [stored] = read_inbox(s.ctx, ALICE)
    assert b"smtp.mailfrom=carol@good.test" in stored


def test_the_field_is_what_the_authres_package_writes() -> None:
    # The field is written without the package's objects (for speed); the
    # package stays the judge of its form, for odd values too.
    odd = ['a"b\\c', "sp ace", "semi;colon", "x=y", "", "ok-token", "@", "(p)", "é"]
    cases = [
        ("h", spf("pass"), [], None, None),
        ("h", SpfResult("none", "mailfrom", "", "x.test"), [], None, ("pass", "")),
        ("h", SpfResult("pass", "helo", "mx.good.test", "mx.good.test", "why"), [], None, None),
    ]
    for value in odd:
        cases.append(
            (
                "mx.test",
                SpfResult("fail", "mailfrom", value, "d", value),
                [DkimResult("fail", value, value, value, value)],
                DmarcResult("fail", value, "reject", "reject", value),
                ("fail", value),
            )
        )
        cases.append(("mx.test", None, [], DmarcResult("none", value, reason=value), None))
    cases.append(("mx.test", None, [], None, None))
    for case in cases:
        assert authentication_results(*case) == reference.authentication_results(*case), case


def test_a_header_dkimpy_cannot_parse_is_a_failed_arc_chain() -> None:
    from mailsrv.authres.verify import verify_message

    broken = b"From: a@good.test\r\nthis line has no colon\r\n\r\nbody\r\n"
    dkims, arc, dmarc = verify_message(broken, spf("pass"), ZoneResolver({}), Dmarc(), 10**6, 5)
    assert dkims[0].result == "permerror"
    assert arc[0] == "fail"  # as dkimpy's ARC verification says, not "none"
    assert dmarc.result == "permerror"  # no From: domain could be read
