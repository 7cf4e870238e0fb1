"""
Greylisting ([policy] greylist): the triplets on a task.Clock, the allow
list, the bound on memory, the state on disk across a restart, then SMTP
sessions on the MX and on submission (StringTransport).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from mailsrv.config import PolicyConfig
from mailsrv.policy import greylist_store
from mailsrv.policy.greylist import (
    Greylist,
    GreylistSettings,
    SessionGreylist,
    client_network,
    parse_allow,
)
from mailsrv.policy.greylist_store import GreylistFile, GreylistService
from mailsrv.policy.networks import NetworkList, parse_network
from mailsrv.replies import SMTPReplyError

from .test_smtp_helpers import PASSWORD, Session, make_context, read_inbox

DELAY = 300.0
DAY = 86400.0
SENDER, RCPT = "carol@origin.test", "alice@example.test"


def greylist(clock=None, **settings) -> Greylist:
    return Greylist(clock or task.Clock(), GreylistSettings(**settings))


@pytest.fixture
def events():
    out: list[dict] = []
    globalLogPublisher.addObserver(out.append)
    yield out
    globalLogPublisher.removeObserver(out.append)


# --- the triplets -----------------------------------------------------------------------


def test_a_first_attempt_waits_then_a_retry_after_the_delay_passes():
    g = greylist()
    first = g.check("192.0.2.7", SENDER, RCPT)
    assert (first.wait, first.why) == (DELAY, "first seen")
    g.clock.advance(120)
    early = g.check("192.0.2.7", SENDER, RCPT)  # too early: still waits, for the rest
    assert early.wait == pytest.approx(DELAY - 120)
    g.clock.advance(DELAY - 120)
    assert g.check("192.0.2.7", SENDER, RCPT).why == "passed after 300 s"
    g.clock.advance(3 * DAY)
    assert g.check("192.0.2.7", SENDER, RCPT).passed  # known from now on
    assert (len(g.pending), len(g.passed)) == (0, 1)


def test_the_triplet_is_the_network_the_sender_and_the_recipient_lower_cased():
    g = greylist()
    assert not g.check("192.0.2.7", "Carol@Origin.TEST", "Alice@example.test").passed
    g.clock.advance(DELAY)
    # Another address of the same /24 retries (a pool of outbound servers).
    assert g.check("192.0.2.200", "carol@origin.test", "alice@EXAMPLE.test").passed
    # Each part of the triplet counts: another network, sender or recipient waits.
    assert not g.check("192.0.3.7", SENDER, RCPT).passed
    assert not g.check("192.0.2.7", "dan@origin.test", RCPT).passed
    assert not g.check("192.0.2.7", SENDER, "bob@example.test").passed
    # The null sender is a sender like any other (a bounce is greylisted too).
    assert g.check("192.0.2.7", "", RCPT).wait == DELAY
    g.clock.advance(DELAY)
    assert g.check("192.0.2.9", "", RCPT).passed


def test_ipv4_clients_are_grouped_by_24_and_ipv6_clients_by_64():
    assert client_network("192.0.2.7") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.7") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    g = greylist()
    g.check("2001:db8:1:2::25", SENDER, RCPT)
    g.clock.advance(DELAY)
    assert g.check("2001:db8:1:2:ffff::26", SENDER, RCPT).passed
    assert not g.check("2001:db8:1:3::25", SENDER, RCPT).passed


def test_a_retry_after_the_retry_window_starts_over():
    g = greylist(retry_window=2 * DAY)
    g.check("192.0.2.7", SENDER, RCPT)
    g.clock.advance(2 * DAY)  # the first sighting is forgotten: this is a first again
    again = g.check("192.0.2.7", SENDER, RCPT)
    assert (again.wait, again.why) == (DELAY, "first seen")
    g.clock.advance(DELAY)
    assert g.check("192.0.2.7", SENDER, RCPT).passed


def test_a_passed_triplet_is_known_for_max_age_since_it_was_last_seen():
    g = greylist(max_age=35 * DAY, auto_allow=0)
    g.check("192.0.2.7", SENDER, RCPT)
    g.clock.advance(DELAY)
    assert g.check("192.0.2.7", SENDER, RCPT).passed
    g.clock.advance(34 * DAY)
    assert g.check("192.0.2.7", SENDER, RCPT).why == "known"  # seen again: 35 days from now
    g.clock.advance(34 * DAY)
    assert g.check("192.0.2.7", SENDER, RCPT).why == "known"
    g.clock.advance(35 * DAY)  # not seen for 35 days: forgotten
    assert g.check("192.0.2.7", SENDER, RCPT).why == "first seen"


def test_a_client_that_passed_in_n_different_hours_is_allowed():
    g = greylist(auto_allow=3)
    for i in range(3):
        rcpt = f"user{i}@example.test"
        assert not g.check("192.0.2.7", SENDER, rcpt).passed
        g.clock.advance(DELAY)
        assert g.check("192.0.2.7", SENDER, rcpt).passed
        # More mail within the same hour is not another pass.
        assert g.check("192.0.2.7", SENDER, rcpt).passed
        if i < 2:
            assert not g.check("192.0.2.7", "new@origin.test", "x@example.test").passed
            g.pending.clear()
        g.clock.advance(3600)
    # Three passes: any mail of that network is taken at once, and nothing is stored.
    verdict = g.check("192.0.2.99", "someone@else.test", "bob@example.test")
    assert (verdict.wait, verdict.why) == (None, "auto-allowed after 3 passes")
    assert not g.pending
    assert not g.check("192.0.3.7", "someone@else.test", "bob@example.test").passed
    # A client not heard from for max_age is forgotten.
    g.clock.advance(36 * DAY)
    assert not g.check("192.0.2.99", "someone@else.test", "bob@example.test").passed


def test_auto_allow_zero_never_allows_a_client():
    g = greylist(auto_allow=0)
    for i in range(10):
        g.check("192.0.2.7", SENDER, f"u{i}@example.test")
        g.clock.advance(DELAY)
        assert g.check("192.0.2.7", SENDER, f"u{i}@example.test").passed
        g.clock.advance(3600)
    assert not g.check("192.0.2.7", SENDER, "new@example.test").passed
    assert not g.clients


# --- the allow lists --------------------------------------------------------------------


def test_the_allow_list_skips_clients_names_senders_and_recipients():
    allow = parse_allow(
        (
            "198.51.100.0/24",
            "2001:db8:5::/48",
            "mail.partner.test",
            ".bank.test",
            "from:news@shop.test",
            "from:@trusted.test",
            "to:sales@example.test",
            "to:example.org",
            "to:hostmaster@",
        )
    )
    g = Greylist(task.Clock(), GreylistSettings(allow=allow))
    cases = [
        (("198.51.100.9", SENDER, RCPT, None), "greylist_allow 198.51.100.0/24"),
        (("2001:db8:5:1::1", SENDER, RCPT, None), "greylist_allow 2001:db8:5::/48"),
        (("192.0.2.7", SENDER, RCPT, "mail.partner.test"), "greylist_allow mail.partner.test"),
        (("192.0.2.7", SENDER, RCPT, "mx3.eu.bank.test."), "greylist_allow bank.test"),
        (("192.0.2.7", "News@Shop.test", RCPT, None), "greylist_allow from:news@shop.test"),
        (("192.0.2.7", "x@trusted.test", RCPT, None), "greylist_allow from:@trusted.test"),
        (("192.0.2.7", SENDER, "Sales@example.test", None), "greylist_allow to:sales@example.test"),
        (("192.0.2.7", SENDER, "anyone@example.org", None), "greylist_allow to:@example.org"),
        (("192.0.2.7", SENDER, "hostmaster@other.test", None), "greylist_allow to:hostmaster@"),
    ]
    for args, why in cases:
        verdict = g.check(*args)
        assert (verdict.wait, verdict.why) == (None, why), args
    # Near misses wait: a name only like the allowed one, another sender of the shop.
    for args in [
        ("192.0.2.7", SENDER, RCPT, "mail.partner.test.evil.test"),
        ("192.0.2.7", SENDER, RCPT, "notbank.test"),
        ("192.0.2.7", "other@shop.test", RCPT, None),
        ("192.0.2.7", SENDER, "sales@example.org.evil.test", None),
    ]:
        assert not g.check(*args).passed, args
    assert len(g.pending) == 3  # the two names are one triplet; none for the allowed ones


def test_the_policy_allow_networks_are_never_greylisted():
    allowed = NetworkList((parse_network("203.0.113.0/28"),))
    g = Greylist(task.Clock(), GreylistSettings(), allowed)
    assert g.check("203.0.113.5", SENDER, RCPT).why == "allowed network"
    assert not g.check("203.0.113.17", SENDER, RCPT).passed


def test_a_bad_allow_entry_is_refused_naming_it():
    with pytest.raises(ValueError, match="'from:' .*'10.0.0.0/33'|'10.0.0.0/33'.*'from:'"):
        parse_allow(("from:", "10.0.0.0/33", "ok.test"))
    with pytest.raises(ValueError, match="'localhost'"):
        parse_allow(("localhost",))


# --- memory -----------------------------------------------------------------------------


def test_the_tables_are_bounded_and_a_spray_never_pushes_out_passed_triplets():
    g = Greylist(task.Clock(), GreylistSettings(auto_allow=0), max_entries=3)
    g.check("192.0.2.7", SENDER, RCPT)
    g.clock.advance(DELAY)
    assert g.check("192.0.2.7", SENDER, RCPT).passed
    for i in range(10):  # a spray of new triplets
        g.clock.advance(1)
        g.check("198.51.100.1", f"s{i}@spam.test", RCPT)
    assert len(g.pending) == 3
    assert [k[1] for k in g.pending] == ["s7@spam.test", "s8@spam.test", "s9@spam.test"]
    assert g.check("192.0.2.7", SENDER, RCPT).why == "known"  # the oldest waiting went
    for i in range(5):
        g.clock.advance(1)
        g.passed[("n", str(i), "r")] = (g.clock.seconds(), g.clock.seconds())
        g._bound(g.passed)
    assert len(g.passed) == 3  # passed: the least recently seen go first


def test_expired_entries_are_swept_on_the_clock():
    clock = task.Clock()
    g = greylist(clock, retry_window=DAY, max_age=10 * DAY)
    g.check("192.0.2.7", SENDER, RCPT)
    g.clock.advance(DELAY)
    g.check("192.0.2.7", SENDER, RCPT)  # passed
    g.check("192.0.2.7", SENDER, "bob@example.test")  # waiting
    writes: list[bytes] = []
    file = GreylistFile(Path("/nonexistent/never"), lambda f: defer.succeed(writes.append(b"")))
    svc = GreylistService(g, file, interval=60)
    svc.startService()
    clock.advance(DAY)
    assert (len(g.pending), len(g.passed), len(g.clients)) == (0, 1, 1)
    clock.advance(10 * DAY)
    assert (len(g.pending), len(g.passed), len(g.clients)) == (0, 0, 0)
    assert writes  # something changed: snapshots were written
    n = len(writes)
    clock.advance(600)
    assert len(writes) == n  # nothing changed since: nothing written
    svc.stopService()
    assert not clock.getDelayedCalls()


# --- on disk ----------------------------------------------------------------------------


def now_in_thread(f):
    """The disk thread pool, run at once (the tests' stand-in for deferToThreadPool)."""
    return defer.maybeDeferred(f)


def test_the_state_survives_a_restart(tmp_path):
    path = tmp_path / "greylist" / "state.json"
    clock = task.Clock()
    g = greylist(clock)
    g.check("192.0.2.7", SENDER, RCPT)
    clock.advance(DELAY)
    assert g.check("192.0.2.7", SENDER, RCPT).passed
    g.check("192.0.2.7", SENDER, "bob@example.test")  # waiting, 0 s into its delay
    svc = GreylistService(g, GreylistFile(path, now_in_thread))
    svc.startService()
    svc.stopService()  # written at stop
    assert json.loads(path.read_bytes())["format"] == "mailsrv-greylist 1"
    assert path.stat().st_mode & 0o777 == 0o600
    # The next run, a minute later: the passed triplet passes, the waiting one
    # still waits for the rest of its delay.
    clock.advance(60)
    again = greylist(clock)
    GreylistFile(path, now_in_thread).load_into(again)
    assert again.clients == g.clients
    assert again.check("192.0.2.7", SENDER, RCPT).why == "known"
    assert again.check("192.0.2.7", SENDER, "bob@example.test").wait == pytest.approx(DELAY - 60)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"format": "something else"}', b'{"format": "mailsrv-greylist 1"}', b"\xff"],
)
def test_a_corrupt_state_file_is_logged_set_aside_and_the_server_starts_empty(
    tmp_path, events, content
):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    g = greylist()
    GreylistFile(path, now_in_thread).load_into(g)
    assert not g.pending and not g.passed and not g.clients
    assert g.check("192.0.2.7", SENDER, RCPT).wait == DELAY  # and it works
    lines = [formatEvent(e) for e in events if "greylist:" in formatEvent(e)]
    assert len(lines) == 1
    assert "is not a greylist snapshot" in lines[0] and "starting empty" in lines[0]
    assert not path.exists()
    assert (tmp_path / "state.json.corrupt").read_bytes() == content


def test_a_failed_write_is_logged_and_tried_again(tmp_path, events):
    blocker = tmp_path / "file"
    blocker.write_text("")
    g = greylist()
    g.check("192.0.2.7", SENDER, RCPT)
    d = GreylistFile(blocker / "greylist" / "state.json", now_in_thread).save(g)
    assert d.called and d.result is None
    assert g.dirty  # written again at the next tick
    assert any("greylist: cannot write" in formatEvent(e) for e in events)


def test_a_save_builds_the_snapshot_in_the_disk_thread(tmp_path, monkeypatch):
    # Full tables made a snapshot that held the reactor for most of a second:
    # the reactor copies the tables; rows and JSON are made in the disk thread.
    built: list[int] = []
    real = greylist_store.snapshot_of
    monkeypatch.setattr(greylist_store, "snapshot_of", lambda t: built.append(1) or real(t))
    g = greylist()
    for i in range(1000):
        g.pending[(f"198.51.{i % 256}.0/24", f"s{i}@x.test", f"r{i}@example.test")] = (1.0, 2.0)
    g.dirty = True
    work: list = []
    file = GreylistFile(tmp_path / "state.json", lambda f: work.append(f) or defer.succeed(None))
    file.save(g)
    assert built == []  # only a copy, on the reactor
    g.check("192.0.2.7", SENDER, RCPT)  # after the save: not in this snapshot
    [write] = work
    write()
    assert built == [1]
    saved = json.loads((tmp_path / "state.json").read_bytes())
    assert len(saved["pending"]) == 1000


# --- SMTP sessions ----------------------------------------------------------------------


def greylisting(tmp_path: Path, **policy):
    """A server context with greylisting on, on a MemoryReactorClock."""
    reactor = MemoryReactorClock()
    reactor.advance(1_780_200_000.0)
    base = make_context(tmp_path / "data", reactor=reactor)
    config = dataclasses.replace(base.config, policy=PolicyConfig(greylist=True, **policy))
    settings = GreylistSettings(delay=DELAY, allow=config.policy.greylist_allow)
    allowed = NetworkList(tuple(config.policy.allow))
    return dataclasses.replace(base, config=config, greylist=Greylist(reactor, settings, allowed))


def send(s: Session, sender: str, rcpts: list[str]) -> list[str]:
    """One transaction: the replies to MAIL, each RCPT, and DATA's end (if any RCPT was taken)."""
    out = [s.cmd(f"MAIL FROM:<{sender}>")[0]]
    out += [s.cmd(f"RCPT TO:<{r}>")[0] for r in rcpts]
    if any(r.startswith("250 ") for r in out[1:]):
        assert s.cmd("DATA")[0].startswith("354 ")
        out += s.send("Subject: hi\r\n\r\nbody\r\n.\r\n")
    else:
        s.cmd("RSET")
    return out


def test_mx_greylists_at_rcpt_with_451_4_7_1_then_takes_the_retry(tmp_path, events):
    ctx = greylisting(tmp_path)
    s = Session(ctx, peer="192.0.2.7")
    s.cmd("EHLO client.origin.test")
    replies = send(s, SENDER, [RCPT, "nobody@example.test", "bob@example.test"])
    assert replies == [
        "250 2.1.0 Sender OK",
        "451 4.7.1 Greylisted, please try again in 300 seconds",
        "550 5.1.1 No such user here",
        "451 4.7.1 Greylisted, please try again in 300 seconds",
    ]
    # An unknown user is refused first: no triplet is kept for it.
    assert ctx.greylist is not None
    assert {k[2] for k in ctx.greylist.pending} == {RCPT, "bob@example.test"}
    lines = [formatEvent(e) for e in events if "reject recipient" in formatEvent(e)]
    assert lines[0] == (
        "reject recipient <alice@example.test> from 192.0.2.7: 451 4.7.1 Greylisted, please "
        "try again in 300 seconds; sender=<carol@origin.test> (greylisted 192.0.2.0/24 "
        "<carol@origin.test> <alice@example.test>: first seen)"
    )
    ctx.reactor.advance(100)
    assert send(s, SENDER, [RCPT])[1] == "451 4.7.1 Greylisted, please try again in 200 seconds"
    ctx.reactor.advance(200)
    s = Session(ctx, peer="192.0.2.30")  # another server of the same pool
    s.cmd("EHLO client2.origin.test")
    replies = send(s, SENDER, [RCPT, "bob@example.test"])
    assert [r[:9] for r in replies] == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.0.0"]
    assert len(read_inbox(ctx, RCPT)) == 1
    assert len(read_inbox(ctx, "bob@example.test")) == 1
    assert any("greylist: 192.0.2.30 <carol" in formatEvent(e) for e in events)


def test_mail_to_postmaster_and_abuse_is_never_greylisted(tmp_path):
    ctx = greylisting(tmp_path)
    s = Session(ctx)
    s.cmd("EHLO client.origin.test")
    replies = send(s, SENDER, ["postmaster@example.test", "Postmaster", RCPT])
    assert [r[:9] for r in replies] == [
        "250 2.1.0",
        "250 2.1.5",
        "250 2.1.5",
        "451 4.7.1",
        "250 2.0.0",
    ]
    assert send(s, "", ["postmaster@example.test"])[1].startswith("250 2.1.5")
    assert ctx.greylist is not None
    assert {k[2] for k in ctx.greylist.pending} == {RCPT}
    # abuse@ of a local domain too; the same local parts elsewhere are not exempt.
    session = SessionGreylist(ctx, "192.0.2.7")
    session.check(SENDER, "abuse@other.test")
    for address in ("postmaster@remote.test", "abuse@remote.test"):
        with pytest.raises(SMTPReplyError):
            session.check(SENDER, address)


def test_a_client_a_dnswl_lists_is_never_greylisted(tmp_path):
    from mailsrv.policy.client import ClientChecked, ClientReport

    ctx = greylisting(tmp_path)
    listed = ClientChecked()
    listed.client_checked(ClientReport("192.0.2.7", exempt="dnswl wl.test"))
    SessionGreylist(ctx, "192.0.2.7", listed).check(SENDER, RCPT)  # taken at once
    unlisted = ClientChecked()
    unlisted.client_checked(ClientReport("192.0.2.8"))
    with pytest.raises(SMTPReplyError):
        SessionGreylist(ctx, "192.0.2.8", unlisted).check(SENDER, RCPT)


def test_submission_clients_are_never_greylisted(tmp_path):
    ctx = greylisting(tmp_path)
    s = Session(ctx, submission=True, peer="127.0.0.1")
    s.cmd("EHLO client.example")
    token = base64.b64encode(f"\0bob@example.test\0{PASSWORD}".encode()).decode()
    assert s.cmd(f"AUTH PLAIN {token}")[0].startswith("235 ")
    replies = send(s, "bob@example.test", [RCPT, "carol@remote.test"])
    assert [r[:9] for r in replies] == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.0.0"]
    assert ctx.greylist is not None and not ctx.greylist.pending


def test_allowed_networks_and_confirmed_names_are_not_greylisted(tmp_path):
    ctx = greylisting(
        tmp_path,
        allow=(parse_network("203.0.113.0/24"),),
        greylist_allow=parse_allow(("partner.test",)),
    )
    s = Session(ctx, peer="203.0.113.9")
    s.cmd("EHLO client.example")
    assert send(s, SENDER, [RCPT])[-1].startswith("250 ")
    s = Session(ctx, peer="192.0.2.7")
    s.cmd("EHLO mx.partner.test")  # a HELO name is not a confirmed name
    assert send(s, SENDER, [RCPT])[1].startswith("451 4.7.1")
    s.proto.client_name = "mx.partner.test"  # the session's forward-confirmed reverse name
    assert send(s, SENDER, [RCPT])[-1].startswith("250 ")


def test_greylisting_is_off_by_default(tmp_path):
    ctx = make_context(tmp_path / "data")
    assert ctx.greylist is None
    s = Session(ctx)
    s.cmd("EHLO client.example")
    assert send(s, SENDER, [RCPT])[-1].startswith("250 ")


def test_the_server_builds_its_greylist_from_the_config_with_the_saved_state(tmp_path):
    from mailsrv.config import DEFAULT_CONFIG, parse
    from mailsrv.service import build_context

    text = DEFAULT_CONFIG + (
        '[policy]\ngreylist = true\ngreylist_delay = "1m"\nallow = ["203.0.113.0/24"]\n'
        'greylist_allow = ["to:sales@"]\n'
    )
    config = parse(text, "<test>", tmp_path)
    state = config.server.data_dir / "greylist" / "state.json"
    state.parent.mkdir(parents=True)
    saved = greylist()
    saved.check("192.0.2.7", SENDER, RCPT)
    state.write_text(json.dumps(saved.snapshot()))
    reactor = MemoryReactorClock()
    ctx = build_context(config, reactor)
    g = ctx.greylist
    assert isinstance(g, Greylist)
    assert (g.settings.delay, g.settings.allow.recipients) == (60.0, {"sales@"})
    assert list(g.pending) == [("192.0.2.0/24", SENDER, RCPT)]
    assert g.check("203.0.113.5", SENDER, RCPT).why == "allowed network"
