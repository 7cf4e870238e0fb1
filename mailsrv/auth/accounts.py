"""
Password guessing at one account from many addresses, counted per account.

The per-address limit (L{mailsrv.auth.throttle}) stops one address; a
guesser with many addresses, each staying under it, can still guess at one
account (a distributed guess). So failed and unfinished logins are also
counted per account, across SMTP AUTH, POP3 and IMAP, within the same
window:

  - past C{slow_after} of them, every further attempt on the account waits
    before its password is checked: C{failure_delay}, doubled for each
    failure past the threshold, at most C{max_delay} (Dovecot's
    auth_penalty doubles its delay up to 15 s; it counts per address, this
    per account);
  - past C{max_failures}, attempts on the account are refused without a
    check until the failures expire out of the window, EXCEPT from the
    client addresses that logged in to it successfully within
    C{known_time} (at most C{known_clients} of them per account, IPv6 by
    its /64, as the per-address part counts them). Logins from those are
    not delayed either.

A per-account lockout would let anyone lock a user out by guessing wrong on
purpose; this one does not lock the owner out of the places they use: a
guesser can only slow, then refuse, logins from addresses the account was
never used from. A refusal is logged once per window for the account.
A waiting attempt holds its connection and a timer for at most
C{max_delay}; the per-address rule lets each address have at most its
C{max_failures} attempts unfinished, waiting ones among them, so a flood
cannot pile up timers beyond that.

Memory is bounded: accounts and clients are kept by a keyed 8-byte hash
(blake2b with a random key, so a guesser cannot aim hashes at one another),
each failure as 16 bytes (when, which client), at most C{max_failures} per
account (more cannot change a decision), for at most L{MAX_ACCOUNTS}
accounts, the least recently failed forgotten first (an account under
attack keeps failing or being refused, so a spray of other names does not
make it forgotten); accounts whose failures have all expired are swept once per
window. Known clients: at most C{known_clients} of 16 bytes per account,
for at most L{MAX_KNOWN_ACCOUNTS} accounts, least recently used forgotten
first (only a right password adds one).

A pure function of the clock's time, so tests advance a task.Clock.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mailsrv.logsafe import SafeLogger

MAX_ACCOUNTS = 50_000  # accounts whose failures are kept
MAX_KNOWN_ACCOUNTS = 100_000  # accounts whose known clients are kept
MAX_DOUBLINGS = 32  # the delay is capped long before this; bounds 2 ** n

# One entry: when (clock seconds) and a client's hash, packed end to end, oldest first.
_ENTRY = struct.Struct("=dQ")


@dataclass(frozen=True)
class AccountLimits:
    """
    The per-account rule's settings (the [auth] keys of the same names,
    without C{account_}): 0 for C{slow_after} or C{max_failures} turns that
    step off.
    """

    slow_after: int = 20  # failures on one account before attempts on it wait
    max_failures: int = 100  # failures on one account before attempts on it are refused
    max_delay: float = 15.0  # the longest wait (seconds)
    known_clients: int = 8  # addresses remembered per account after a successful login
    known_time: float = 30 * 86400.0  # how long a successful login keeps an address known


class AccountFailures:
    """Failed and unfinished logins per account, and the clients known to log in to it."""

    log = SafeLogger()

    def __init__(
        self, clock: Any, limits: AccountLimits, window: float, failure_delay: float
    ) -> None:
        self._clock = clock
        self._limits = limits
        self._window = window
        self._base = failure_delay
        self._hash_key = os.urandom(16)
        self._failures: dict[int, bytes] = {}  # account -> failures (_ENTRY), LRU order
        self._pending: Counter[int] = Counter()  # account -> attempts being checked
        self._known: dict[int, bytes] = {}  # account -> known clients (_ENTRY), LRU order
        self._told: dict[int, float] = {}  # account -> when its refusal may be logged again
        self._next_sweep = clock.seconds() + window
        # The most failures an account keeps: more cannot change a decision.
        if limits.max_failures:
            self._keep = limits.max_failures
        else:
            self._keep = limits.slow_after + MAX_DOUBLINGS

    def hash(self, text: str) -> int:
        """The keyed hash accounts and clients are kept by."""
        digest = hashlib.blake2b(
            text.encode("utf-8", "surrogatepass"), digest_size=8, key=self._hash_key
        ).digest()
        return int.from_bytes(digest, "little")

    # --- decisions ---------------------------------------------------------------

    def begin(self, account: str, client: str, name: str | bytes) -> float | None:
        """
        An attempt by C{client} on C{account}: None if refused, else the
        seconds to wait before its password is checked (0: at once). An
        attempt not refused is counted as unfinished until L{end}.
        C{name} is the account as the client typed it, for the log.
        """
        acct = self.hash(account)
        me = self.hash(client)
        if not self._is_known(acct, me):
            count = self.recent(acct) + self._pending[acct]
            limits = self._limits
            if limits.max_failures and count >= limits.max_failures:
                # Kept as recently used: a spray of other names cannot make it forgotten.
                packed = self._failures.pop(acct, None)
                if packed is not None:
                    self._failures[acct] = packed
                self._tell_refused(acct, name, count)
                return None
            delay = self._delay(count)
        else:
            delay = 0.0
        self._pending[acct] += 1
        return delay

    def end(self, account: str, client: str, failed: bool, succeeded: bool) -> None:
        """The attempt L{begin} let through has ended: failed, succeeded, or neither."""
        acct = self.hash(account)
        self._pending[acct] -= 1
        if self._pending[acct] <= 0:
            del self._pending[acct]
        if failed:
            self._failed(acct, self.hash(client))
        elif succeeded:
            self._succeeded(acct, self.hash(client))

    def _delay(self, count: int) -> float:
        slow = self._limits.slow_after
        if not slow or count < slow:
            return 0.0
        doublings = min(count - slow, MAX_DOUBLINGS)
        return min(self._limits.max_delay, self._base * 2**doublings)

    def _tell_refused(self, acct: int, name: str | bytes, count: int) -> None:
        """One log line per account per window, however many attempts are refused."""
        now = self._clock.seconds()
        if self._told.get(acct, 0.0) > now:
            return
        self._told[acct] = now + self._window
        self.log.warn(
            "logins to {account} refused for {window}s except from its known addresses: "
            "{count} failed logins to it (from any address) within the window",
            account=name,
            window=int(self._window),
            count=count,
        )

    # --- bookkeeping -------------------------------------------------------------

    def recent(self, acct: int) -> int:
        """How many failures account C{acct} has within the window (dropping older ones)."""
        packed = self._failures.get(acct)
        if packed is None:
            return 0
        packed = _unexpired(packed, self._clock.seconds() - self._window)
        if packed:
            self._failures[acct] = packed
        else:
            del self._failures[acct]
        return len(packed) // _ENTRY.size

    def _failed(self, acct: int, me: int) -> None:
        now = self._clock.seconds()
        self._sweep(now)
        self.recent(acct)
        # Taken out and put back: the dict's order is the order of last failure.
        packed = self._failures.pop(acct, b"") + _ENTRY.pack(now, me)
        if len(packed) > self._keep * _ENTRY.size:
            packed = packed[len(packed) - self._keep * _ENTRY.size :]
        self._failures[acct] = packed
        if len(self._failures) > MAX_ACCOUNTS:
            for a in list(self._failures)[: MAX_ACCOUNTS // 2]:
                del self._failures[a]

    def _succeeded(self, acct: int, me: int) -> None:
        """C{me} is known for C{acct} from now on; its own failures on it are forgiven."""
        packed = self._failures.get(acct)
        if packed is not None:
            kept = _without(packed, me)
            if kept:
                self._failures[acct] = kept
            else:
                del self._failures[acct]
        if not self._limits.known_clients:
            return
        now = self._clock.seconds()
        known = _without(self._known.pop(acct, b""), me) + _ENTRY.pack(now, me)
        keep = self._limits.known_clients * _ENTRY.size
        if len(known) > keep:
            known = known[len(known) - keep :]
        self._known[acct] = known
        if len(self._known) > MAX_KNOWN_ACCOUNTS:
            for a in list(self._known)[: MAX_KNOWN_ACCOUNTS // 2]:
                del self._known[a]

    def _is_known(self, acct: int, me: int) -> bool:
        packed = self._known.get(acct)
        if packed is None:
            return False
        cutoff = self._clock.seconds() - self._limits.known_time
        for i in range(0, len(packed), _ENTRY.size):
            when, client = _ENTRY.unpack_from(packed, i)
            if client == me and when > cutoff:
                return True
        return False

    def _sweep(self, now: float) -> None:
        """Once per window, forget the accounts whose failures have all expired."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._window
        cutoff = now - self._window
        size = _ENTRY.size
        gone = [
            a
            for a, p in self._failures.items()
            if _ENTRY.unpack_from(p, len(p) - size)[0] <= cutoff
        ]
        for a in gone:
            del self._failures[a]
        self._told = {a: t for a, t in self._told.items() if t > now}
        known_cutoff = now - self._limits.known_time
        stale = [
            a
            for a, p in self._known.items()
            if _ENTRY.unpack_from(p, len(p) - size)[0] <= known_cutoff
        ]
        for a in stale:
            del self._known[a]

    def tracked(self) -> tuple[int, int, int]:
        """Accounts with failures, failures, and accounts with known clients: the memory kept."""
        return (
            len(self._failures),
            sum(len(p) for p in self._failures.values()) // _ENTRY.size,
            len(self._known),
        )


def _unexpired(packed: bytes, cutoff: float) -> bytes:
    """C{packed} entries without those at or before C{cutoff} (they come oldest first)."""
    i = 0
    while i < len(packed) and _ENTRY.unpack_from(packed, i)[0] <= cutoff:
        i += _ENTRY.size
    return packed[i:] if i else packed


def _without(packed: bytes, client: int) -> bytes:
    """C{packed} entries without those of C{client}."""
    return b"".join(
        packed[i : i + _ENTRY.size]
        for i in range(0, len(packed), _ENTRY.size)
        if _ENTRY.unpack_from(packed, i)[1] != client
    )


def account_limits(auth: Any) -> AccountLimits | None:
    """The per-account settings of an [auth] config section, or None if both steps are off."""
    if not auth.account_slow_after and not auth.account_max_failures:
        return None
    return AccountLimits(
        slow_after=auth.account_slow_after,
        max_failures=auth.account_max_failures,
        max_delay=auth.account_max_delay,
        known_clients=auth.account_known_clients,
        known_time=float(auth.account_known_time),
    )
