"""
The end-of-DATA checks (mailsrv.smtp.checks): verdicts combined in order,
a deferral or rejection stops the run, and what the filters are told.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv.filter.step import FilterStep
from mailsrv.filter.verdict import ACCEPT, DEFER, JUNK, REJECT, Envelope, Verdict
from mailsrv.replies import Reply
from mailsrv.smtp.checks import IMessageCheck, combine, run_checks

from .test_filter import ScriptedFilter, filtered, send

ENVELOPE = Envelope("Q1", "bob@remote.test", ("alice@example.test",), "192.0.2.7")


@implementer(IMessageCheck)
class Fixed:
    """A check that always says C{verdict}, and counts how often it was asked."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.asked = 0

    def check(self, message_source: Any, envelope: Envelope) -> defer.Deferred:
        self.asked += 1
        return defer.succeed(self.verdict)


def _result(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    [value] = out
    return value


def test_checks_and_the_filter_step_provide_the_interface():
    verifyObject(IMessageCheck, Fixed(Verdict()))
    verifyObject(IMessageCheck, FilterStep(ScriptedFilter(), None, 30, "accept"))


def test_headers_add_up_in_order_and_junk_sticks():
    first = Fixed(Verdict(JUNK, headers=b"A: 1\n", score=1.0))
    second = Fixed(Verdict(ACCEPT, headers=b"B: 2\n"))
    verdict = _result(run_checks([first, second], None, ENVELOPE))
    assert verdict.action == JUNK
    assert verdict.headers == b"A: 1\nB: 2\n"
    assert verdict.score == 1.0 and verdict.reply is None


def test_a_deferral_or_rejection_stops_the_run():
    for action in (DEFER, REJECT):
        stop = Fixed(Verdict(action, headers=b"A: 1\n"))
        after = Fixed(Verdict(REJECT))
        verdict = _result(run_checks([Fixed(Verdict()), stop, after], None, ENVELOPE))
        assert verdict.action == action and after.asked == 0
        assert verdict.reply is not None


def test_a_check_names_its_own_refusal():
    mine = Reply(550, "5.7.1", "Too many copies of one message")
    verdict = combine(Verdict(JUNK), Verdict(REJECT, refusal=mine))
    assert verdict.reply == mine
    # Without a refusal of its own, the filter's replies as before.
    assert Verdict(DEFER).reply is not None and Verdict(DEFER).reply.code == 451
    assert Verdict(JUNK, refusal=mine).reply is None


def test_no_checks_accept():
    assert _result(run_checks([], None, ENVELOPE)).action == ACCEPT


def test_the_filter_is_told_the_helo_name():
    s, client = filtered(Verdict(ACCEPT))
    assert send(s)[0].startswith("250 ")
    [(_, envelope)] = client.seen
    assert envelope.helo == "client.example"
