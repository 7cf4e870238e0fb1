"""
Message and recipient rate limits ([policy] messages_per_hour,
recipients_per_hour): the sliding counters on a task.Clock, then SMTP
sessions on the MX and on submission (StringTransport), then the real
server on loopback driven by smtplib.
"""

from __future__ import annotations

import base64
import dataclasses
import smtplib
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from mailsrv.config import PolicyConfig, parse
from mailsrv.policy.rates import RateLimits, SlidingCounter, rate_keys

from .e2e import MailServer
from .test_smtp_helpers import PASSWORD, Session, make_context, read_inbox

HOUR = 3600.0
SLICE = 300.0  # an hour's slices are five minutes

# --- the counter ----------------------------------------------------------------------


def test_the_window_slides_an_event_is_forgotten_a_window_after_its_slice():
    clock = task.Clock()
    c = SlidingCounter(clock, limit=2)
    c.add("k")
    clock.advance(100)
    c.add("k")
    assert c.retry_after("k") == pytest.approx(SLICE + HOUR - 100)
    clock.advance(HOUR)  # an hour after the second: both still within the slice's hour
    assert c.count("k") == 2
    assert c.retry_after("k") == pytest.approx(SLICE + HOUR - 100 - HOUR)
    clock.advance(SLICE - 100)  # the first slice has expired: both were in it
    assert c.count("k") == 0
    assert c.retry_after("k") is None
    assert c.tracked() == 0


def test_the_oldest_slice_that_brings_the_count_under_the_limit_says_when_to_retry():
    clock = task.Clock()
    c = SlidingCounter(clock, limit=3)
    c.add("k")  # slice 0
    clock.advance(10 * 60)
    c.add("k")  # slice 2
    c.add("k")
    assert c.retry_after("k") == pytest.approx(SLICE + HOUR - 600)  # slice 0 expiring is enough
    clock.advance(SLICE + HOUR - 600)
    assert c.retry_after("k") is None
    c.add("k")
    assert c.count("k") == 3
    # Now the two of slice 2 must expire for the count to drop under 3.
    assert c.retry_after("k") == pytest.approx(3 * SLICE + HOUR - clock.seconds())


def test_no_more_than_the_limit_within_any_hour():
    clock = task.Clock()
    c = SlidingCounter(clock, limit=5)
    times: list[float] = []
    for _ in range(3000):  # one attempt a minute, for two days and more
        if c.retry_after("k") is None:
            c.add("k")
            times.append(clock.seconds())
        clock.advance(60)
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u - t < HOUR) <= 5
    assert len(times) >= 5 * 40  # and about the limit each hour (5 an hour, slices lose a bit)


def test_zero_is_no_limit_and_keeps_nothing():
    clock = task.Clock()
    c = SlidingCounter(clock, limit=0)
    for _ in range(100):
        c.add("k")
    assert c.retry_after("k") is None
    assert c.tracked() == 0


def test_a_spray_of_addresses_cannot_grow_the_table_past_its_bound():
    clock = task.Clock()
    c = SlidingCounter(clock, limit=10, max_tracked=1000)
    for i in range(20_000):
        c.add(f"ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert c.tracked() == 1000
    # The most recent are kept, the least recently counted evicted.
    assert c.count("ip:10.0.78.31") == 1  # 19_999
    assert c.count("ip:10.0.0.0") == 0


def test_expired_keys_are_swept_as_others_are_counted():
    clock = task.Clock()
    c = SlidingCounter(clock, limit=10)
    for i in range(500):
        c.add(f"old{i}")
    clock.advance(2 * HOUR)
    for i in range(500):
        c.add(f"new{i}")
    assert c.tracked() == 500  # every old key swept, two per count


def test_a_user_and_an_address_are_counted_apart():
    clock = task.Clock()
    limits = RateLimits(clock, messages_per_hour=2, recipients_per_hour=0)
    alice_at_home = rate_keys("192.0.2.1", "alice@example.test")
    alice_at_work = rate_keys("198.51.100.1", "Alice@Example.Test")
    bob_at_home = rate_keys("192.0.2.1", "bob@example.test")
    limits.count_message(alice_at_home)
    limits.count_message(alice_at_work)
    over = limits.message_refusal(alice_at_home)
    assert over is not None  # the user's two, from wherever
    assert over.reply.code == 451 and over.reply.enhanced == "4.7.1"
    assert "your account" in over.reply.text and "try again in 65 minutes" in over.reply.text
    assert over.cause == "messages_per_hour 2 reached by user:alice@example.test"
    assert limits.message_refusal(bob_at_home) is None  # the address has had one
    limits.count_message(bob_at_home)
    over = limits.message_refusal(rate_keys("192.0.2.1", "carol@example.test"))
    assert over is not None and "your address" in over.reply.text
    assert limits.recipient_refusal(alice_at_home) is None  # 0: no recipient limit
    clock.advance(64 * 60 + 30)
    over = limits.message_refusal(alice_at_home)
    assert over is not None and over.reply.text.endswith("try again in 1 minute")
    clock.advance(30)
    assert limits.message_refusal(alice_at_home) is None


def test_an_ipv6_client_is_counted_by_its_64():
    clock = task.Clock()
    limits = RateLimits(clock, messages_per_hour=1, recipients_per_hour=0)
    limits.count_message(rate_keys("2001:db8:1:2::1", None))
    assert limits.message_refusal(rate_keys("2001:db8:1:2::ffff", None)) is not None
    assert limits.message_refusal(rate_keys("2001:db8:1:3::1", None)) is None


# --- SMTP sessions --------------------------------------------------------------------


def limited(tmp_path: Path, messages: int = 0, recipients: int = 0):
    """A server context with the given limits, on a MemoryReactorClock."""
    reactor = MemoryReactorClock()
    reactor.advance(1_780_200_000.0)  # at the start of a slice
    base = make_context(tmp_path / "data", reactor=reactor)
    config = dataclasses.replace(
        base.config,
        policy=PolicyConfig(messages_per_hour=messages, recipients_per_hour=recipients),
    )
    rates = RateLimits(reactor, messages, recipients)
    return dataclasses.replace(base, config=config, rates=rates)


def deliver(s: Session, sender: str, rcpts: list[str]) -> list[str]:
    """One transaction: the replies to MAIL, each RCPT, and DATA's end (if any RCPT was taken)."""
    out = [s.cmd(f"MAIL FROM:<{sender}>")[0]]
    if not out[0].startswith("250 "):
        return out
    out += [s.cmd(f"RCPT TO:<{r}>")[0] for r in rcpts]
    if any(r.startswith("250 ") for r in out[1:]):
        assert s.cmd("DATA")[0].startswith("354 ")
        out += s.send("Subject: hi\r\n\r\nbody\r\n.\r\n")
    else:
        s.cmd("RSET")
    return out


@pytest.fixture
def events():
    out: list[dict] = []
    globalLogPublisher.addObserver(out.append)
    yield out
    globalLogPublisher.removeObserver(out.append)


def test_mx_refuses_a_clients_message_over_the_hourly_rate_with_451_4_7_1(tmp_path, events):
    ctx = limited(tmp_path, messages=2)
    s = Session(ctx, peer="192.0.2.7")
    s.cmd("EHLO client.example")
    for _ in range(2):
        assert deliver(s, "carol@origin.test", ["bob@example.test"])[-1].startswith("250 ")
    refused = s.cmd("MAIL FROM:<carol@origin.test>")
    assert refused == [
        "451 4.7.1 Too many messages from your address this hour, try again in 65 minutes"
    ]
    assert s.cmd("RCPT TO:<bob@example.test>")[0].startswith("503 ")  # no transaction
    lines = [formatEvent(e) for e in events if "reject sender" in formatEvent(e)]
    assert lines == [
        "reject sender <carol@origin.test> from 192.0.2.7: 451 4.7.1 Too many messages from "
        "your address this hour, try again in 65 minutes; sender=<None> "
        "(messages_per_hour 2 reached by ip:192.0.2.7)"
    ]
    # Another client is not held back; this one is taken again once the hour is over.
    other = Session(ctx, peer="198.51.100.9")
    other.cmd("EHLO other.example")
    assert deliver(other, "dan@origin.test", ["bob@example.test"])[-1].startswith("250 ")
    ctx.reactor.advance(65 * 60)
    s = Session(ctx, peer="192.0.2.7")
    s.cmd("EHLO client.example")
    assert deliver(s, "carol@origin.test", ["bob@example.test"])[-1].startswith("250 ")
    assert len(read_inbox(ctx, "bob@example.test")) == 4


def test_mx_refuses_recipients_over_the_rate_and_takes_the_rest_later(tmp_path, events):
    ctx = limited(tmp_path, recipients=2)
    s = Session(ctx)
    s.cmd("EHLO client.example")
    rcpts = ["alice@example.test", "nobody@example.test", "bob@example.test", "postmaster"]
    replies = deliver(s, "carol@origin.test", rcpts)
    assert [r[:9] for r in replies] == [
        "250 2.1.0",
        "250 2.1.5",
        "550 5.1.1",  # refused recipients are not counted
        "250 2.1.5",
        "451 4.7.1",  # the third accepted one: over; the client sends it later
        "250 2.0.0",
    ]
    assert "Too many recipients from your address this hour" in replies[4]
    assert len(read_inbox(ctx, "alice@example.test")) == 1
    assert len(read_inbox(ctx, "bob@example.test")) == 1
    assert sum("reject recipient <postmaster@" in formatEvent(e) for e in events) == 1
    ctx.reactor.advance(65 * 60)
    s = Session(ctx)
    s.cmd("EHLO client.example")
    assert deliver(s, "carol@origin.test", ["postmaster"])[-1].startswith("250 ")


def test_pipelined_recipients_are_counted_one_by_one(tmp_path):
    ctx = limited(tmp_path, recipients=2)
    s = Session(ctx)
    s.cmd("EHLO client.example")
    codes = s.codes(
        "MAIL FROM:<carol@origin.test>\r\n"  # RFC 2920: one send, the replies in order
        "RCPT TO:<alice@example.test>\r\n"
        "RCPT TO:<bob@example.test>\r\n"
        "RCPT TO:<postmaster@example.test>\r\n"
    )
    assert codes == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "451 4.7.1"]


def test_a_bounce_to_postmaster_is_never_held_back_by_a_rate(tmp_path):
    ctx = limited(tmp_path, messages=1, recipients=1)
    s = Session(ctx)
    s.cmd("EHLO client.example")
    assert deliver(s, "carol@origin.test", ["bob@example.test"])[-1].startswith("250 ")
    assert s.cmd("MAIL FROM:<carol@origin.test>")[0].startswith("451 4.7.1")
    # RFC 5321 4.5.1: from <>, postmaster is taken; any other recipient is not.
    replies = deliver(s, "", ["bob@example.test", "Postmaster"])
    assert [r[:9] for r in replies] == ["250 2.1.0", "451 4.7.1", "250 2.1.5", "250 2.0.0"]
    assert "Too many messages" in replies[1]
    assert len(read_inbox(ctx, "postmaster@example.test")) == 1


def submit_session(ctx, user: str, peer: str = "127.0.0.1") -> Session:
    s = Session(ctx, submission=True, peer=peer)
    s.cmd("EHLO client.example")
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    assert s.cmd(f"AUTH PLAIN {token}") == ["235 2.7.0 Authentication successful"]
    return s


def test_submission_counts_the_user_wherever_it_connects_from(tmp_path):
    ctx = limited(tmp_path, messages=2)
    # Two addresses of loopback's /8: each a client address of its own.
    first = submit_session(ctx, "alice@example.test", peer="127.0.0.1")
    assert deliver(first, "alice@example.test", ["bob@example.test"])[-1].startswith("250 ")
    second = submit_session(ctx, "alice@example.test", peer="127.0.0.2")
    assert deliver(second, "alice@example.test", ["bob@example.test"])[-1].startswith("250 ")
    third = submit_session(ctx, "alice@example.test", peer="127.0.0.3")
    assert third.cmd("MAIL FROM:<alice@example.test>") == [
        "451 4.7.1 Too many messages from your account this hour, try again in 65 minutes"
    ]
    # Bob, from one of the same addresses, is under both of his limits.
    bob = submit_session(ctx, "bob@example.test", peer="127.0.0.3")
    assert deliver(bob, "bob@example.test", ["alice@example.test"])[-1].startswith("250 ")


def test_submission_counts_the_address_across_users(tmp_path):
    ctx = limited(tmp_path, recipients=2)
    alice = submit_session(ctx, "alice@example.test")
    replies = deliver(alice, "alice@example.test", ["bob@example.test", "bob@example.test"])
    assert replies[-1].startswith("250 ")  # a RCPT repeated is one recipient
    bob = submit_session(ctx, "bob@example.test")
    replies = deliver(bob, "bob@example.test", ["alice@example.test", "postmaster@example.test"])
    assert replies[1].startswith("250 ")
    assert replies[2] == (
        "451 4.7.1 Too many recipients from your address this hour, try again in 65 minutes"
    )


def test_without_limits_nothing_is_counted(tmp_path):
    ctx = limited(tmp_path)
    s = Session(ctx)
    s.cmd("EHLO client.example")
    for _ in range(30):
        assert deliver(s, "carol@origin.test", ["bob@example.test"])[-1].startswith("250 ")
    assert ctx.rates is not None
    assert ctx.rates.messages.tracked() == ctx.rates.recipients.tracked() == 0


# --- config ---------------------------------------------------------------------------


def test_the_policy_limits_default_to_none_and_are_read():
    assert parse("").policy == PolicyConfig(messages_per_hour=0, recipients_per_hour=0)
    config = parse("[policy]\nmessages_per_hour = 100\nrecipients_per_hour = 500\n")
    assert config.policy == PolicyConfig(messages_per_hour=100, recipients_per_hour=500)


def test_a_negative_limit_is_refused_naming_the_key():
    with pytest.raises(Exception, match="policy.messages_per_hour"):
        parse("[policy]\nmessages_per_hour = -1\n")


# --- the real server ------------------------------------------------------------------


def test_the_server_refuses_over_the_rate_on_loopback(tmp_path):
    extra = "[policy]\nmessages_per_hour = 2\nrecipients_per_hour = 3\n"
    with MailServer(tmp_path, extra=extra) as server:  # started; stopped even if a step fails
        server.add_user("alice@example.test")
        server.add_user("bob@example.test")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=20) as client:
            client.ehlo("client.example")
            message = b"Subject: hi\r\n\r\nbody\r\n"
            refused = client.sendmail(
                "carol@origin.test",
                ["alice@example.test", "bob@example.test", "nobody@example.test"],
                message,
            )
            assert refused == {"nobody@example.test": (550, refused["nobody@example.test"][1])}
            assert client.sendmail("carol@origin.test", ["alice@example.test"], message) == {}
            # Three recipients taken this hour: the next is refused, the message too.
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                client.sendmail("carol@origin.test", ["bob@example.test"], message)
            assert e.value.smtp_code == 451
            assert e.value.smtp_error.startswith(b"4.7.1 Too many messages from your address")
        assert server.inbox("alice@example.test").read_bytes().count(b"\nSubject: hi") == 2
        assert server.inbox("bob@example.test").read_bytes().count(b"\nSubject: hi") == 1
