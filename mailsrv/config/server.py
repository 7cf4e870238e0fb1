"""
The sections of the server itself: [server], [listen], [tls], [limits],
[imap], [relay] and [dns].
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import serverFromString

from mailsrv.config.values import (
    _choice,
    _domain,
    _domains,
    _duration,
    _hostport,
    _int,
    _MiB,
    _nonempty_str,
    _size,
    _str,
    _str_list,
)

LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")
IMPLICIT_TLS = frozenset({"submissions", "pop3s", "imaps"})
TLS_POLICIES = ("none", "may", "encrypt", "verify")


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    domains: tuple[str, ...]
    data_dir: Path
    # The account the server runs as once its ports are bound (started as
    # root); None: it stays whoever started it (mailsrv.privileges).
    user: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None
    key: Path | None


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int
    max_recipients: int
    max_errors: int
    timeout: int
    max_received_headers: int


@dataclass(frozen=True)
class IMAPConfig:
    max_literal_size: int
    idle_timeout: int
    special_folders: tuple[str, ...]


@dataclass(frozen=True)
class RelayConfig:
    port: int
    smarthost: str | None
    smarthost_username: str | None
    smarthost_password: str | None
    smarthost_tls: str
    tls_policy: Mapping[str, str]
    max_lifetime: int
    delay_warning: int
    retry_min: int
    retry_max: int
    per_destination_concurrency: int
    connect_timeout: int


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[tuple[str, int], ...]  # empty: the system's resolv.conf


class _ParseOnly:
    """Stands in for the reactor: parsing an endpoint string does not use it."""


def _endpoint(v: str) -> str:
    try:
        serverFromString(_ParseOnly(), v)
    except Exception as e:
        raise ValueError(f"{v!r} is not a valid server endpoint: {e}")
    port = endpoint_port(v)
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{v!r}: the port must be between 1 and 65535, not {port}")
    return v


def _endpoint_fields(description: str) -> list[str]:
    """The colon-separated fields of an endpoint string (a backslash escapes a colon)."""
    fields, current, escaped = [], "", False
    for ch in description:
        if escaped:
            current, escaped = current + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append(current)
            current = ""
        else:
            current += ch
    fields.append(current)
    return fields


def endpoint_port(description: str) -> int | None:
    """
    The port a C{tcp:}, C{tcp6:} or C{ssl:} server endpoint listens on (the
    first positional argument, or C{port=}); None for other kinds.
    """
    kind, *args = _endpoint_fields(description)
    if kind.lower() not in ("tcp", "tcp6", "ssl"):
        return None
    named = dict(a.split("=", 1) for a in args if "=" in a)
    positional = [a for a in args if "=" not in a]
    value = named.get("port", positional[0] if positional else None)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _endpoints(v: Any) -> tuple[str, ...]:
    return tuple(_endpoint(s) for s in _str_list(v))


def _nameservers(v: Any) -> tuple[tuple[str, int], ...]:
    out = []
    for s in _str_list(v):
        host, port = _hostport(53)(s)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{s!r}: a name server must be an IP address")
        out.append((host, port))
    return tuple(out)


def _tls_policy(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ValueError("must be a table of domain = policy")
    out = {}
    for k, p in v.items():
        if p not in TLS_POLICIES:
            raise ValueError(f"{k!r}: policy must be one of {', '.join(TLS_POLICIES)}")
        out[_domain(k)] = p
    return out


# section -> key -> (validator, default); a default of None: not set
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "server": {
        "hostname": (_nonempty_str, "localhost"),
        "domains": (_domains, ["example.test"]),
        "data_dir": (_nonempty_str, "data"),
        "user": (_nonempty_str, None),
        "group": (_nonempty_str, None),
    },
    "listen": {name: (_endpoints, []) for name in LISTENERS},
    "tls": {
        "certificate": (_nonempty_str, None),
        "key": (_nonempty_str, None),
    },
    "limits": {
        "max_message_size": (_size(1024), 50 * _MiB),
        "max_recipients": (_int(1), 1000),
        "max_errors": (_int(1), 10),
        "timeout": (_duration, 300),
        "max_received_headers": (_int(1), 50),
    },
}


# section -> key -> (validator, default); a default of None: not set
IMAP_RELAY_DNS_SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "imap": {
        "max_literal_size": (_size(1024), 50 * _MiB),
        "idle_timeout": (_duration, 1800),
        "special_folders": (_str_list, ["Sent", "Drafts", "Trash", "Junk", "Archive"]),
    },
    "relay": {
        "port": (_int(1, 65535), 25),
        "smarthost": (_nonempty_str, None),
        "smarthost_username": (_nonempty_str, None),
        "smarthost_password": (_str, None),
        "smarthost_tls": (_choice(*TLS_POLICIES), "may"),
        "tls_policy": (_tls_policy, {}),
        "max_lifetime": (_duration, 5 * 86400),
        "delay_warning": (_duration, 4 * 3600),
        "retry_min": (_duration, 300),
        "retry_max": (_duration, 3600),
        "per_destination_concurrency": (_int(1), 5),
        "connect_timeout": (_duration, 30),
    },
    "dns": {
        "nameservers": (_nameservers, []),
    },
}
