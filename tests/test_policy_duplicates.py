"""
Mass duplicate mail ([policy] duplicate_recipients, duplicate_window,
mailing_lists): the body hash, the distinct-recipient counter on a
task.Clock, the verdicts, then SMTP sessions on the MX and on submission
(StringTransport) with the address rules' list aliases.
"""

from __future__ import annotations

import base64
import dataclasses

import pytest
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from mailsrv.config import DEFAULT_CONFIG, PolicyConfig, parse
from mailsrv.filter.step import FilterStep
from mailsrv.filter.verdict import ACCEPT, DEFER, REJECT, Envelope, Verdict
from mailsrv.policy.duplicates import (
    BodyDigest,
    DistinctCounter,
    DuplicateCheck,
    DuplicateMail,
    MailingLists,
    build_duplicates,
)
from mailsrv.service import build_context
from mailsrv.smtp.checks import IMessageCheck, message_checks

from .test_addresses_smtp import Server
from .test_filter import ScriptedFilter
from .test_smtp_helpers import PASSWORD, Session, make_context, read_inbox

HOUR = 3600.0
SLICE = HOUR / 12

BODY = b"Buy cheap watches now!\nVisit http://watches.example/\n"


def digest(body: bytes = BODY, list_id: bytes | None = None) -> BodyDigest:
    d = BodyDigest()
    if list_id is not None:
        d.list_id_field(list_id)
    d.update(body)
    return d


def rcpts(start: int, n: int, domain: str = "example.test") -> tuple[str, ...]:
    return tuple(f"u{i}@{domain}" for i in range(start, start + n))


def envelope(
    recipients: tuple[str, ...],
    sender: str = "spammer@origin.test",
    client: str = "192.0.2.7",
    user: str | None = None,
) -> Envelope:
    return Envelope("Q1", sender, recipients, client, user=user)


def verdict(dup: DuplicateMail, env: Envelope, body: BodyDigest | None = None) -> str:
    return dup.verdict(env, body or digest(), env.recipients).action


@pytest.fixture
def events():
    out: list[dict] = []
    globalLogPublisher.addObserver(out.append)
    yield out
    globalLogPublisher.removeObserver(out.append)


# --- the body hash ---------------------------------------------------------------------


def mime(boundary: str, crlf: bool = False, wrap: int = 40, upper: bool = False) -> bytes:
    """One generated multipart message body: its boundary, line ends, wrapping, case."""
    text = "Dear customer, our watches are the cheapest on the whole wide Internet. " * 3
    text = text.upper() if upper else text
    lines = [text[i : i + wrap] + "=" for i in range(0, len(text), wrap)]  # QP soft breaks
    html = base64.b64encode(b"<p>" + text.encode() + b"</p>").decode()
    html_lines = [html[i : i + wrap] for i in range(0, len(html), wrap)]
    inner = boundary + "-alt"
    parts = [
        "This is a multi-part message in MIME format.",
        f"--{boundary}",
        f'Content-Type: multipart/alternative; boundary="{inner}"',
        "",
        f"--{inner}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
        *lines,
        f"--{inner}",
        "Content-Type: text/html",
        "Content-Transfer-Encoding: base64",
        "",
        *html_lines,
        f"--{inner}--",
        f"--{boundary}--",
        "",
    ]
    end = "\r\n" if crlf else "\n"
    return end.join(parts).encode()


def test_copies_with_other_boundaries_line_ends_wrapping_and_case_hash_alike():
    first = digest(mime("=_a1b2c3"))
    for other in (
        mime("----=_Part_99_1234.5678"),
        mime("=_a1b2c3", crlf=True),
        mime("=_zz", wrap=64),
    ):
        assert digest(other).digest() == first.digest()
    # Fed as blocks of lines or line by line (the two paths DATA takes): the same.
    by_line = BodyDigest()
    for line in mime("=_q").splitlines(keepends=True):
        by_line.update(line)
    assert by_line.digest() == first.digest()
    spaced = digest(b"Buy  CHEAP\twatches now!\r\n\n  Visit http://watches.example/  \n")
    assert spaced.digest() == digest().digest()
    # Text in another case, but base64 of it is another text.
    assert digest(mime("=_a1b2c3", upper=True)).digest() != first.digest()


def test_different_bodies_hash_apart_and_an_empty_body_counts_for_nothing():
    assert digest(b"Buy cheap clocks now!\n").digest() != digest().digest()
    assert digest(mime("=_a", upper=False)).digest() != digest(BODY).digest()
    assert digest(b"\n  \n\t\n").empty
    assert digest(b"--boundary--\n").empty
    dup = DuplicateMail(task.Clock(), 2, HOUR)
    empty = digest(b"\n")
    for i in range(5):
        assert verdict(dup, envelope(rcpts(3 * i, 3)), empty) == ACCEPT
    assert dup.counter.tracked() == 0


# --- the counter ------------------------------------------------------------------------


def test_distinct_recipients_are_counted_once_and_forgotten_a_window_after_their_slice():
    clock = task.Clock()
    c = DistinctCounter(clock, HOUR)
    c.add("k", ["a", "b"])
    clock.advance(SLICE + 100)
    c.add("k", ["b", "c"])  # b again: once, now in the second slice
    assert c.count("k") == 3
    assert c.count("k", ["c", "d"]) == 4
    clock.advance(HOUR - 100 - 1)
    assert c.count("k") == 3  # a window after the end of the first slice, less a second
    clock.advance(1)
    assert c.count("k") == 2  # a is forgotten, b and c were sent to since
    clock.advance(SLICE)
    assert c.count("k") == 0
    assert c.tracked() == 0 and c.keys() == 0


def test_memory_is_bounded_under_a_spray_of_messages():
    clock = task.Clock()
    dup = DuplicateMail(clock, 50, HOUR, max_members=1000, max_marks=10)
    for i in range(2000):
        body = digest(b"message %d\n" % i)
        dup.verdict(envelope(rcpts(0, 3), client=f"10.0.{i // 250}.{i % 250}"), body, rcpts(0, 3))
        assert dup.counter.tracked() <= 1000
    for i in range(30):
        env = envelope(rcpts(0, 51), sender=f"s{i}@origin.test", client=f"192.0.2.{i}")
        assert verdict(dup, env) == DEFER
    assert dup.marks() <= 10
    # Expired keys are swept as others are counted.
    clock.advance(2 * HOUR)
    for i in range(600):
        dup.verdict(envelope(("x@example.test",)), digest(b"late %d\n" % i), ("x@example.test",))
    assert dup.counter.tracked() <= 2 * 600


# --- the verdicts -----------------------------------------------------------------------


def test_n_recipients_pass_one_more_is_deferred_then_refused_on_retry(events):
    clock = task.Clock()
    dup = DuplicateMail(clock, 50, HOUR)
    for i in range(5):
        assert verdict(dup, envelope(rcpts(10 * i, 10))) == ACCEPT
    crossing = envelope(rcpts(50, 10))
    first = dup.verdict(crossing, digest(), crossing.recipients)
    assert first.action == DEFER
    assert first.reply is not None
    assert (first.reply.code, first.reply.enhanced) == (451, "4.7.1")
    assert first.reply.text == (
        "The same message to more than 50 recipients within 1h: deferred; if it is a "
        "mailing list, ask the postmaster to allow it, else try later"
    )
    clock.advance(600)  # the client's retry
    second = dup.verdict(crossing, digest(), crossing.recipients)
    assert second.action == REJECT
    assert second.reply is not None
    assert (second.reply.code, second.reply.enhanced) == (550, "5.7.1")
    assert "refused as mass mail" in second.reply.text
    # Those already sent to may have it again (no new recipient); another body is apart.
    assert verdict(dup, envelope(rcpts(0, 50))) == ACCEPT
    assert verdict(dup, envelope(rcpts(50, 10)), digest(b"another text\n")) == ACCEPT
    lines = [formatEvent(e) for e in events if "duplicate mail" in formatEvent(e)]
    prefix = digest().digest().hex()[:12]
    assert lines == [
        f"Q1: duplicate mail deferred: 60 distinct recipients of body {prefix} by "
        "sender:spammer@origin.test within 1h (limit 50)",
        f"Q1: duplicate mail refused: 60 distinct recipients of body {prefix} by "
        "sender:spammer@origin.test within 1h (limit 50)",
    ]


def test_once_the_window_has_passed_the_message_is_taken_again():
    clock = task.Clock()
    dup = DuplicateMail(clock, 5, HOUR)
    assert verdict(dup, envelope(rcpts(0, 5))) == ACCEPT
    assert verdict(dup, envelope(rcpts(5, 1))) == DEFER
    clock.advance(HOUR + SLICE)
    assert verdict(dup, envelope(rcpts(5, 5))) == ACCEPT  # deferred first again, not refused
    assert verdict(dup, envelope(rcpts(10, 1))) == DEFER


def test_one_sender_from_many_clients_and_many_senders_from_one_client_are_counted():
    dup = DuplicateMail(task.Clock(), 4, HOUR)
    for i in range(4):  # one sender, each recipient from another client
        env = envelope(rcpts(i, 1), client=f"198.51.100.{i}")
        assert verdict(dup, env) == ACCEPT
    assert verdict(dup, envelope(rcpts(4, 1), client="198.51.100.99")) == DEFER
    for i in range(4):  # many senders, one client
        env = envelope(rcpts(10 + i, 1), sender=f"s{i}@origin.test", client="203.0.113.5")
        assert verdict(dup, env) == ACCEPT
    assert verdict(dup, envelope(rcpts(20, 1), sender="z@o.test", client="203.0.113.5")) == DEFER
    # An IPv6 client by its /64.
    for i in range(4):
        env = envelope(rcpts(30 + i, 1), sender=f"v{i}@o.test", client=f"2001:db8::{i + 1}")
        assert verdict(dup, env) == ACCEPT
    env = envelope(rcpts(40, 1), sender="w@o.test", client="2001:db8::ffff:1")
    assert verdict(dup, env) == DEFER


def test_submission_counts_the_user_wherever_it_connects_from():
    dup = DuplicateMail(task.Clock(), 3, HOUR)
    for i in range(3):
        env = envelope(rcpts(i, 1), sender=f"alias{i}@example.test", client=f"10.0.0.{i}")
        assert verdict(dup, dataclasses.replace(env, user="alice@example.test")) == ACCEPT
    env = envelope(rcpts(3, 1), sender="other@example.test", client="10.9.9.9")
    assert verdict(dup, dataclasses.replace(env, user="Alice@example.test")) == DEFER


def test_bounces_are_not_counted_under_the_null_sender_but_under_their_client():
    dup = DuplicateMail(task.Clock(), 3, HOUR)
    dsn = digest(b"Your message could not be delivered.\n")
    for i in range(10):  # the same notice from ten servers, each to one of ours
        env = envelope(rcpts(i, 1), sender="", client=f"198.51.100.{i}")
        assert verdict(dup, env, dsn) == ACCEPT
    for i in range(3):
        assert verdict(dup, envelope(rcpts(20 + i, 1), sender="", client="192.0.2.66"), dsn) == (
            ACCEPT
        )
    # One server sending one identical notice to more than N of ours: backscatter.
    assert verdict(dup, envelope(rcpts(30, 1), sender="", client="192.0.2.66"), dsn) == DEFER


def test_mailing_list_entries_let_a_message_through():
    lists = MailingLists.parse(
        [
            "news@lists.example.org",
            "@bounces.example.net",
            "198.51.100.0/24",
            "2001:db8:5::/48",
            "Staff <staff.example.org>",
            "announce.example.com",
        ]
    )
    dup = DuplicateMail(task.Clock(), 2, HOUR, lists)
    many = rcpts(0, 10)
    assert verdict(dup, envelope(many, sender="News@Lists.example.org")) == ACCEPT
    assert verdict(dup, envelope(many, sender="b+u1=x@bounces.example.net")) == ACCEPT
    assert verdict(dup, envelope(many, client="198.51.100.200")) == ACCEPT
    assert verdict(dup, envelope(many, client="2001:db8:5:1::9")) == ACCEPT
    assert verdict(dup, envelope(many, client="::ffff:198.51.100.7")) == ACCEPT
    folded = digest(list_id=b" The staff list\n\t<Staff.Example.org>")
    assert verdict(dup, envelope(many), folded) == ACCEPT
    assert verdict(dup, envelope(many), digest(list_id=b" <announce.example.com>")) == ACCEPT
    assert dup.counter.tracked() == 0
    # Anything else is counted.
    assert verdict(dup, envelope(many), digest(list_id=b" <other.example.org>")) == DEFER
    assert verdict(dup, envelope(many, sender="x@lists.example.org", client="10.1.1.1")) == DEFER


def test_zero_turns_the_check_off():
    assert build_duplicates(PolicyConfig(duplicate_recipients=0), task.Clock()) is None
    dup = build_duplicates(PolicyConfig(mailing_lists=("10.0.0.0/8",)), task.Clock())
    assert dup is not None
    assert (dup.limit, dup.window) == (50, 3600)
    assert verdict(dup, envelope(rcpts(0, 60), client="10.2.3.4")) == ACCEPT
    assert verdict(dup, envelope(rcpts(0, 60))) == DEFER


# --- SMTP sessions ----------------------------------------------------------------------

MESSAGE = "From: {sender}\r\nSubject: {subject}\r\n\r\nBuy cheap watches now!\r\n"


def transaction(s: Session, sender: str, to: list[str], subject: str = "offer") -> list[str]:
    """MAIL, each RCPT, DATA: the reply to the final dot."""
    assert s.cmd(f"MAIL FROM:<{sender}>")[0].startswith("250 ")
    for r in to:
        assert s.cmd(f"RCPT TO:<{r}>")[0].startswith("250 "), r
    assert s.cmd("DATA")[0].startswith("354 ")
    return s.send(MESSAGE.format(sender=sender, subject=subject) + ".\r\n")


def test_mx_defers_then_refuses_the_message_that_crosses_the_limit(tmp_path, events):
    base = make_context(tmp_path / "data")
    ctx = dataclasses.replace(base, duplicates=DuplicateMail(base.reactor, 2, HOUR))
    s = Session(ctx)
    s.cmd("EHLO client.example")
    assert transaction(s, "spammer@origin.test", ["alice@example.test"])[0].startswith("250 ")
    assert transaction(s, "spammer@origin.test", ["bob@example.test"])[0].startswith("250 ")
    crossing = ["postmaster@example.test"]
    assert transaction(s, "spammer@origin.test", crossing) == [
        "451 4.7.1 The same message to more than 2 recipients within 1h: deferred; if it is "
        "a mailing list, ask the postmaster to allow it, else try later"
    ]
    assert transaction(s, "spammer@origin.test", crossing)[0].startswith("550 5.7.1 The same ")
    assert read_inbox(ctx, "postmaster@example.test") == []
    assert len(read_inbox(ctx, "alice@example.test")) == 1
    rejects = [formatEvent(e) for e in events if "reject message" in formatEvent(e)]
    assert len(rejects) == 2 and "(message checks: defer)" in rejects[0]


def test_submission_defers_then_refuses_and_queues_nothing(tmp_path):
    base = make_context(tmp_path / "data")
    ctx = dataclasses.replace(base, duplicates=DuplicateMail(base.reactor, 3, HOUR))
    s = Session(ctx, submission=True, peer="127.0.0.1")
    s.cmd("EHLO client.example")
    token = base64.b64encode(f"\0alice@example.test\0{PASSWORD}".encode()).decode()
    assert s.cmd(f"AUTH PLAIN {token}")[0].startswith("235 ")
    sender = "alice@example.test"
    assert transaction(s, sender, ["a@remote.test", "b@remote.test"])[0].startswith("250 ")
    assert transaction(s, sender, ["c@remote.test"])[0].startswith("250 ")
    assert transaction(s, sender, ["c@remote.test", "d@remote.test"])[0].startswith("451 4.7.1")
    assert transaction(s, sender, ["d@remote.test"])[0].startswith("550 5.7.1")
    queued = [rcpts for _, rcpts, _ in ctx.queue.queued]  # type: ignore[union-attr]
    assert queued == [["a@remote.test", "b@remote.test"], ["c@remote.test"]]


def test_list_aliases_are_not_counted(tmp_path):
    # staff and quiet are list aliases (with and without a List-Id); team is a plain alias.
    server = Server(tmp_path)
    server.ctx = dataclasses.replace(server.ctx, duplicates=DuplicateMail(server.reactor, 1, HOUR))
    s = server.mx()
    to = ["staff@example.test", "quiet@example.test", "alice@example.test"]
    assert transaction(s, "news@origin.test", to)[0].startswith("250 ")
    assert len(server.inbox("bob@example.test")) == 1  # through both lists: one copy
    assert len(server.inbox("alice@example.test")) == 1
    assert transaction(s, "news@origin.test", ["team@example.test"])[0].startswith("451 4.7.1")


def test_the_check_runs_on_both_listeners_before_the_spam_filter(tmp_path):
    dup = DuplicateMail(task.Clock(), 1, HOUR)
    check = dup.message()
    verifyObject(IMessageCheck, check)
    assert isinstance(check, DuplicateCheck)
    spam = ScriptedFilter(Verdict(ACCEPT))
    base = make_context(tmp_path / "data")
    ctx = dataclasses.replace(
        base, duplicates=dup, filter=FilterStep(spam, base.reactor, 30, "accept")
    )
    assert message_checks(ctx, submission=False, duplicates=check) == [check, ctx.filter]
    assert message_checks(ctx, submission=True, duplicates=check) == [check]
    s = Session(ctx)
    s.cmd("EHLO client.example")
    assert transaction(s, "a@origin.test", ["alice@example.test"])[0].startswith("250 ")
    to = ["bob@example.test"]
    assert transaction(s, "a@origin.test", to)[0].startswith("451 4.7.1 The same message")
    assert len(spam.seen) == 1  # the filter was not asked about the deferred message


def test_the_server_context_builds_the_check_from_the_config(tmp_path):
    ctx = build_context(parse(DEFAULT_CONFIG, "<default>", tmp_path), MemoryReactorClock())
    assert ctx.duplicates is not None
    assert (ctx.duplicates.limit, ctx.duplicates.window) == (50, 3600)
    off = DEFAULT_CONFIG + "[policy]\nduplicate_recipients = 0\n"
    assert build_context(parse(off, "<default>", tmp_path), MemoryReactorClock()).duplicates is None
