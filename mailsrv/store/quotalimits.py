"""
The per-user storage limits of the C{[quota]} section (RFC 9208's STORAGE
resource): one limit for every user, and overrides for some users, as
Dovecot's C{quota_rule = *:storage=1G} and its per-user C{userdb_quota_rule}
are. A pure part of the config: sizes parsed, addresses matched in any case.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# "500M", "2G", "1.5g", "10KiB", "4096": binary units, as Dovecot's quota
# rules and Postfix's sizes use them.
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object) -> int:
    """
    Octets from a config value: an integer, or a string such as "500M",
    "2G", "10k", "1.5G" or "4096"; 0 is no limit. Raise ValueError saying
    what is wrong (a typo must not become "no limit").
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, not {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m is not None:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f'must be a size such as "500M", "2G" or octets, not {value!r}')


def format_size(octets: int) -> str:
    """A size as an admin reads it: "0", "512K", "1.5M", "2G" (binary units)."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if octets >= scale:
            text = f"{octets / scale:.1f}".removesuffix(".0")
            return text + unit
    return str(octets)


@dataclass(frozen=True)
class QuotaConfig:
    """The [quota] section: every user's storage limit and the per-user overrides (0: none)."""

    storage: int = 0  # octets every user may store; 0: no limit (the default)
    users: Mapping[str, int] = field(default_factory=dict)  # lower-cased address -> octets

    def limit_of(self, user: str) -> int:
        """The storage limit of C{user} in octets; 0 when the user has none."""
        return self.users.get(user.lower(), self.storage)

    @property
    def enabled(self) -> bool:
        """Whether any user has a limit."""
        return bool(self.storage or any(self.users.values()))
