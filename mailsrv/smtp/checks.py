"""
The checks a message passes at the end of DATA, before any copy of it is
delivered or queued: each is an L{IMessageCheck} that gives a L{Verdict}
on the spooled message, and L{run_checks} runs them in order and combines
what they say into the one verdict the delivery step acts on.

The order is that of L{message_checks}: what authenticates the message
(SPF, DKIM, DMARC) first, so that later checks can read its results; then
the checks on the sender's behaviour; the spam filter last, because it is
the dearest. A check that defers or rejects stops the run (nothing after it
is asked, nothing is delivered); a check that files into Junk does not,
and the message stays junk whatever later checks say; the header fields of
every check are added in check order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from zope.interface import Interface

from mailsrv.filter.verdict import ACCEPT, ACCEPTED, DEFER, JUNK, REJECT, Envelope, Verdict

__all__ = ["IMessageCheck", "combine", "message_checks", "run_checks"]

# How strongly each action keeps a message from its recipients' inboxes.
_SEVERITY = {ACCEPT: 0, JUNK: 1, DEFER: 2, REJECT: 3}


class IMessageCheck(Interface):
    """A check on a whole message at the end of DATA."""

    def check(message_source: Any, envelope: Envelope) -> Any:
        """
        A Deferred that fires with a L{Verdict} on C{message_source} (an
        L{mailsrv.interfaces.IMessageSource}, read with its C{open}), sent
        as C{envelope} says. A check handles its own failures and timeouts
        (it gives the verdict its configuration names); a failed Deferred
        defers the message (451).
        """


def combine(first: Verdict, second: Verdict) -> Verdict:
    """
    What two verdicts say together: the stronger action (with its reason),
    the header fields of both, C{first}'s first; the later score.
    """
    stronger = second if _SEVERITY[second.action] > _SEVERITY[first.action] else first
    return Verdict(
        action=stronger.action,
        headers=first.headers + second.headers,
        reason=stronger.reason,
        score=second.score if second.score is not None else first.score,
        refusal=stronger.refusal,
    )


def run_checks(
    checks: Sequence[Any], message_source: Any, envelope: Envelope
) -> defer.Deferred[Verdict]:
    """
    Run C{checks} (L{IMessageCheck} providers) in order on the message;
    fire with their combined verdict. A deferral or a rejection stops the
    run at once.
    """

    async def run() -> Verdict:
        verdict = ACCEPTED
        for check in checks:
            verdict = combine(
                verdict, await defer.maybeDeferred(check.check, message_source, envelope)
            )
            if verdict.reply is not None:
                break
        return verdict

    return defer.Deferred.fromCoroutine(run())


def message_checks(ctx: Any, submission: bool, duplicates: Any = None) -> list[Any]:
    """
    The checks, in order, for a message from an authenticated submission
    client (C{submission}) or from anyone at the MX. C{duplicates}: the
    message's own mass duplicate mail check (L{mailsrv.policy.duplicates}:
    per message, fed its body hash as DATA streams in), or None.
    """
    checks: list[Any] = []
    # SPF, DKIM, DMARC and ARC (mailsrv.authres): MX mail only, first.
    authentication = getattr(ctx, "authentication", None)
    if authentication is not None and not submission:
        checks.append(authentication)
    # The sender's behaviour: mass duplicate mail, on the MX and on submission.
    if duplicates is not None:
        checks.append(duplicates)
    # The spam filter: MX mail only (README, [filter]).
    spam_filter = getattr(ctx, "filter", None)
    if spam_filter is not None and not submission:
        checks.append(spam_filter)
    return checks
