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

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    PredicateResult,
)
from zope.interface import implementer

# Formats of the login lines; their named fields are filled by the callers.
SMTP_AUTH_FAILED = (
    "warning: {client_name}[{client}]: SASL {mechanism} authentication failed: "
    "authentication failure, sasl_username={user}"
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


# Lines Twisted writes per DNS query (the resolver re-reads resolv.conf) and
# per outbound connection ("Starting factory", "Stopping factory").
_NOISE_PREFIXES = (
    "Starting factory",
    "Stopping factory",
    "Resolver added",
    "Resolver removed",
)
_NOISE_NAMESPACES = ("twisted.names", "twisted.internet.protocol")


@implementer(ILogFilterPredicate)
class NoiseFilter:
    """Drops Twisted's per-query and per-connection informational lines."""

    def __call__(self, event: dict) -> PredicateResult:
        level = event.get("log_level")
        if level is not None and level > LogLevel.info:
            return PredicateResult.maybe
        namespace = str(event.get("log_namespace", ""))
        text = event.get("log_format") or ""
        if not text and "message" in event:  # legacy log.msg()
            text = " ".join(str(m) for m in event.get("message", ()))
        text = str(text)
        if namespace.startswith(_NOISE_NAMESPACES) or text.startswith(_NOISE_PREFIXES):
            return PredicateResult.no
        if "resolv.conf changed" in text:
            return PredicateResult.no
        return PredicateResult.maybe


def quiet(observer: ILogObserver) -> ILogObserver:
    """C{observer} without Twisted's per-query and per-connection lines."""
    return FilteringLogObserver(observer, [NoiseFilter()])
