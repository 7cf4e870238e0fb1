"""
What a spam filter says about a message (L{Verdict}), the seam every filter
client implements (L{IFilter}), and the rules that turn a score or a
daemon's action into a verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zope.interface import Interface

from mailsrv.replies import Reply

ACCEPT = "accept"  # deliver (with the filter's header fields, if any)
JUNK = "junk"  # deliver local copies into the user's Junk folder
DEFER = "defer"  # 451 4.7.1: the client tries again later
REJECT = "reject"  # 550 5.7.1: refused for good

# 451 (RFC 5321 4.2.2), 4.7.1 delivery not authorized, try again (RFC 3463 3.8).
FILTER_DEFER = Reply(451, "4.7.1", "Message deferred by the content filter, try again later")
# 550 (RFC 5321 4.2.2), 5.7.1 delivery not authorized (RFC 3463 3.8).
FILTER_REJECT = Reply(550, "5.7.1", "Message rejected as spam")

# The header fields filters add: the same names from outside are dropped
# when a filter runs, so that no sender can mark its own mail as clean.
FILTER_FIELD_PREFIXES = (b"x-spam", b"x-rspamd")

_UNSAFE = re.compile(r"[^\x20-\x7e]")


class FilterError(Exception):
    """The filter could not give a verdict (unreachable, bad answer, crashed)."""


@dataclass(frozen=True)
class Envelope:
    """What a filter is told beside the message."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    client_ip: str
    helo: str | None = None
    user: str | None = None  # the logged-in user of a submission client
    client_name: str | None = None  # the client's forward-confirmed reverse DNS name


@dataclass(frozen=True)
class Verdict:
    """A filter's answer: an action, header fields to add (LF line ends), a reason."""

    action: str = ACCEPT
    headers: bytes = b""
    reason: str = ""  # shown to the client after a reject (printable ASCII)
    score: float | None = None
    # The reply for a deferral or a rejection when not the filter's own.
    refusal: Reply | None = None

    @property
    def reply(self) -> Reply | None:
        """The reply that refuses the message, or None when it is delivered."""
        if self.action not in (DEFER, REJECT):
            return None
        if self.refusal is not None:
            return self.refusal
        if self.action == DEFER:
            return FILTER_DEFER
        if self.action == REJECT:
            text = public_reason(self.reason) or FILTER_REJECT.text
            return Reply(FILTER_REJECT.code, FILTER_REJECT.enhanced, text)
        return None


ACCEPTED = Verdict()


@dataclass(frozen=True)
class Thresholds:
    """
    Scores at which the server itself junks or rejects: each, when set,
    replaces the daemon's own decision for that action.
    """

    junk: float | None = None
    reject: float | None = None

    def action(self, score: float, daemon_action: str) -> str:
        """The action for C{score}, given the daemon's own."""
        if score >= self.reject if self.reject is not None else daemon_action == REJECT:
            return REJECT
        if score >= self.junk if self.junk is not None else daemon_action in (JUNK, REJECT):
            return JUNK
        if daemon_action == DEFER:
            return DEFER
        return ACCEPT


def public_reason(text: str) -> str:
    """C{text} as safe for a reply line: printable ASCII, one line, at most 200 characters."""
    return _UNSAFE.sub(" ", text).strip()[:200]


def header_field(name: str, value: str) -> bytes:
    """One header field, LF-terminated, its value made printable ASCII (RFC 5322 2.2)."""
    # RFC 5322 2.1.1: a line is at most 998 characters.
    return f"{name}: {_UNSAFE.sub(' ', value).strip()[:900]}\n".encode()


def status_fields(spam: bool, score: float, required: float | None, tests: list[str]) -> bytes:
    """The X-Spam-* fields SpamAssassin's users filter on (X-Spam-Flag, X-Spam-Status)."""
    required_text = "" if required is None else f" required={required:.1f}"
    status = f"{'Yes' if spam else 'No'}, score={score:.1f}{required_text}"
    if tests:
        status += " tests=" + ",".join(tests)
    fields = header_field("X-Spam-Status", status)
    fields += header_field("X-Spam-Score", f"{score:.1f}")
    if spam:
        fields = header_field("X-Spam-Flag", "YES") + fields
    return fields


class IFilter(Interface):
    """A spam filter client."""

    def check(message_source: Any, envelope: Envelope) -> Any:
        """
        Scan C{message_source} (an L{mailsrv.interfaces.IMessageSource});
        a Deferred that fires with a L{Verdict} or fails (L{FilterError});
        cancelling it stops the scan.
        """
