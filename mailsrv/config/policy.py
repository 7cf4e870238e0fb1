"""
The [policy] section (connection gate, pregreet, rate limits, duplicates,
greylisting, DNS lists, sender authentication) and [quota].
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailsrv.config.values import (
    _address,
    _bool,
    _duration,
    _int,
    _nonempty_str,
    _positive_duration,
    _positive_seconds,
    _seconds,
    _str_list,
)
from mailsrv.policy.dnsbl import DNSListEntry, EntryError, parse_entry
from mailsrv.policy.duplicates import classify_entry
from mailsrv.policy.greylist import GreylistAllow, parse_allow
from mailsrv.policy.networks import NetworkError, parse_network, read_network_file
from mailsrv.store.quotalimits import parse_size


@dataclass(frozen=True)
class PolicyConfig:
    """
    The [policy] section: the connection gate of every listener (limits per
    client address, allowed and denied networks), the pregreet test and
    the message and recipient rate limits.
    """

    max_connections: int = 1000  # open connections of the whole server; 0: no limit
    max_connections_per_ip: int = 20  # open connections of one client address
    connections_per_ip_per_minute: int = 60  # new connections of one address a minute
    deny: tuple[Any, ...] = ()  # networks refused at connect (ipaddress networks)
    allow: tuple[Any, ...] = ()  # networks that skip the limits
    deny_file: Path | None = None  # more networks, one a line, re-read when changed
    allow_file: Path | None = None
    pregreet: bool = True  # refuse an SMTP client that talks before the greeting
    # Seconds the MX listener waits before it greets (the pregreet test needs a
    # wait); 0 by default, so that nothing waits unless asked (etc/mailsrv.toml
    # asks for 300 ms).
    pregreet_wait: float = 0.0
    # Rate limits, as Postfix's anvil (0: no limit), per user and per client address.
    messages_per_hour: int = 0  # MAIL FROMs
    recipients_per_hour: int = 0  # RCPT TOs
    # Mass duplicate mail (mailsrv.policy.duplicates): the same body to more than
    # this many distinct recipients within the window, by one sender or client,
    # is deferred, then refused; 0: no check. mailing_lists: senders ("a@b",
    # "@domain"), client networks (CIDR) and List-Ids that are never counted.
    duplicate_recipients: int = 50
    duplicate_window: int = 3600
    mailing_lists: tuple[str, ...] = ()
    # Greylisting (mailsrv.policy.greylist), as postgrey: off by default.
    greylist: bool = False
    greylist_delay: int = 300  # seconds before a retry is taken
    greylist_retry_window: int = 2 * 86400  # seconds a first sighting waits for its retry
    greylist_max_age: int = 35 * 86400  # seconds a passed triplet or client stays known
    greylist_auto_allow: int = 5  # passes (in different hours) that allow a client; 0: never
    greylist_allow: GreylistAllow = GreylistAllow()  # never greylisted
    # DNS block and allow lists (postscreen_dnsbl_sites entries) and reverse
    # DNS, looked up at connect; empty lists: off (they need Internet DNS).
    dnsbl: tuple[DNSListEntry, ...] = ()
    dnswl: tuple[DNSListEntry, ...] = ()  # a client listed here skips the per-client checks
    dnsbl_threshold: int = 1  # summed DNSBL weight that refuses a client
    dnsbl_timeout: float = 5.0  # seconds for the DNS lists and reverse DNS at connect
    reject_unknown_client: bool = False  # 450 at RCPT without a forward-confirmed name
    reverse_dns: bool = True  # false: no PTR lookup, every client "unknown" (smtpd_peername_lookup)
    # Sender authentication of inbound mail (mailsrv.authres): SPF, DKIM, DMARC, ARC.
    authentication_checks: bool = True  # false: none, and no Authentication-Results field
    spf_reject: bool = False  # refuse MAIL when SPF fails (550 5.7.23) or errs (451 4.7.24)
    dmarc_reject: bool = True  # refuse a DMARC failure under p=reject (550 5.7.1)
    # Processes verifying DKIM, ARC and DMARC; 0: in the server's threads.
    authentication_workers: int = 1


def _networks(v: Any) -> tuple[Any, ...]:
    nets = []
    for text in _str_list(v):
        try:
            nets.append(parse_network(text))
        except NetworkError as e:
            raise ValueError(str(e)) from None
    return tuple(nets)


def _dns_lists(v: Any) -> tuple[DNSListEntry, ...]:
    """DNSBL/DNSWL entries: "zone", "zone=127.0.0.2", "zone=127.0.0.[2..11]*3"."""
    out = []
    for text in _str_list(v):
        try:
            out.append(parse_entry(text))
        except EntryError as e:
            raise ValueError(str(e)) from None
    return tuple(out)


def _mailing_lists(v: Any) -> tuple[str, ...]:
    """Mailing list senders, networks and List-Ids (L{MailingLists}), each checked."""
    entries = _str_list(v)
    problems = [text for kind, text in map(classify_entry, entries) if kind == "error"]
    if problems:
        raise ValueError("; ".join(problems))
    return entries


def _quota_users(v: Any) -> dict[str, int]:
    """[quota] users: a table of "address" = size (0: no limit for that user)."""
    if not isinstance(v, dict):
        raise ValueError('must be a table of "address" = "size"')
    out = {}
    for address, size in v.items():
        try:
            out[_address(address).lower()] = parse_size(size)
        except ValueError as e:
            raise ValueError(f"{address}: {e}") from None
    return out


def _greylist_allow(v: Any) -> GreylistAllow:
    return parse_allow(_str_list(v))


def _greylist_errors(policy: Mapping[str, Any]) -> list[str]:
    """The greylist's times must make sense together: a retry after the delay must fit the window."""
    errors = []
    delay, window = policy["greylist_delay"], policy["greylist_retry_window"]
    if delay < 1:
        errors.append("policy.greylist_delay: must be at least 1 second")
    if window <= delay:
        errors.append("policy.greylist_retry_window: must be longer than policy.greylist_delay")
    if policy["greylist_max_age"] < 1:
        errors.append("policy.greylist_max_age: must be at least 1 second")
    return errors


def _network_file_errors(key: str, path: Path) -> list[str]:
    """The problems of a deny or allow file, each naming file:line."""
    try:
        read_network_file(path)
    except OSError as e:
        return [f"{key}: cannot read {path}: {e.strerror}"]
    except NetworkError as e:
        return [f"{key}: {problem}" for problem in e.problems]
    return []


# section -> key -> (validator, default); a default of None: not set
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "policy": {
        # Rate limits, as Postfix's anvil: 0 (its default) is no limit.
        "messages_per_hour": (_int(0), 0),
        "recipients_per_hour": (_int(0), 0),
        "max_connections": (_int(0), 1000),
        "max_connections_per_ip": (_int(0), 20),
        "connections_per_ip_per_minute": (_int(0), 60),
        "deny": (_networks, []),
        "allow": (_networks, []),
        "deny_file": (_nonempty_str, None),
        "allow_file": (_nonempty_str, None),
        "pregreet": (_bool, True),
        "pregreet_wait": (_seconds, 0.0),
        # Mass duplicate mail (mailsrv.policy.duplicates).
        "duplicate_recipients": (_int(0), 50),
        "duplicate_window": (_positive_duration, 3600),
        "mailing_lists": (_mailing_lists, []),
        # Greylisting: postgrey's defaults (--delay, --retry-window, --max-age,
        # --auto-whitelist-clients).
        "greylist": (_bool, False),
        "greylist_delay": (_duration, "5m"),
        "greylist_retry_window": (_duration, "2d"),
        "greylist_max_age": (_duration, "35d"),
        "greylist_auto_allow": (_int(0), 5),
        "greylist_allow": (_greylist_allow, []),
        "dnsbl": (_dns_lists, []),
        "dnswl": (_dns_lists, []),
        "dnsbl_threshold": (_int(1), 1),
        "dnsbl_timeout": (_positive_seconds, 5.0),
        "reject_unknown_client": (_bool, False),
        "reverse_dns": (_bool, True),
        # Sender authentication (SPF, DKIM, DMARC, ARC) of inbound mail.
        "authentication_checks": (_bool, True),
        "spf_reject": (_bool, False),
        "dmarc_reject": (_bool, True),
        # Verifier processes: one per core but one (at least one); 0: threads.
        "authentication_workers": (_int(0), max(1, (os.cpu_count() or 1) - 1)),
    },
    # Storage quotas (RFC 9208 STORAGE; mailsrv.store.quota): 0 is no limit.
    "quota": {
        "storage": (parse_size, 0),
        "users": (_quota_users, {}),
    },
}
