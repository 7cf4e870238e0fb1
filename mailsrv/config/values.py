"""
The validators shared by every section: each returns the converted value or
raises ValueError with a message that follows the key in the error list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailsrv.addresses.aliases import split_address
from mailsrv.addresses.domains import ascii_domain
from mailsrv.store.quotalimits import parse_size

_MiB = 1024 * 1024


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


def _size(minimum: int = 0) -> Callable[[Any], int]:
    """Octets, as an integer or a string such as "10M", "1.5G" (as [quota] sizes)."""

    def check(v: Any) -> int:
        octets = parse_size(v)
        if octets < minimum:
            raise ValueError(f"must be at least {minimum}, not {v!r}")
        return octets

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


def _domains(v: Any) -> tuple[str, ...]:
    return tuple(_domain(d) for d in _str_list(v))


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


def _tname(v: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)
