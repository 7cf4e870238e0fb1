"""The [auth] section: the password file, cleartext logins and login throttling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailsrv.config.values import _choice, _duration, _float, _int, _nonempty_str

CLEARTEXT_POLICIES = ("never", "loopback", "always")


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


# section -> key -> (validator, default); a default of None: not set
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
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
}
