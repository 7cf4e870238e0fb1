"""
Password guessing limits, one rule for SMTP AUTH, POP3 and IMAP.

Every login goes through L{LoginThrottle.login}: it reserves an attempt
before the password is checked, and records the outcome once the check is
done. Attempts still being checked count as failures until they end, so a
client that sends many guesses at once gets no more checked than one that
waits for each answer.

The model is Dovecot's auth_penalty (per client address) with Postfix
anvil's sliding window. Failures are counted per client address, each kept
with the account it was for, so that:

  - an address is refused once it has C{max_failures} failed or unfinished
    logins within the window, whatever accounts they were for;
  - a successful login to account A from address H forgives H's failures
    against A only (the owner who mistyped): never H's failures against
    other accounts. Logging in to an account of one's own buys no more
    guesses at someone else's.

Failures are also counted per account, whatever the address
(L{mailsrv.auth.accounts}): past a first threshold every attempt on the
account waits longer before its check (doubling, capped), past a second
one it is refused, except from the addresses that logged in to that
account successfully before. That is no lockout: anyone could otherwise
lock a user out by guessing wrong on purpose, and the owner keeps logging
in from the usual places.

When it is answered, the same in all three protocols: a password that was
checked and found wrong is answered after C{failure_delay}
(L{mailsrv.auth.checkers.PasswordChecker}); a login refused here, without a
check, is answered at once (SMTP 454 4.7.0, POP3 -ERR [AUTH], IMAP NO
[UNAVAILABLE]). The delay is what makes each guess cost the guesser time,
and it only has a point where a guess was checked. A refused login tests no
password, so a guesser gains nothing from its answer and loses nothing by
waiting for it (he opens more connections instead): delaying it would cost
him nothing, while each delayed answer would hold a timer and a connection
(a descriptor and its buffers) on the server for the length of the delay,
which a flood of refused logins would turn into a way to pin the server's
resources. What keeps costing the guesser is that every refused guess is
wasted until the window has passed.

IPv6 clients are counted by their /64, as one client: an end site gets a
/64 at least (RFC 6177), so a client could otherwise take a new address
for each guess. Dovecot's auth penalty groups IPv6 clients too (by /48).

The memory kept is bounded: at most C{max_failures} failures per client,
each 16 bytes (when, and a keyed 8-byte hash of the account), for at most
MAX_TRACKED clients; clients whose failures have all expired are swept out
once per window, so a spray of addresses that never return is forgotten.

A pure function of the clock's time, so tests advance a task.Clock.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailsrv.auth.accounts import AccountFailures, AccountLimits

MAX_TRACKED = 100_000  # client addresses kept; bounds memory under a spray of addresses
MAX_ACCOUNT_LENGTH = 320  # RFC 5321 4.5.3.1: 64 + 1 + 255, with room
IPV6_PREFIX = 64  # RFC 6177: the least an end site is given

# One failure: when (clock seconds) and the account's hash. A client's
# failures are these packed end to end, oldest first.
_FAILURE = struct.Struct("=dQ")

SUCCEEDED, FAILED, ABANDONED = "succeeded", "failed", "abandoned"


class LoginThrottled(Exception):
    """The login was refused without checking the password: too many failures."""


def account_key(username: str | bytes) -> str:
    """The account a client names, as the throttle counts it (case does not matter)."""
    if isinstance(username, bytes):
        username = username.decode("utf-8", "replace")
    return username.strip().lower().rstrip(".")[:MAX_ACCOUNT_LENGTH]


# Memoized (a pure function of the text; some 10 us a parse, asked several times a message).
@functools.lru_cache(maxsize=4096)
def client_key(host: str) -> str:
    """The client address failures are counted for: an IPv6 one by its /64."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return host


class LoginAttempt:
    """One reserved login; ended exactly once by L{succeeded}, L{failed} or L{abandoned}."""

    def __init__(
        self,
        host: str,
        account: str,
        on_end: Callable[[LoginAttempt, str], None],
        delay: float = 0.0,
    ) -> None:
        self.host = host
        self.account = account
        self.delay = delay  # seconds to wait before the password is checked
        self._on_end: Callable[[LoginAttempt, str], None] | None = on_end

    def _end(self, outcome: str) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self, outcome)

    def succeeded(self) -> None:
        """The password was right."""
        self._end(SUCCEEDED)

    def failed(self) -> None:
        """The password (or the user) was wrong."""
        self._end(FAILED)

    def abandoned(self) -> None:
        """The check did not decide (a local error): counted neither way."""
        self._end(ABANDONED)


class LoginThrottle:
    """
    Failed and unfinished logins per client address, each kept with its
    account, and per account (when C{accounts} is given; C{failure_delay}
    is where its growing delay starts).
    """

    def __init__(
        self,
        clock: Any,
        max_failures: int,
        window: float,
        accounts: AccountLimits | None = None,
        failure_delay: float = 2.0,
    ) -> None:
        self._clock = clock
        self._accounts = (
            None if accounts is None else AccountFailures(clock, accounts, window, failure_delay)
        )
        self._max = max_failures
        self._window = window
        self._failures: dict[str, bytes] = {}  # client -> its failures (_FAILURE, packed)
        self._pending: Counter[str] = Counter()  # client -> attempts being checked
        self._hash_key = os.urandom(16)  # account hashes that cannot be aimed at one another
        self._next_sweep = clock.seconds() + window

    # --- the entry point ---------------------------------------------------------

    def login(
        self, portal: Any, host: str, credentials: Any, mind: Any, *interfaces: Any
    ) -> defer.Deferred:
        """
        C{portal.login(credentials, mind, *interfaces)} for a client at
        C{host}, if the limit allows: fails at once with L{LoginThrottled}
        when it does not, else fires as the portal does, recording the
        outcome (L{UnauthorizedLogin} is a failure; other errors count
        neither way).
        """
        attempt = self.reserve(host, credentials.username)
        if attempt is None:
            return defer.fail(LoginThrottled(host))
        if attempt.delay > 0:
            # The account is being guessed at: this attempt waits before its check.
            d = task.deferLater(
                self._clock, attempt.delay, portal.login, credentials, mind, *interfaces
            )
        else:
            d = defer.maybeDeferred(portal.login, credentials, mind, *interfaces)

        def ok(result: Any) -> Any:
            attempt.succeeded()
            return result

        def failed(f: Failure) -> Failure:
            if f.check(UnauthorizedLogin):
                attempt.failed()
            else:
                attempt.abandoned()
            return f

        return d.addCallbacks(ok, failed)

    def reserve(self, host: str, username: str | bytes) -> LoginAttempt | None:
        """
        Reserve a login attempt by C{host} for C{username}, or None if
        refused; its C{delay} is how long to wait before checking it.
        """
        if self.blocked(host):
            return None
        client = client_key(host)
        account = account_key(username)
        delay = 0.0
        if self._accounts is not None:
            wait = self._accounts.begin(account, client, username)
            if wait is None:
                return None
            delay = wait
        self._pending[client] += 1
        return LoginAttempt(client, account, self._ended, delay)

    def blocked(self, host: str) -> bool:
        """Whether C{host} must be refused without a check."""
        client = client_key(host)
        return self._recent(client) + self._pending[client] >= self._max

    def tracked(self) -> tuple[int, int]:
        """How many clients and failures are kept: what bounds the memory used."""
        return len(self._failures), sum(len(p) for p in self._failures.values()) // _FAILURE.size

    def tracked_accounts(self) -> tuple[int, int, int]:
        """Accounts with failures, their failures, accounts with known clients (0s if off)."""
        return (0, 0, 0) if self._accounts is None else self._accounts.tracked()

    # --- bookkeeping -------------------------------------------------------------

    def _account_hash(self, account: str) -> int:
        digest = hashlib.blake2b(
            account.encode("utf-8", "surrogatepass"), digest_size=8, key=self._hash_key
        ).digest()
        return int.from_bytes(digest, "little")

    def _recent(self, client: str) -> int:
        """How many failures C{client} has within the window (dropping older ones)."""
        packed = self._failures.get(client)
        if packed is None:
            return 0
        packed = _unexpired(packed, self._clock.seconds() - self._window)
        if packed:
            self._failures[client] = packed
        else:
            del self._failures[client]
        return len(packed) // _FAILURE.size

    def _ended(self, attempt: LoginAttempt, outcome: str) -> None:
        client = attempt.host
        self._pending[client] -= 1
        if self._pending[client] <= 0:
            del self._pending[client]
        if self._accounts is not None:
            self._accounts.end(attempt.account, client, outcome == FAILED, outcome == SUCCEEDED)
        if outcome == FAILED:
            self._failed(client, attempt.account)
        elif outcome == SUCCEEDED:
            self._succeeded(client, attempt.account)

    def _failed(self, client: str, account: str) -> None:
        now = self._clock.seconds()
        self._sweep(now)
        self._recent(client)
        packed = self._failures.get(client, b"") + _FAILURE.pack(now, self._account_hash(account))
        if len(packed) > self._max * _FAILURE.size:
            # Never more than the limit: the oldest beyond it cannot change a decision.
            packed = packed[len(packed) - self._max * _FAILURE.size :]
        self._failures[client] = packed
        if len(self._failures) > MAX_TRACKED:
            for c in list(self._failures)[: MAX_TRACKED // 2]:
                del self._failures[c]

    def _succeeded(self, client: str, account: str) -> None:
        """Forget C{client}'s failures against C{account}; keep those against others."""
        packed = self._failures.get(client)
        if packed is None:
            return
        mine = self._account_hash(account)
        kept = b"".join(
            packed[i : i + _FAILURE.size]
            for i in range(0, len(packed), _FAILURE.size)
            if _FAILURE.unpack_from(packed, i)[1] != mine
        )
        if kept:
            self._failures[client] = kept
        else:
            del self._failures[client]

    def _sweep(self, now: float) -> None:
        """
        Once per window, forget the clients whose failures have all expired.
        A client looked at is either forgotten or has failed since the last
        sweep, so the cost is amortised over the failures recorded.
        """
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._window
        cutoff = now - self._window
        size = _FAILURE.size
        gone = [
            c
            for c, p in self._failures.items()
            if _FAILURE.unpack_from(p, len(p) - size)[0] <= cutoff
        ]
        for c in gone:
            del self._failures[c]


def _unexpired(packed: bytes, cutoff: float) -> bytes:
    """C{packed} failures without those at or before C{cutoff} (they come oldest first)."""
    i = 0
    while i < len(packed) and _FAILURE.unpack_from(packed, i)[0] <= cutoff:
        i += _FAILURE.size
    return packed[i:] if i else packed
