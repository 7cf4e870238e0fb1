"""
The connection gate: the verdict on a new connection, before any protocol
sees it. Denied networks are refused; allowed networks skip the limits;
every other client is held to the limits on all connections of the server,
on its concurrent connections and on its connections per minute (a sliding
window on the clock), as Postfix's anvil and Dovecot's
C{mail_max_userip_connections} do. The counts per client address are per
listener; the total is of the whole server: it guards one pool of file
descriptors.

Refusals are logged at most once a minute per client address, with the
number refused since the line before, so that a flood does not flood the log.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Any

from zope.interface import Interface, implementer

from mailsrv.logsafe import SafeLogger
from mailsrv.policy.networks import NetworkList, client_address

WINDOW = 60.0  # seconds: the per-minute window and the refusal log interval


class Verdict(enum.Enum):
    """What becomes of a new connection."""

    ADMIT = "admitted"
    ALLOWED = "allowed network"  # admitted without limits
    DENIED = "denied network"
    SERVER_BUSY = "too many connections"
    TOO_MANY = "too many connections from the address"
    TOO_FAST = "too many connections per minute from the address"

    @property
    def admitted(self) -> bool:
        return self in (Verdict.ADMIT, Verdict.ALLOWED)


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits of the [policy] section a gate applies; 0 means no limit."""

    max_connections: int = 1000
    max_connections_per_ip: int = 20
    connections_per_ip_per_minute: int = 60


class IConnectionGate(Interface):
    """Decides on each new connection and counts the connections admitted."""

    def admit(listener: str, host: str) -> Any:  # noqa: N805 (zope.interface)
        """
        The L{Verdict} on a connection from C{host} to C{listener}; an
        admitted one is counted until L{release} is called for it.
        """

    def release(listener: str, host: str) -> None:  # noqa: N805
        """A connection admitted (as limited) from C{host} to C{listener} has closed."""


@implementer(IConnectionGate)
class ConnectionGate:
    """The gate of one server: its counters live as long as it runs."""

    log = SafeLogger()

    def __init__(
        self,
        clock: Any,
        limits: ConnectionLimits,
        allow: NetworkList | None = None,
        deny: NetworkList | None = None,
    ) -> None:
        self.clock = clock
        self.limits = limits
        self.allow = allow if allow is not None else NetworkList()
        self.deny = deny if deny is not None else NetworkList()
        self.total = 0
        # (listener, client address) -> concurrent connections, admission times
        self.open: dict[tuple[str, str], int] = {}
        self.recent: dict[tuple[str, str], deque[float]] = {}
        self._logged: dict[str, tuple[float, int]] = {}  # address -> (last line, since)

    def admit(self, listener: str, host: str) -> Verdict:
        addr = client_address(host)
        if addr is not None:
            if addr in self.deny:
                return self._refuse(listener, host, Verdict.DENIED)
            if addr in self.allow:
                return Verdict.ALLOWED
        client = limited_client(addr, host)
        key = (listener, client)
        now = self.clock.seconds()
        times = self.recent.get(key)
        if times is not None:
            while times and times[0] <= now - WINDOW:
                times.popleft()
        lim = self.limits
        if lim.max_connections and self.total >= lim.max_connections:
            return self._refuse(listener, client, Verdict.SERVER_BUSY)
        if lim.max_connections_per_ip and self.open.get(key, 0) >= lim.max_connections_per_ip:
            return self._refuse(listener, client, Verdict.TOO_MANY)
        per_minute = lim.connections_per_ip_per_minute
        if per_minute and times is not None and len(times) >= per_minute:
            return self._refuse(listener, client, Verdict.TOO_FAST)
        self.total += 1
        self.open[key] = self.open.get(key, 0) + 1
        if per_minute:
            self.recent.setdefault(key, deque()).append(now)
        self._forget_old(now)
        return Verdict.ADMIT

    def configure(self, limits: ConnectionLimits, allow: NetworkList, deny: NetworkList) -> None:
        """
        Apply new settings (a reload): the limits, and the networks of
        C{allow} and C{deny} (already read) taken into this gate's own lists,
        which a L{NetworkWatcher} may be watching. The counts of the
        connections open and recent are kept.
        """
        self.limits = limits
        adopt(self.allow, allow)
        adopt(self.deny, deny)

    def release(self, listener: str, host: str) -> None:
        key = (listener, limited_client(client_address(host), host))
        n = self.open.get(key, 0)
        if n <= 0:
            return
        self.total -= 1
        if n == 1:
            del self.open[key]
        else:
            self.open[key] = n - 1

    def _forget_old(self, now: float) -> None:
        """Drop the windows and log marks that no longer count (bounded memory)."""
        if len(self.recent) > 2 * max(self.limits.max_connections, 1000):
            for key in [k for k, t in self.recent.items() if not t or t[-1] <= now - WINDOW]:
                del self.recent[key]
        if len(self._logged) > 10000:
            for client in [k for k, (t, _) in self._logged.items() if t <= now - WINDOW]:
                del self._logged[client]

    def _refuse(self, listener: str, host: str, verdict: Verdict) -> Verdict:
        now = self.clock.seconds()
        last = self._logged.get(host)
        if last is not None and now - last[0] < WINDOW:
            self._logged[host] = (last[0], last[1] + 1)
            return verdict
        self.log.info(
            "refused a connection from {client} to {listener}: {reason}"
            " ({more} more refused since the line before)",
            client=host,
            listener=listener,
            reason=verdict.value,
            more=0 if last is None else last[1],
        )
        self._logged[host] = (now, 0)
        self._forget_old(now)
        return verdict


def limited_client(addr: Any, host: str) -> str:
    """
    What the per-client limits count: an IPv4 address, or an IPv6 client's
    /64 (an end site gets a /64 at least, RFC 6177, so each of its addresses
    is the same client; the rate limits and the login throttle count so too).
    """
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr) if addr is not None else host


def adopt(mine: NetworkList, new: NetworkList) -> None:
    """
    Make C{mine} hold the networks of C{new} (already read), in place: the
    object a L{NetworkWatcher} watches and the policies ask stays the same.
    """
    mine.inline, mine.path = new.inline, new.path
    mine.from_file, mine.signature = new.from_file, new.signature


def connection_limits(policy: Any) -> ConnectionLimits:
    """The connection limits of the [policy] section C{policy}."""
    return ConnectionLimits(
        max_connections=policy.max_connections,
        max_connections_per_ip=policy.max_connections_per_ip,
        connections_per_ip_per_minute=policy.connections_per_ip_per_minute,
    )


def network_lists(policy: Any) -> tuple[NetworkList, NetworkList]:
    """The allowed and the denied networks of C{policy}, their files read now (blocking)."""
    allow = NetworkList(tuple(policy.allow), policy.allow_file)
    deny = NetworkList(tuple(policy.deny), policy.deny_file)
    allow.load()
    deny.load()
    return allow, deny


def connection_gate(policy: Any, clock: Any) -> ConnectionGate:
    """The gate of the [policy] section C{policy}, its network files read now."""
    allow, deny = network_lists(policy)
    return ConnectionGate(clock, connection_limits(policy), allow=allow, deny=deny)
