"""
The configuration: a TOML file turned into frozen, typed settings.

Every error in a file is collected and reported at once, each naming its key
and the file, so that a typo never starts a half-configured server.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.endpoints import serverFromString

from mailsrv import journal, syslogobserver
from mailsrv.addresses.aliases import normalise_domain, split_address
from mailsrv.addresses.domains import ascii_domain
from mailsrv.metrics.settings import MetricsConfig
from mailsrv.policy.dnsbl import DNSListEntry, EntryError, parse_entry
from mailsrv.policy.duplicates import classify_entry
from mailsrv.policy.greylist import GreylistAllow, parse_allow
from mailsrv.policy.networks import NetworkError, parse_network, read_network_file
from mailsrv.store.quotalimits import QuotaConfig, parse_size

LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")
IMPLICIT_TLS = frozenset({"submissions", "pop3s", "imaps"})
CLEARTEXT_POLICIES = ("never", "loopback", "always")
TLS_POLICIES = ("none", "may", "encrypt", "verify")

DEFAULT_CONFIG = """\
# The embedded default: loopback only, unprivileged ports, data in ./data.
[server]
hostname = "localhost"
domains = ["example.test"]
data_dir = "data"

[listen]
smtp = ["tcp:2525:interface=127.0.0.1"]
submission = ["tcp:2587:interface=127.0.0.1"]
submissions = ["tcp:2465:interface=127.0.0.1"]
pop3 = ["tcp:2110:interface=127.0.0.1"]
pop3s = ["tcp:2995:interface=127.0.0.1"]
imap = ["tcp:2143:interface=127.0.0.1"]
imaps = ["tcp:2993:interface=127.0.0.1"]
"""


class ConfigError(Exception):
    """
    The configuration is unusable; ``errors`` lists every problem found, and
    the text has one line per problem, each naming the file, the key and the
    value.
    """

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        super().__init__("\n".join(f"{path}: {e}" for e in errors))


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
class AuthConfig:
    passwd_file: Path
    cleartext: str  # never | loopback | always
    failure_delay: float
    max_failures: int  # per client address, within failure_window
    failure_window: int
    # Per account, within failure_window, from any address (mailsrv.auth.accounts); 0: off.
    account_slow_after: int = 20  # failures before attempts on the account wait (doubling)
    account_max_delay: float = 15.0  # the longest such wait, seconds
    account_max_failures: int = 100  # failures before it is refused but from known addresses
    account_known_clients: int = 8  # addresses kept per account after a successful login
    account_known_time: int = 30 * 86400  # how long such an address stays known


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


@dataclass(frozen=True)
class AddressesConfig:
    """The [addresses] section: aliases, domain aliases, catch-alls, SRS, lists."""

    aliases: Path  # the aliases file (relative to the config file's folder)
    recipient_delimiter: str  # each character separates a local part from its detail; '' none
    postmaster: str | None  # who gets postmaster@ and abuse@ of every local domain
    catch_all: Mapping[str, str]  # local domain -> address for its unknown local parts
    domain_aliases: Mapping[str, str]  # alias domain -> local domain
    srs_domain: str  # the domain of the SRS addresses forwarded mail is sent from
    lists: Mapping[str, str]  # list alias address -> its List-Id field value ('' none)


@dataclass(frozen=True)
class DkimConfig:
    """The [dkim] section: the signing keys of local domains (RFC 6376)."""

    keys: Mapping[str, Path]  # domain -> its private key file (relative to the config's folder)
    selector: str  # the s= tag: the key is published at SELECTOR._domainkey.DOMAIN


@dataclass(frozen=True)
class FilterConfig:
    """The [filter] section: the spam filter step at the end of DATA (mailsrv.filter)."""

    rspamd: str | None  # rspamd's URL (its normal worker)
    spamd: tuple[str, int] | None  # spamd's host and port
    command: tuple[str, ...] | None  # a filter command and its arguments
    timeout: int
    on_failure: str  # accept | defer
    reject_score: float | None  # None: the daemon's own action
    junk_score: float | None
    # Training from IMAP moves into and out of Junk (mailsrv.filter.learn).
    learn: bool = False
    rspamd_controller: str | None = None  # rspamd's controller URL (port 11334)
    rspamd_password: str | None = None  # the controller's password (its Password field)
    learn_command: tuple[str, ...] | None = None  # learns from stdin; {class}: spam | ham


def _score(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"must be a number, not {_tname(v)}")
    return float(v)


def _url(v: Any) -> str:
    s = _nonempty_str(v).strip()
    if not re.fullmatch(r"https?://[^/\s]+/?", s):
        raise ValueError(f'must be a URL such as "http://127.0.0.1:11333", not {v!r}')
    return s


def _argv(v: Any) -> tuple[str, ...]:
    argv = _str_list(v)
    if not argv or not os.path.isabs(argv[0]):
        raise ValueError('must be a list: an absolute path, then its arguments ["/path", "arg"]')
    return argv


def _filter_config(v: dict[str, Any], errors: list[str]) -> FilterConfig:
    given = [k for k in ("rspamd", "spamd", "command") if v[k] is not None]
    if len(given) > 1:
        errors.append(f"filter: give one of rspamd, spamd and command, not {' and '.join(given)}")
    spamd = None
    if v["spamd"] is not None:
        try:
            spamd = _hostport(783)(v["spamd"])
        except ValueError as e:
            errors.append(f"filter.spamd: {e}")
    controller = v["rspamd_controller"]
    if controller is None and v["rspamd"] is not None:
        # The controller worker, which learns, listens on 11334 beside the normal worker.
        url = urlsplit(v["rspamd"])
        host = url.hostname or "127.0.0.1"
        controller = f"{url.scheme}://{f'[{host}]' if ':' in host else host}:11334"
    if v["learn"] and v["learn_command"] is None and v["rspamd"] is None and v["spamd"] is None:
        errors.append("filter.learn: needs rspamd, spamd or learn_command to learn with")
    return FilterConfig(**{**v, "spamd": spamd, "rspamd_controller": controller})


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


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    listen: Mapping[str, tuple[str, ...]]
    tls: TLSConfig
    limits: LimitsConfig
    auth: AuthConfig
    imap: IMAPConfig
    relay: RelayConfig
    dns: DNSConfig
    addresses: AddressesConfig = field(default=None)  # type: ignore[assignment]
    dkim: DkimConfig = field(default=None)  # type: ignore[assignment]
    filter: FilterConfig | None = None  # None: no spam filter
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)  # [quota]: storage limits
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # [metrics]: Prometheus page
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)
    # The TOML text and the folder relative paths are taken from: what the
    # relay process needs to build the very same settings.
    source: str = field(repr=False, default="")
    base_dir: Path | None = None

    @property
    def mail_dir(self) -> Path:
        return self.server.data_dir / "mail"

    @property
    def index_dir(self) -> Path:
        return self.server.data_dir / "index"

    @property
    def queue_dir(self) -> Path:
        return self.server.data_dir / "queue"

    @property
    def spool_dir(self) -> Path:
        return self.server.data_dir / "tmp"

    def is_local_domain(self, domain: str) -> bool:
        """Whether mail for C{domain} is ours: a domain of ours or an alias of one."""
        d = _local_form(domain)
        return d in self.server.domains or (
            self.addresses is not None and d in self.addresses.domain_aliases
        )

    def is_user_domain(self, domain: str) -> bool:
        """Whether users may have addresses in C{domain} (not a domain alias)."""
        return _local_form(domain) in self.server.domains


def _local_form(domain: str) -> str:
    """A domain as the config keeps it: lower-case A-labels (UTS-46), no final dot."""
    d = domain.lower().rstrip(".")
    if d.isascii() and not d.startswith("xn--") and ".xn--" not in d:
        return d  # the common case, without the idna call
    try:
        return normalise_domain(d)
    except ValueError:
        return d


# --- validators: each returns the converted value or raises ValueError -------


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, not {_tname(v)}")
    return v


def _nonempty_str(v: Any) -> str:
    s = _str(v)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def _int(minimum: int = 0, maximum: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer, not {_tname(v)}")
        if v < minimum or (maximum is not None and v > maximum):
            hi = "" if maximum is None else f" and at most {maximum}"
            raise ValueError(f"must be at least {minimum}{hi}, not {v}")
        return v

    return check


def _duration(v: Any) -> int:
    """Seconds, as an integer or a string such as "90s", "5m", "4h", "5d"."""
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 0:
            raise ValueError("must not be negative")
        return v
    if isinstance(v, str):
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        s = v.strip().lower()
        if s and s[-1] in units and s[:-1].isdigit():
            return int(s[:-1]) * units[s[-1]]
        if s.isdigit():
            return int(s)
    raise ValueError(f'must be a duration like 300, "5m", "4h" or "5d", not {v!r}')


def _float(minimum: float = 0.0) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"must be a number, not {_tname(v)}")
        if v < minimum:
            raise ValueError(f"must be at least {minimum}")
        return float(v)

    return check


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, not {v!r}")
        return v

    return check


def _str_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("must be a list of strings")
    return tuple(v)


def _domain(v: str) -> str:
    d = v.strip().lower().rstrip(".")
    if not d or any(c in d for c in " @/\\\x00") or ".." in d:
        raise ValueError(f"{v!r} is not a domain name")
    try:
        # One form for IDNs: A-labels (UTS-46). An ASCII name is only
        # lower-cased: names such as mail_1.lan, which IDNA2008 refuses,
        # worked before and still do.
        return ascii_domain(d)
    except ValueError as e:
        raise ValueError(f"{v!r} is not a domain name: {e}")


def _address(v: Any) -> str:
    """local@domain, the domain in the config's form."""
    s = _nonempty_str(v).strip()
    local, at, domain = s.rpartition("@")
    if not at or not local or any(c.isspace() or ord(c) < 32 for c in local):
        raise ValueError(f"{v!r} is not an address (local@domain)")
    domain = _domain(domain)
    try:
        split_address(s)  # RFC 5321 4.1.2: '@', '<', ',' ... only in a quoted local part
    except ValueError:
        raise ValueError(f"{v!r} is not an address (local@domain)")
    return f"{local}@{domain}"


def _address_table(v: Any) -> dict[str, str]:
    """A table of domain = address."""
    if not isinstance(v, dict):
        raise ValueError('must be a table of "domain" = "address"')
    return {_domain(k): _address(a) for k, a in v.items()}


def _domain_table(v: Any) -> dict[str, str]:
    """A table of domain = domain."""
    if not isinstance(v, dict):
        raise ValueError('must be a table of "alias domain" = "domain"')
    return {_domain(k): _domain(_str(d)) for k, d in v.items()}


def _key_table(v: Any) -> dict[str, str]:
    """A table of domain = key file."""
    if not isinstance(v, dict):
        raise ValueError('must be a table of "domain" = "key file"')
    return {_domain(k): _nonempty_str(f) for k, f in v.items()}


# RFC 6376 3.1: selector = sub-domain *( "." sub-domain )
_SELECTOR = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def _selector(v: Any) -> str:
    s = _nonempty_str(v)
    if not _SELECTOR.fullmatch(s):
        raise ValueError(f"{s!r} is not a DKIM selector (RFC 6376 3.1: dot-separated labels)")
    return s


def _list_table(v: Any) -> dict[str, str]:
    """A table of list address = List-Id value ("" for none)."""
    if not isinstance(v, dict):
        raise ValueError('must be a table of "list@domain" = "List-Id value"')
    out = {}
    for k, value in v.items():
        list_id = _str(value).strip()
        if any(ord(c) < 32 for c in list_id) or (list_id and not _LIST_ID.fullmatch(list_id)):
            raise ValueError(
                f'{k!r}: the List-Id must look like "Name <id.example.test>" (RFC 2919), '
                f"or be empty, not {value!r}"
            )
        out[_address(k)] = list_id
    return out


#: RFC 2919 2: [phrase] "<" list-label "." list-id-namespace ">".
_LIST_ID = re.compile(r"[^<>]*<[^<>@\s.]+(\.[^<>@\s.]+)+>")


def _delimiter(v: Any) -> str:
    s = _str(v)
    if any(c.isspace() or c in '@"\\' or ord(c) < 32 for c in s):
        raise ValueError(f"{v!r}: a delimiter cannot be a space, '@', a quote or a backslash")
    return s


def _domains(v: Any) -> tuple[str, ...]:
    return tuple(_domain(d) for d in _str_list(v))


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


def _hostport(default_port: int) -> Callable[[str], tuple[str, int]]:
    def check(v: str) -> tuple[str, int]:
        host, port = v, default_port
        if v.startswith("["):  # [::1]:53
            end = v.find("]")
            if end < 0:
                raise ValueError(f"{v!r}: unbalanced [")
            host, rest = v[1:end], v[end + 1 :]
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"{v!r} is not host:port")
                port = int(rest[1:])
        elif v.count(":") == 1:
            host, p = v.split(":")
            if not p.isdigit():
                raise ValueError(f"{v!r}: port must be a number")
            port = int(p)
        if not host or not 0 < port < 65536:
            raise ValueError(f"{v!r} is not host:port")
        return host, port

    return check


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


def _positive_seconds(v: Any) -> float:
    seconds = _seconds(v)
    if seconds <= 0:
        raise ValueError(f"must be more than 0 seconds, not {v!r}")
    return seconds


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {_tname(v)}")
    return v


def _seconds(v: Any) -> float:
    """Seconds as a number or a string such as "300ms", "0.5s", "2s"; 0 is none."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        if v < 0:
            raise ValueError("must not be negative")
        return float(v)
    if isinstance(v, str):
        s = v.strip().lower()
        for unit, scale in (("ms", 0.001), ("s", 1.0)):
            if s.endswith(unit):
                try:
                    n = float(s[: -len(unit)])
                except ValueError:
                    break
                if n >= 0:
                    return n * scale
    raise ValueError(f'must be seconds like 0.3, "300ms" or "1s", not {v!r}')


def _positive_duration(v: Any) -> int:
    seconds = _duration(v)
    if seconds <= 0:
        raise ValueError(f"must be a duration longer than 0, not {v!r}")
    return seconds


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


def _tname(v: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)


_MiB = 1024 * 1024

# section -> key -> (validator, default); a default of REQUIRED must be given.
_SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
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
        "max_message_size": (_int(1024), 50 * _MiB),
        "max_recipients": (_int(1), 1000),
        "max_errors": (_int(1), 10),
        "timeout": (_duration, 300),
        "max_received_headers": (_int(1), 50),
    },
    "auth": {
        "passwd_file": (_nonempty_str, "passwd"),
        "cleartext": (_choice(*CLEARTEXT_POLICIES), "loopback"),
        "failure_delay": (_float(0.0), 2.0),
        "max_failures": (_int(1), 10),
        "failure_window": (_duration, 600),
        "account_slow_after": (_int(0), 20),
        "account_max_delay": (_float(0.0), 15.0),
        "account_max_failures": (_int(0), 100),
        "account_known_clients": (_int(0), 8),
        "account_known_time": (_duration, 30 * 86400),
    },
    "imap": {
        "max_literal_size": (_int(1024), 50 * _MiB),
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
    "addresses": {
        "aliases": (_nonempty_str, "aliases"),
        "recipient_delimiter": (_delimiter, "+"),
        "postmaster": (_address, None),
        "catch_all": (_address_table, {}),
        "domain_aliases": (_domain_table, {}),
        "srs_domain": (_domain, None),
        "lists": (_list_table, {}),
    },
    "dkim": {
        "keys": (_key_table, {}),
        "selector": (_selector, "mail"),
    },
    "filter": {
        "rspamd": (_url, None),
        "spamd": (_nonempty_str, None),
        "command": (_argv, None),
        "timeout": (_duration, 30),
        "on_failure": (_choice("accept", "defer"), "accept"),
        "reject_score": (_score, None),
        "junk_score": (_score, None),
        "learn": (_bool, False),
        "rspamd_controller": (_url, None),
        "rspamd_password": (_str, None),
        "learn_command": (_argv, None),
    },
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
    # Logging to the local syslog socket too (mailsrv.syslogobserver).
    "log": {
        "syslog": (_bool, False),
        "syslog_socket": (_nonempty_str, syslogobserver.DEFAULT_SOCKET),
        "facility": (_choice(*syslogobserver.FACILITIES), syslogobserver.DEFAULT_FACILITY),
        # Entries to the journal's native socket (mailsrv.journal): true, false or
        # "auto" (when standard output is the journal's stream, as under systemd).
        "journal": (journal.journal_mode, "auto"),
        "journal_socket": (_nonempty_str, journal.DEFAULT_SOCKET),
    },
    # Storage quotas (RFC 9208 STORAGE; mailsrv.store.quota): 0 is no limit.
    "quota": {
        "storage": (parse_size, 0),
        "users": (_quota_users, {}),
    },
    # The Prometheus metrics page (mailsrv.metrics); no endpoint: not served.
    "metrics": {
        "listen": (_endpoints, []),
    },
}


def _validate(raw: Mapping[str, Any], errors: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section in raw:
        if section not in _SCHEMA:
            errors.append(f"[{section}]: unknown section (known: {', '.join(_SCHEMA)})")
        elif not isinstance(raw[section], dict):
            errors.append(f"[{section}]: must be a table")
    for section, keys in _SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            given = {}
        values: dict[str, Any] = {}
        for key in given:
            if key not in keys:
                errors.append(f"{section}.{key}: unknown key (known: {', '.join(keys)})")
        for key, (check, default) in keys.items():
            if key in given:
                try:
                    values[key] = check(given[key])
                except ValueError as e:
                    errors.append(f"{section}.{key}: {e}")
                    values[key] = None if default is None else check(default)
            else:
                values[key] = None if default is None else check(default)
        out[section] = values
    return out


def parse(text: str, path: str = "<config>", base_dir: Path | None = None) -> Config:
    """Parse TOML text into a L{Config}; raise L{ConfigError} listing every problem."""
    errors: list[str] = []
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"])
    v = _validate(raw, errors)
    base = base_dir if base_dir is not None else Path.cwd()

    def rel(p: str | None, under: Path) -> Path | None:
        if p is None:
            return None
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (under / q)

    data_dir = rel(v["server"]["data_dir"], base)
    assert data_dir is not None
    data_dir = data_dir.absolute()
    tls = v["tls"]
    if (tls["certificate"] is None) != (tls["key"] is None):
        errors.append("tls: give both certificate and key, or neither for a self-signed one")
    if not v["server"]["domains"]:
        errors.append("server.domains: at least one local domain is needed")
    relay = v["relay"]
    if relay["smarthost"] is not None:
        try:
            _hostport(25)(relay["smarthost"])
        except ValueError as e:
            errors.append(f"relay.smarthost: {e}")
    if (relay["smarthost_username"] is None) != (relay["smarthost_password"] is None):
        errors.append("relay: give both smarthost_username and smarthost_password, or neither")
    if relay["retry_min"] > relay["retry_max"]:
        errors.append("relay.retry_min: must not exceed relay.retry_max")
    addresses = v["addresses"]
    domains = v["server"]["domains"]
    for alias, target in addresses["domain_aliases"].items():
        if alias in domains:
            errors.append(f"addresses.domain_aliases: {alias} is a domain of server.domains")
        elif target not in domains:
            errors.append(
                f"addresses.domain_aliases: {alias} = {target}: {target} is not in server.domains"
            )
    for domain in addresses["catch_all"]:
        # A domain alias may have its own catch-all: it takes the addresses
        # that are nobody in the domain the alias stands for.
        if domain not in domains and domain not in addresses["domain_aliases"]:
            errors.append(f"addresses.catch_all: {domain} is not a local domain")
    local_domains = set(domains) | set(addresses["domain_aliases"])
    for address in addresses["lists"]:
        if address.rpartition("@")[2] not in local_domains:
            errors.append(f"addresses.lists: {address} is not in a local domain")
    filter_config = _filter_config(v["filter"], errors)
    policy = v["policy"]
    for key in ("deny_file", "allow_file"):
        policy[key] = rel(policy[key], base)
        if policy[key] is not None:
            errors.extend(_network_file_errors(f"policy.{key}", policy[key]))
    errors.extend(_greylist_errors(policy))
    if policy["reject_unknown_client"] and not policy["reverse_dns"]:
        errors.append(
            "policy.reject_unknown_client: needs reverse_dns = true (without the lookup every"
            " client is unknown)"
        )
    if errors:
        raise ConfigError(path, errors)

    return Config(
        path=path,
        server=ServerConfig(
            hostname=v["server"]["hostname"],
            domains=v["server"]["domains"],
            data_dir=data_dir,
            user=v["server"]["user"],
            group=v["server"]["group"],
        ),
        listen={name: v["listen"][name] for name in LISTENERS},
        tls=TLSConfig(
            certificate=rel(tls["certificate"], base),
            key=rel(tls["key"], base),
        ),
        limits=LimitsConfig(**v["limits"]),
        auth=AuthConfig(
            passwd_file=rel(v["auth"]["passwd_file"], data_dir),  # type: ignore[arg-type]
            cleartext=v["auth"]["cleartext"],
            failure_delay=v["auth"]["failure_delay"],
            max_failures=v["auth"]["max_failures"],
            failure_window=v["auth"]["failure_window"],
            account_slow_after=v["auth"]["account_slow_after"],
            account_max_delay=v["auth"]["account_max_delay"],
            account_max_failures=v["auth"]["account_max_failures"],
            account_known_clients=v["auth"]["account_known_clients"],
            account_known_time=v["auth"]["account_known_time"],
        ),
        imap=IMAPConfig(
            max_literal_size=v["imap"]["max_literal_size"],
            idle_timeout=v["imap"]["idle_timeout"],
            special_folders=v["imap"]["special_folders"],
        ),
        relay=RelayConfig(**relay),
        dns=DNSConfig(nameservers=v["dns"]["nameservers"]),
        addresses=AddressesConfig(
            aliases=rel(addresses["aliases"], base),  # type: ignore[arg-type]
            recipient_delimiter=addresses["recipient_delimiter"],
            postmaster=addresses["postmaster"],
            catch_all=addresses["catch_all"],
            domain_aliases=addresses["domain_aliases"],
            srs_domain=addresses["srs_domain"] or _srs_default(v["server"]["hostname"]),
            lists=addresses["lists"],
        ),
        dkim=DkimConfig(
            keys={d: rel(f, base) for d, f in v["dkim"]["keys"].items()},  # type: ignore[misc]
            selector=v["dkim"]["selector"],
        ),
        filter=filter_config,
        policy=PolicyConfig(**policy),
        quota=QuotaConfig(**v["quota"]),
        metrics=MetricsConfig(listen=v["metrics"]["listen"]),
        raw=raw,
        source=text,
        base_dir=base,
    )


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


def _srs_default(hostname: str) -> str:
    try:
        return _domain(hostname)
    except ValueError:
        return hostname.lower()


SYSTEM_CONFIG = Path("/etc/mailsrv/mailsrv.toml")
CONFIG_ENV = "MAILSRV_CONFIG"


def find_config(
    option: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    system: Path = SYSTEM_CONFIG,
) -> tuple[Path | None, str]:
    """
    The config file both ``twistd mailsrv`` and ``mailsrv`` use, and where
    that choice came from: the C{--config} option, else the C{MAILSRV_CONFIG}
    environment variable, else C{/etc/mailsrv/mailsrv.toml} when it exists,
    else None for the built-in default (its relative paths are relative to
    the current folder).
    """
    if option is not None:
        return Path(option), "--config"
    env = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if env:
        return Path(env), CONFIG_ENV
    if system.exists():
        return system, str(system)
    return None, "built-in default"


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load the config file at C{path}, or the embedded default when None."""
    if path is None:
        return parse(DEFAULT_CONFIG, "<default>", Path.cwd())
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read: {e.strerror}"])
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), [f"not UTF-8: {e}"])
    return parse(text, str(p), p.absolute().parent)
