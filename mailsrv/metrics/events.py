"""
Counts from the log events the server writes anyway, as postfix_exporter
counts from Postfix's log: the events of L{mailsrv.loglines}, the SMTP
server's C{reject ...} and C{NOQUEUE: reject: ...} (L{mailsrv.smtp.refusallog}),
C{accepted ...} and C{to=<...>, relay=local}
events, the spam filter's verdicts and the refusals at connect carry named
fields, so the protocols need no code of their own for these metrics.

Only structured events are read (their C{log_format} and fields, never the
formatted text): a line's wording can change without breaking a count as
long as its fields stay.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver
from zope.interface import implementer

from mailsrv import loglines
from mailsrv.metrics.registry import MailMetrics
from mailsrv.smtp.refusallog import NOQUEUE_REJECT

# The RCPT/MAIL/DATA refusal of the SMTP server (mailsrv.smtp.server._refused).
_REJECT_PREFIX = "reject {what} <{address}> from {client}"
# Refusals at connect: a DNS list's listing, postscreen's pregreet test.
_BLOCKED_PREFIX = "refused {client} on {listener}: blocked using"
_PREGREET_PREFIX = "refused {client} on {listener}: pregreet"
_FILTER_VERDICT = "{queue_id}: filter verdict {action} score={score}"
_FILTER_FAILED = "{queue_id}: spam filter failed ({why}); message {outcome}"
_POP3_LOGIN_PREFIX = "pop3-login: {result}:"
_EXPIRED_PREFIX = "{queue_id}: to=<{rcpt}>, status=expired"

# (enhanced status code or None, words in the reply text, reason), first match wins.
_REASONS: tuple[tuple[str | None, str, str], ...] = (
    ("5.1.1", "", "unknown_user"),  # RFC 3463 3.2: bad destination mailbox
    (None, "relay access denied", "relay_denied"),
    (None, "authentication required", "auth_required"),
    ("5.7.0", "authentication", "auth_required"),
    ("5.3.4", "", "size"),  # RFC 3463 3.4: message too big for system
    ("5.2.3", "", "size"),
    (None, "greylisted", "greylist"),
    (None, "as spam", "filter"),
    (None, "content filter", "filter"),
    (None, "mass mail", "duplicate"),
    (None, "the same message to more than", "duplicate"),
    (None, "too many messages from", "rate_limit"),
    (None, "too many recipients from", "rate_limit"),
    (None, "client host rejected", "policy"),
    (None, "blocked using", "policy"),
    (None, "spf", "sender_authentication"),
    (None, "dmarc", "sender_authentication"),
    (None, "not owned", "sender_not_owned"),
    (None, "too many recipients", "too_many_recipients"),
    (None, "mailbox full", "quota"),
)


def reject_reason(reply: str) -> str:
    """
    The reason label of a refusal from its reply (C{"550 5.1.1 No such user
    here"}): what the client was told, so that the label matches what a
    sender sees. Others: C{temporary} (4xx) or C{other} (5xx).
    """
    parts = reply.split(None, 2)
    enhanced = parts[1] if len(parts) > 1 and parts[1][:1].isdigit() else None
    text = reply.lower()
    for code, words, reason in _REASONS:
        if code is not None and code != enhanced:
            continue
        if words and words not in text:
            continue
        return reason
    return "temporary" if reply.startswith("4") else "other"


def _service(event: dict[str, Any], default: str) -> str:
    source = event.get("log_source")
    if getattr(source, "submission", False):
        return "submission"
    service = event.get("service")
    return service if isinstance(service, str) and service else default


@implementer(ILogObserver)
class MetricsObserver:
    """A log observer that counts the events of this process into C{metrics}."""

    # Not a log of its own: the relay process may still write its lines to
    # standard output itself (mailsrv.outbound.process.logs_to_stdout).
    counts_only = True

    def __init__(self, metrics: MailMetrics) -> None:
        self.metrics = metrics

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self._count(event)
        except Exception:  # a count must never break logging
            pass

    def _count(self, event: dict[str, Any]) -> None:
        m = self.metrics
        fmt = event.get("log_format")
        if not isinstance(fmt, str):
            return
        if fmt == "{text}":
            if "outbound" in event and "recipients" in event and "queue_id" in event:
                m.received.labels(_service(event, "smtp")).inc()
            elif isinstance(event.get("relay"), str) and "result" in event:
                # The session's own deliveries to local mailboxes (and an
                # in-process relayer's results); the relay process's results
                # arrive in its Counted command (mailsrv.metrics.relaycounts).
                m.delivery_result(event["relay"], str(event["result"]))
        elif fmt.startswith(_EXPIRED_PREFIX):
            m.delivery_result("none", "bounced")
        elif fmt.startswith(_REJECT_PREFIX):
            m.rejected.labels(reject_reason(str(event.get("reply", "")))).inc()
        elif fmt == NOQUEUE_REJECT:  # MAIL/RCPT refused before its checks: size, syntax
            reason = event.get("reason")
            if not isinstance(reason, str):
                reason = reject_reason(str(event.get("reply", "")))
            m.rejected.labels(reason).inc()
        elif fmt.startswith(_BLOCKED_PREFIX):
            m.rejected.labels("policy").inc()
        elif fmt.startswith(_PREGREET_PREFIX):
            m.rejected.labels("pregreet").inc()
        elif fmt == _FILTER_VERDICT:
            m.filter_verdicts.labels(str(event.get("action"))).inc()
        elif fmt == _FILTER_FAILED:
            m.filter_verdicts.labels("failed").inc()
        elif fmt == loglines.LOGIN_OK:
            m.logins.labels(_service(event, "imap")).inc()
        elif fmt in (loglines.LOGIN_FAILED, loglines.LOGIN_THROTTLED):
            m.login_failures.labels(_service(event, "imap")).inc()
        elif fmt == loglines.SMTP_AUTH_OK:
            m.logins.labels(_service(event, "smtp")).inc()
        elif fmt == loglines.SMTP_AUTH_FAILED:
            m.login_failures.labels(_service(event, "smtp")).inc()
        elif fmt.startswith(_POP3_LOGIN_PREFIX) and event.get("result") == "ok":
            m.logins.labels("pop3").inc()
