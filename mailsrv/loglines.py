"""
The shapes of the log lines an administrator's tools parse.

fail2ban's stock Debian filters read login failures in the shapes Postfix
and Dovecot write: C{postfix.conf} (mode C{auth} or C{aggressive}) matches
C{warning: unknown[IP]: SASL LOGIN authentication failed: ...}, and
C{dovecot.conf} matches C{imap-login: Disconnected (auth failed, 1 attempts
in 0 secs): user=<...>, method=PLAIN, rip=IP, lip=IP} (C{pop3-login:}
likewise). The filters' prefix is optional, so twistd's text log line
(C{TIMESTAMP [namespace#level] text}) matches as it is.

L{NoiseFilter} drops Twisted's lines that come once per DNS query or per
outbound connection.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    PredicateResult,
    globalLogPublisher,
)
from zope.interface import implementer

# Formats of the login lines; their named fields are filled by the callers.
SMTP_AUTH_FAILED = (
    "warning: {client_name}[{client}]: SASL {mechanism} authentication failed: "
    "authentication failure, sasl_username={user}"
)
# A login refused by the throttle before its password is checked: Postfix's
# failure line, so that the stock filter counts it like the failures before it.
SMTP_AUTH_THROTTLED = (
    "warning: {client_name}[{client}]: SASL {mechanism} authentication failed: "
    "too many failures, sasl_username={user}"
)
SMTP_AUTH_OK = "{client_name}[{client}]: sasl_method={mechanism}, sasl_username={user}"
LOGIN_FAILED = (
    "{service}-login: Disconnected (auth failed, 1 attempts in 0 secs): "
    "user=<{user}>, method={method}, rip={client}, lip={local}"
)
LOGIN_THROTTLED = (
    "{service}-login: Disconnected (auth failed, 1 attempts in 0 secs): "
    "user=<{user}>, method={method}, rip={client}, lip={local}, reason=too many failures"
)
LOGIN_OK = "{service}-login: Login: user=<{user}>, method={method}, rip={client}, lip={local}"


def bracketed(value: str | bytes | None) -> str:
    """
    A client's user name for C{user=<...>}: angle brackets become C{?}, so a
    name such as C{x>, rip=6.6.6.6} cannot make a filter read another address
    (control characters are escaped by L{mailsrv.logsafe.SafeLogger}).
    """
    if value is None:
        return ""
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    return text.replace("<", "?").replace(">", "?")


def local_host(transport: Any) -> str:
    """The address a client connected to (C{lip=}), or C{unknown}."""
    try:
        return str(transport.getHost().host)
    except Exception:
        return "unknown"


# Lines Twisted writes per DNS query (the resolver re-reads resolv.conf, and
# each query's UDP port starts and stops) and per connection or listener
# ("Starting factory", "Stopping factory"). A TCP listener's "... starting on
# PORT" line stays: it says the server listens.
_NOISE_PREFIXES = (
    "Starting factory",
    "Stopping factory",
    "Resolver added",
    "Resolver removed",
    "(UDP Port ",
)
_NOISE_PROTOCOLS = ("Starting protocol", "Stopping protocol", "DNSDatagramProtocol starting on")


def _text(event: dict) -> str:
    """The event's text before its fields are filled in (a legacy event's whole text)."""
    text = event.get("log_text")  # twisted.python.log.msg()
    if text is None:
        text = event.get("log_format") or ""
    return str(text)


@implementer(ILogFilterPredicate)
class NoiseFilter:
    """Drops Twisted's per-query and per-connection informational lines."""

    def __call__(self, event: dict) -> PredicateResult:
        level = event.get("log_level")
        if level is not None and level > LogLevel.info:
            return PredicateResult.maybe
        text = _text(event)
        if text.startswith(_NOISE_PREFIXES) or "resolv.conf changed" in text:
            return PredicateResult.no
        if text.startswith(_NOISE_PROTOCOLS) and "DNS" in text:
            return PredicateResult.no
        return PredicateResult.maybe


def quiet(observer: ILogObserver) -> ILogObserver:
    """C{observer} without Twisted's per-query and per-connection lines."""
    return FilteringLogObserver(observer, [NoiseFilter()])


def quiet_publisher(publisher: Any) -> None:
    """
    Put L{NoiseFilter} in front of each observer C{publisher} has now (twistd's
    text log or syslog, set up before the services start).
    """
    for observer in list(getattr(publisher, "_observers", ())):
        if isinstance(observer, FilteringLogObserver):
            continue
        publisher.removeObserver(observer)
        publisher.addObserver(quiet(observer))


def unwrapped(observer: Any) -> Any:
    """The observer a L{quiet} one passes events to, or C{observer} itself."""
    return (
        getattr(observer, "_observer", observer)
        if isinstance(observer, FilteringLogObserver)
        else observer
    )


class QuietLogService(Service):
    """Once twistd's log is set up, keeps Twisted's noise lines out of it."""

    def privilegedStartService(self) -> None:
        # Before any listener starts (its factory's "Starting factory" line);
        # twistd has set up its log by then.
        quiet_publisher(globalLogPublisher)
        super().privilegedStartService()
