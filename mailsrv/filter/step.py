"""
The filter step as the SMTP server runs it: the configured client
(L{build_filter}), bounded by a timeout on the clock passed in; a failure
or a timeout gives the verdict C{on_failure} names (accept, or defer with
451 4.7.1), and is logged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.filter.verdict import (
    ACCEPTED,
    DEFER,
    FILTER_FIELD_PREFIXES,
    JUNK,
    Envelope,
    IFilter,
    Thresholds,
    Verdict,
)
from mailsrv.smtp.checks import IMessageCheck
from mailsrv.store.names import INBOX

JUNK_FOLDER = "Junk"  # Dovecot's and Thunderbird's name; a special folder of IMAP
__all__ = ["ACCEPTED", "Envelope", "FilterStep", "Verdict", "build_filter", "filed"]


@implementer(IMessageCheck)
class FilterStep:
    """Runs C{client} on each message; always fires with a L{Verdict}."""

    log = Logger()

    def __init__(self, client: IFilter, clock: Any, timeout: float, on_failure: str) -> None:
        self.client = client
        self.clock = clock
        self.timeout = timeout
        self.on_failure = on_failure

    def check(self, message_source: Any, envelope: Envelope) -> defer.Deferred:
        """The verdict on the message, within the timeout."""
        d = defer.maybeDeferred(self.client.check, message_source, envelope)
        d.addTimeout(self.timeout, self.clock)
        d.addCallback(self._checked, envelope)
        d.addErrback(self._failed, envelope)
        return d

    def _checked(self, verdict: Verdict, envelope: Envelope) -> Verdict:
        self.log.info(
            "{queue_id}: filter verdict {action} score={score}",
            queue_id=envelope.queue_id,
            action=verdict.action,
            score=verdict.score,
        )
        return verdict

    def _failed(self, failure: Failure, envelope: Envelope) -> Verdict:
        if failure.check(defer.TimeoutError):
            why = f"no answer within {self.timeout:g}s"
        else:
            why = failure.getErrorMessage()
        self.log.warn(
            "{queue_id}: spam filter failed ({why}); message {outcome}",
            queue_id=envelope.queue_id,
            why=why,
            outcome="deferred" if self.on_failure == "defer" else "accepted unscanned",
        )
        return Verdict(DEFER) if self.on_failure == "defer" else ACCEPTED


def build_filter(config: Any, reactor: Any) -> FilterStep | None:
    """The filter step C{config} (a L{mailsrv.config.FilterConfig}) names, or None."""
    if config is None:
        return None
    thresholds = Thresholds(junk=config.junk_score, reject=config.reject_score)
    client: IFilter
    if config.rspamd is not None:
        from mailsrv.filter.rspamd import RspamdFilter

        client = RspamdFilter(reactor, config.rspamd, thresholds)
    elif config.spamd is not None:
        from mailsrv.filter.spamd import SpamdFilter

        host, port = config.spamd
        client = SpamdFilter(reactor, host, port, thresholds)
    elif config.command is not None:
        from mailsrv.filter.command import CommandFilter

        client = CommandFilter(reactor, config.command)
    else:
        return None
    return FilterStep(client, reactor, config.timeout, config.on_failure)


def is_filter_field(lname: bytes) -> bool:
    """Whether a header field (its lower-case name) is one a filter adds."""
    return lname.startswith(FILTER_FIELD_PREFIXES)


def filed(route: Any, verdict: Verdict) -> Any:
    """
    C{route} (a local mailbox) as C{verdict} files it: junk goes to the
    user's Junk folder when the user has one, else to the INBOX (the store
    never makes a folder; IMAP makes Junk at the user's first login).
    """
    if verdict.action != JUNK or route.folder != INBOX:
        return route
    return dataclasses.replace(route, detail=JUNK_FOLDER)
