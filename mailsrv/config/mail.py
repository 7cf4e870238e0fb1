"""
The sections about what happens to mail: [addresses] (aliases, catch-alls,
SRS, lists), [dkim] (signing keys) and [filter] (the spam filter).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailsrv.config.values import (
    _address,
    _bool,
    _choice,
    _domain,
    _duration,
    _hostport,
    _nonempty_str,
    _str,
    _str_list,
    _tname,
)


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


def _srs_default(hostname: str) -> str:
    try:
        return _domain(hostname)
    except ValueError:
        return hostname.lower()


# section -> key -> (validator, default); a default of None: not set
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
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
}
