"""
Lists of networks (CIDR, IPv4 and IPv6) that allow or deny client addresses
at connect, given inline in the config and in files of one network a line
that are read again when they change.

An IPv4-mapped IPv6 peer (C{::ffff:192.0.2.1}, what a dual-stack socket
reports for an IPv4 client) is compared as the IPv4 address it stands for.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application import internet
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mailsrv.addresses.aliases import file_signature
from mailsrv.logsafe import SafeLogger

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

NETWORK_CHECK_INTERVAL = 5.0  # seconds between two looks at the network files
# A file written to less than this many seconds ago may be half written (an
# editor rewriting it in place): it is read at a later look.
SETTLE_TIME = 1.0


class NetworkError(ValueError):
    """
    Networks that are not valid CIDR: C{problems} has one text per bad
    network (naming C{file:line} when read from a file).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_network(text: str) -> Network:
    """
    One network in CIDR notation, or a bare address (a /32 or /128). Host
    bits set (C{192.0.2.1/24}) are an error: such a line is most likely a
    typo for another network.
    """
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise NetworkError([f"{text.strip()!r} is not a network in CIDR notation ({e})"]) from None
    mapped = getattr(net.network_address, "ipv4_mapped", None)
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


# Memoized (a pure function of the text; some 10 us a parse, asked several times a message).
@functools.lru_cache(maxsize=4096)
def client_address(host: str) -> Address | None:
    """
    The address of a peer as compared against the lists: IPv4-mapped IPv6
    as IPv4, a zone (C{fe80::1%eth0}) dropped; None for a peer that has no
    IP address (a UNIX socket).
    """
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def read_network_file(path: Path) -> tuple[Network, ...]:
    """
    The networks of a file: one a line, C{#} starts a comment, blank lines
    skipped. Raises L{NetworkError} naming C{file:line} for every bad line
    at once, L{OSError} when it cannot be read.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    nets: list[Network] = []
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            nets.append(parse_network(line))
        except NetworkError as e:
            errors.append(f"{path}:{number}: {e}")
    if errors:
        raise NetworkError(errors)
    return tuple(nets)


@dataclass
class NetworkList:
    """
    The networks of one list (allow or deny): those given in the config and
    those of its file, if any; the file's part is replaced in one step on the
    reactor thread when the file is read again.
    """

    inline: tuple[Network, ...] = ()
    path: Path | None = None
    from_file: tuple[Network, ...] = ()
    signature: tuple[int, int, int] | None = field(default=None, repr=False)

    def load(self) -> None:
        """Read the file now (at start: errors are raised, not logged)."""
        if self.path is None:
            return
        signature = file_signature(self.path)
        self.from_file = read_network_file(self.path)
        self.signature = signature

    def changed(self) -> bool:
        """Whether the file looks different from when it was last read."""
        return self.path is not None and file_signature(self.path) != self.signature

    def __contains__(self, addr: Address) -> bool:
        return _contains(self.inline, addr) or _contains(self.from_file, addr)


def _contains(nets: Iterable[Network], addr: Address) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


class NetworkWatcher(internet.TimerService):
    """
    Looks at the network files every few seconds and reads a changed one
    again on the disk thread pool, as the aliases watcher does; a file with a
    bad line, or that cannot be read, keeps the networks read before (the
    problem is logged with file and line).
    """

    log = SafeLogger()

    def __init__(
        self,
        lists: Iterable[NetworkList],
        reactor: Any,
        pool: Any,
        interval: float = NETWORK_CHECK_INTERVAL,
        now: Any = time.time,
    ) -> None:
        super().__init__(interval, self.check)
        self.clock = reactor
        self.reactor = reactor
        self.pool = pool
        self.lists = [nl for nl in lists if nl.path is not None]
        self.now = now  # the wall clock the files' modification times are on
        self._running: defer.Deferred | None = None

    def check(self) -> None:
        """Look for a change now (one look at a time)."""
        if self._running is not None:
            return
        d = deferToThreadPool(self.reactor, self.pool, self._read_changed)
        self._running = d  # before the callbacks: a pool may have answered already
        d.addCallback(self._install)
        d.addErrback(lambda f: self.log.failure("reading the network files failed", f))
        d.addBoth(self._done)

    def _done(self, _: Any) -> None:
        self._running = None

    def _read_changed(self) -> list[tuple[NetworkList, Any, Any]]:
        """On the thread pool: (list, signature, networks or the error) per changed file."""
        out: list[tuple[NetworkList, Any, Any]] = []
        for nl in self.lists:
            if not nl.changed():
                continue
            assert nl.path is not None
            signature = file_signature(nl.path)
            if signature is not None and 0 <= self.now() - signature[2] / 1e9 < SETTLE_TIME:
                continue  # being written: read at a later look
            try:
                out.append((nl, signature, read_network_file(nl.path)))
            except (OSError, NetworkError) as e:
                out.append((nl, signature, e))
        return out

    def _install(self, results: list[tuple[NetworkList, Any, Any]]) -> None:
        for nl, signature, nets in results:
            nl.signature = signature
            if isinstance(nets, Exception):
                self.log.warn(
                    "networks: {path}: {problem}; the networks read before stay",
                    path=str(nl.path),
                    problem=str(nets),
                )
                continue
            nl.from_file = nets
            self.log.info("networks: read {path}: {n} networks", path=str(nl.path), n=len(nets))
