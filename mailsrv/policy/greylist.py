"""
Greylisting ([policy] C{greylist}), as postgrey does for Postfix and as
RFC 6647 (the applicability statement for greylisting) describes it: the
first time a client network sends mail from a sender to a recipient (the
I{triplet}), that recipient is refused for now with C{451 4.7.1}; an honest
client keeps the message queued and tries again (RFC 5321 4.5.4.1), and a
retry once C{greylist_delay} has passed is accepted. Most spamware never
tries again.

The triplet (RFC 6647 4.2.1): the client network (an IPv4 client by its
/24 and an IPv6 one by its /64, as postgrey's C{--lookup-by-subnet} does, so
that a pool of outbound servers that retries from another address of its
network is not delayed again), the envelope sender lower-cased (the null
sender too) and the recipient lower-cased, as the delivery accepted it.

A triplet first seen waits for its retry C{greylist_retry_window} (postgrey's
C{--retry-window}, 2 days); a retry after that starts over. A triplet that
passed is known for C{greylist_max_age} since it was last seen (postgrey's
C{--max-age}, 35 days). A client network whose mail passed in
C{greylist_auto_allow} different hours (postgrey's
C{--auto-whitelist-clients=5}) is not greylisted any more, for as long as it
keeps sending within C{greylist_max_age}.

Never greylisted (RFC 6647 recommends allow lists beside the delay):
authenticated submission clients, the networks of C{[policy] allow}, the
entries of C{greylist_allow}, and mail to postmaster@ and abuse@ of the local
domains: RFC 5321 4.5.1 asks that mail to postmaster be taken, and postgrey's
own recipient allow list ships with C{postmaster@} and C{abuse@}: the sender
whose server behaves badly (and may never retry) must still be able to
reach the people who run this one.

Memory is bounded: each table (triplets waiting, triplets passed, clients
counted) keeps at most C{MAX_ENTRIES}; past that the oldest is dropped (a
spray of new triplets only ever pushes out other triplets still waiting,
never those that passed). Expired entries are swept on a timer.

The state is kept on disk across restarts: L{mailsrv.policy.greylist_store}.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from mailsrv.logsafe import SafeLogger
from mailsrv.policy.networks import NetworkError, NetworkList, client_address, parse_network
from mailsrv.replies import Reply, SMTPReplyError

MAX_ENTRIES = 100_000  # per table: triplets waiting, triplets passed, clients counted
AUTO_ALLOW_EVERY = 3600.0  # a client's passes are counted at most once an hour
FORMAT = "mailsrv-greylist 1"  # of the snapshot (mailsrv.policy.greylist_store)
IPV4_PREFIX, IPV6_PREFIX = 24, 64  # RFC 6647 4.2.1
EXEMPT_LOCAL_PARTS = frozenset({"postmaster", "abuse"})  # RFC 5321 4.5.1; postgrey's default

# 451 (RFC 5321 4.2.2: requested action aborted, local error: try again),
# 4.7.1 delivery not authorized, message refused (RFC 3463 3.8): temporary.
_CODE, _ENHANCED = 451, "4.7.1"

Triplet = tuple[str, str, str]  # (client network, sender, recipient)
# Copies of the tables' items: pending, passed, clients (L{Greylist.tables}).
Tables = tuple[
    list[tuple[Triplet, tuple[float, float]]],
    list[tuple[Triplet, tuple[float, float]]],
    list[tuple[str, tuple[int, float, float]]],
]


# Memoized (a pure function of the text; some 10 us a parse, asked several times a message).
@functools.lru_cache(maxsize=4096)
def client_network(host: str) -> str:
    """The network a client is greylisted as: its IPv4 /24, its IPv6 /64 (RFC 6647 4.2.1)."""
    addr = client_address(host)
    if addr is None:
        return host
    prefix = IPV4_PREFIX if addr.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network((addr, prefix), strict=False))


# --- the allow list -------------------------------------------------------------------


@dataclass(frozen=True)
class GreylistAllow:
    """
    C{greylist_allow}: what is never greylisted. Each entry one of
    C{"192.0.2.0/24"} or an address (a client network),
    C{"mail.example.org"} (a client whose confirmed reverse name is that
    name or one below it), C{"from:alice@example.org"},
    C{"from:example.org"} (a sender address, a sender domain),
    C{"to:sales@example.test"}, C{"to:example.test"}, C{"to:sales@"} (a
    recipient address, domain, or local part at any domain).
    """

    networks: tuple[Any, ...] = ()
    names: frozenset[str] = frozenset()
    senders: frozenset[str] = frozenset()  # "a@b", "@b" (a domain), "a@" (a local part)
    recipients: frozenset[str] = frozenset()

    def allows(self, addr: Any, name: str | None, sender: str, recipient: str) -> str | None:
        """Which entry allows this mail (for the log), or None."""
        if addr is not None:
            for net in self.networks:
                if addr.version == net.version and addr in net:
                    return str(net)
        if name:
            labels = name.lower().rstrip(".").split(".")
            for i in range(len(labels) - 1):
                if ".".join(labels[i:]) in self.names:
                    return ".".join(labels[i:])
        hit = _address_entry(self.senders, sender)
        if hit is not None:
            return "from:" + hit
        hit = _address_entry(self.recipients, recipient)
        return None if hit is None else "to:" + hit


def _address_entry(entries: frozenset[str], address: str) -> str | None:
    if not entries or not address:
        return None
    local, _, domain = address.lower().rpartition("@")
    for key in (f"{local}@{domain}", f"@{domain}", f"{local}@"):
        if key in entries:
            return key
    return None


def parse_allow(entries: tuple[str, ...]) -> GreylistAllow:
    """C{greylist_allow} as given; raise ValueError naming every bad entry."""
    networks: list[Any] = []
    names: set[str] = set()
    senders: set[str] = set()
    recipients: set[str] = set()
    bad: list[str] = []
    for entry in entries:
        text = entry.strip()
        kind, colon, rest = text.partition(":")
        try:
            if colon and kind.lower() in ("from", "to"):
                (senders if kind.lower() == "from" else recipients).add(_address_key(rest))
            elif _looks_like_network(text):
                networks.append(parse_network(text))
            else:
                names.add(_name(text))
        except (ValueError, NetworkError) as e:
            bad.append(f"{entry!r} ({e})")
    if bad:
        raise ValueError("bad entries: " + "; ".join(bad))
    return GreylistAllow(
        tuple(networks), frozenset(names), frozenset(senders), frozenset(recipients)
    )


def _looks_like_network(text: str) -> bool:
    return ":" in text or "/" in text or text.replace(".", "").isdigit()


def _name(text: str) -> str:
    name = text.lower().strip(".")
    if not name or "." not in name or any(c in name for c in " @/\\\x00") or ".." in name:
        raise ValueError("not a host or domain name")
    return name


def _address_key(text: str) -> str:
    """An address, a domain (as "@domain") or a local part (as "local@"), lower-cased."""
    s = text.strip().lower()
    local, at, domain = s.rpartition("@")
    if not at:
        return "@" + _name(s)
    if domain:
        domain = _name(domain)
    if not local and not domain:
        raise ValueError("neither a local part nor a domain")
    if any(c.isspace() for c in local):
        raise ValueError("not an address")
    return f"{local}@{domain}"


# --- the greylist ---------------------------------------------------------------------


@dataclass(frozen=True)
class GreylistSettings:
    """The [policy] greylist keys, in seconds."""

    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    max_age: float = 35 * 86400.0
    auto_allow: int = 5  # 0: clients are never allowed by their record
    allow: GreylistAllow = GreylistAllow()


@dataclass(frozen=True)
class Verdict:
    """The greylist's answer on one recipient: C{wait} None passes, else seconds to wait."""

    wait: float | None
    why: str  # for the log

    @property
    def passed(self) -> bool:
        return self.wait is None


class Greylist:
    """The triplets and clients a server has seen; a pure function of the clock's time."""

    log = SafeLogger()

    def __init__(
        self,
        clock: Any,
        settings: GreylistSettings,
        allowed_networks: NetworkList | None = None,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.clock = clock
        self.settings = settings
        # [policy] allow (and its file, re-read by the network watcher).
        self.allowed_networks = allowed_networks if allowed_networks is not None else NetworkList()
        self.max_entries = max_entries
        # Insertion order is expiry order: pending by first sighting (its
        # retry window runs from there), passed and clients by last sighting.
        self.pending: OrderedDict[Triplet, tuple[float, float]] = OrderedDict()
        self.passed: OrderedDict[Triplet, tuple[float, float]] = OrderedDict()
        self.clients: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        self.dirty = False  # changed since the last snapshot

    def check(
        self, client: str, sender: str, recipient: str, client_name: str | None = None
    ) -> Verdict:
        """The verdict on mail from C{sender} to C{recipient} by C{client}; counted."""
        sender, recipient = sender.lower(), recipient.lower()
        addr = client_address(client)
        if addr is not None and addr in self.allowed_networks:
            return Verdict(None, "allowed network")
        allowed = self.settings.allow.allows(addr, client_name, sender, recipient)
        if allowed is not None:
            return Verdict(None, f"greylist_allow {allowed}")
        now = self.clock.seconds()
        net = client_network(client)
        s = self.settings
        record = self.clients.get(net)
        if record is not None and record[2] + s.max_age <= now:
            del self.clients[net]
            record = None
        if s.auto_allow and record is not None and record[0] >= s.auto_allow:
            self._touch_client(net, record[0], record[1], now)
            return Verdict(None, f"auto-allowed after {record[0]} passes")
        key = (net, sender, recipient)
        known = self.passed.pop(key, None)
        if known is not None and known[1] + s.max_age > now:
            self.passed[key] = (known[0], now)
            self.dirty = True
            self._count_pass(net, now)
            return Verdict(None, "known")
        waiting = self.pending.get(key)
        if waiting is not None and waiting[0] + s.retry_window <= now:
            del self.pending[key]  # the retry came too late: start over
            waiting = None
        if waiting is None:
            self.pending[key] = (now, now)
            self._bound(self.pending)
            self.dirty = True
            return Verdict(s.delay, "first seen")
        first = waiting[0]
        if now - first < s.delay:
            self.pending[key] = (first, now)
            self.dirty = True
            return Verdict(first + s.delay - now, f"retried after {now - first:.0f} s")
        del self.pending[key]
        self.passed[key] = (now, now)
        self._bound(self.passed)
        self.dirty = True
        self._count_pass(net, now)
        return Verdict(None, f"passed after {now - first:.0f} s")

    def _count_pass(self, net: str, now: float) -> None:
        """Count a pass for the client network: at most once an hour (auto-allow)."""
        if not self.settings.auto_allow:
            return
        passes, counted, _ = self.clients.get(net, (0, -AUTO_ALLOW_EVERY, now))
        if now - counted >= AUTO_ALLOW_EVERY:
            passes, counted = passes + 1, now
        self._touch_client(net, passes, counted, now)

    def _touch_client(self, net: str, passes: int, counted: float, now: float) -> None:
        self.clients.pop(net, None)
        self.clients[net] = (passes, counted, now)
        self._bound(self.clients)
        self.dirty = True

    def _bound(self, table: OrderedDict[Any, Any]) -> None:
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def sweep(self) -> int:
        """Forget the expired entries; how many were forgotten."""
        now = self.clock.seconds()
        s = self.settings
        gone = _sweep(self.pending, lambda v: v[0] + s.retry_window <= now)
        gone += _sweep(self.passed, lambda v: v[1] + s.max_age <= now)
        gone += _sweep(self.clients, lambda v: v[2] + s.max_age <= now)
        if gone:
            self.dirty = True
        return gone

    # the snapshot

    def snapshot(self) -> dict[str, Any]:
        """The state as L{greylist_store} writes it."""
        return snapshot_of(self.tables())

    def tables(self) -> Tables:
        """
        Copies of the tables' items (tuples: immutable), for
        L{snapshot_of} on another thread; a copy is some 30 times cheaper
        than the snapshot itself, which would hold the reactor up to a
        second when the tables are full.
        """
        self.dirty = False
        return list(self.pending.items()), list(self.passed.items()), list(self.clients.items())

    def restore(self, data: dict[str, Any]) -> None:
        """Take the state of a L{snapshot}; raise ValueError if it is not one."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a greylist snapshot")
        pending = sorted((_triplet_row(r) for r in data["pending"]), key=lambda r: r[1][0])
        passed = sorted((_triplet_row(r) for r in data["passed"]), key=lambda r: r[1][1])
        clients = sorted((_client_row(r) for r in data["clients"]), key=lambda r: r[1][2])
        self.pending = OrderedDict(pending[-self.max_entries :])
        self.passed = OrderedDict(passed[-self.max_entries :])
        self.clients = OrderedDict(clients[-self.max_entries :])
        self.sweep()
        self.dirty = False


def snapshot_of(tables: Tables) -> dict[str, Any]:
    """The snapshot of L{Greylist.tables}: what is written to disk (in the disk thread)."""
    pending, passed, clients = tables
    return {
        "format": FORMAT,
        "pending": [[*k, *v] for k, v in pending],
        "passed": [[*k, *v] for k, v in passed],
        "clients": [[k, *v] for k, v in clients],
    }


def _sweep(table: OrderedDict[Any, Any], expired: Callable[[Any], bool]) -> int:
    n = 0
    while table:
        key, value = next(iter(table.items()))
        if not expired(value):
            break
        del table[key]
        n += 1
    return n


def _triplet_row(row: Any) -> tuple[Triplet, tuple[float, float]]:
    net, sender, recipient, a, b = row
    if not all(isinstance(x, str) for x in (net, sender, recipient)):
        raise ValueError("a triplet is three strings")
    return (net, sender, recipient), (float(a), float(b))


def _client_row(row: Any) -> tuple[str, tuple[int, float, float]]:
    net, passes, counted, seen = row
    if not isinstance(net, str) or not isinstance(passes, int):
        raise ValueError("a client is a network and a count")
    return net, (passes, float(counted), float(seen))


# --- the SMTP session's side ----------------------------------------------------------


def greylisted_reply(wait: float) -> Reply:
    """What a greylisted client is told (RFC 6647 2.1, 4.2: a temporary failure, and when)."""
    seconds = max(1, int(wait + 0.999))
    unit = "second" if seconds == 1 else "seconds"
    return Reply(_CODE, _ENHANCED, f"Greylisted, please try again in {seconds} {unit}")


class SessionGreylist:
    """
    One SMTP session's side of the greylist: L{delivery} wraps the
    session's delivery so that a recipient the delivery accepts (after its
    own checks: an unknown user still gets its 550, and no triplet) is then
    greylisted, with L{SMTPReplyError} (451 4.7.1, the verdict in the cause
    for the session's log line).
    """

    def __init__(self, ctx: Any, client: str, session: Any = None) -> None:
        """
        C{session}: the SMTP session, whose C{client_name} (the client's
        confirmed name) and C{client.exempt} (an allowed network or a DNSWL
        listing: L{mailsrv.policy.client.ClientChecked}) are read at RCPT.
        """
        self._greylist: Greylist | None = getattr(ctx, "greylist", None)
        self._is_local_domain = ctx.config.is_local_domain
        self._client = client
        self._session = session

    def delivery(self, delivery: Any, sender: str | None) -> Any:
        """C{delivery}, or one whose C{validateTo} greylists what it accepts."""
        if self._greylist is None or getattr(delivery, "user", None) is not None:
            return delivery  # off, or an authenticated submission client
        return _GreylistedDelivery(self, delivery, sender or "")

    def check(self, sender: str, address: str) -> None:
        """Raise L{SMTPReplyError} if mail from C{sender} to C{address} waits."""
        assert self._greylist is not None
        local, _, domain = address.rpartition("@")
        if local.lower() in EXEMPT_LOCAL_PARTS and self._is_local_domain(domain):
            return
        report = getattr(self._session, "client", None)
        if getattr(report, "exempt", None):
            return  # an allowed network or one a DNSWL lists (as postgrey's whitelists)
        client_name = getattr(self._session, "client_name", None)
        verdict = self._greylist.check(self._client, sender, address, client_name)
        if verdict.wait is not None:
            net = client_network(self._client)
            cause = f"greylisted {net} <{sender.lower()}> <{address.lower()}>: {verdict.why}"
            raise SMTPReplyError(greylisted_reply(verdict.wait), cause=cause)
        if verdict.why.startswith("passed"):
            Greylist.log.info(
                "greylist: {client} <{sender}> -> <{rcpt}> {why}",
                client=self._client,
                sender=sender,
                rcpt=address,
                why=verdict.why,
            )


class _GreylistedDelivery:
    """A delivery's C{validateTo}, then the greylist, for the recipient it accepted."""

    def __init__(self, session: SessionGreylist, delivery: Any, sender: str) -> None:
        self._session = session
        self._delivery = delivery
        self._sender = sender
        self.user = getattr(delivery, "user", None)

    def validateTo(self, address: Any) -> Any:  # noqa: N802 (IMessageDelivery's name)
        result = self._delivery.validateTo(address)

        def greylisted(accepted: Any) -> Any:
            self._session.check(self._sender, str(getattr(accepted, "address", address)))
            return accepted

        if isinstance(result, defer.Deferred):
            return result.addCallback(greylisted)
        return greylisted(result)


__all__ = [
    "Greylist",
    "GreylistAllow",
    "GreylistSettings",
    "SessionGreylist",
    "Verdict",
    "client_network",
    "greylisted_reply",
    "parse_allow",
]
