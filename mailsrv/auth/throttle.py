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

There is no lock per account across addresses: anyone could then lock a
user out by guessing wrong on purpose (Dovecot has none either). Guessing
from many addresses is slowed by each address's own limit and the delay
before each failure is answered.

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

A pure function of the clock's time, so tests advance a task.Clock.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure

MAX_TRACKED = 100_000  # client addresses kept; bounds memory under a spray of addresses
MAX_ACCOUNT_LENGTH = 320  # RFC 5321 4.5.3.1: 64 + 1 + 255, with room

SUCCEEDED, FAILED, ABANDONED = "succeeded", "failed", "abandoned"


class LoginThrottled(Exception):
    """The login was refused without checking the password: too many failures."""


def account_key(username: str | bytes) -> str:
    """The account a client names, as the throttle counts it (case does not matter)."""
    if isinstance(username, bytes):
        username = username.decode("utf-8", "replace")
    return username.strip().lower().rstrip(".")[:MAX_ACCOUNT_LENGTH]


class LoginAttempt:
    """One reserved login; ended exactly once by L{succeeded}, L{failed} or L{abandoned}."""

    def __init__(
        self, host: str, account: str, on_end: Callable[[LoginAttempt, str], None]
    ) -> None:
        self.host = host
        self.account = account
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
    """Failed and unfinished logins per client address, each kept with its account."""

    def __init__(self, clock: Any, max_failures: int, window: float) -> None:
        self._clock = clock
        self._max = max_failures
        self._window = window
        self._failures: dict[str, deque[tuple[float, str]]] = {}  # host -> (when, account)
        self._pending: Counter[str] = Counter()  # host -> attempts being checked

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
        """Reserve a login attempt by C{host} for C{username}, or None if refused."""
        if self.blocked(host):
            return None
        self._pending[host] += 1
        return LoginAttempt(host, account_key(username), self._ended)

    def blocked(self, host: str) -> bool:
        """Whether C{host} must be refused without a check."""
        return len(self._recent(host)) + self._pending[host] >= self._max

    # --- bookkeeping -------------------------------------------------------------

    def _recent(self, host: str) -> deque[tuple[float, str]]:
        q = self._failures.get(host)
        if q is None:
            return deque()
        cutoff = self._clock.seconds() - self._window
        while q and q[0][0] <= cutoff:
            q.popleft()
        if not q:
            del self._failures[host]
        return q

    def _ended(self, attempt: LoginAttempt, outcome: str) -> None:
        host = attempt.host
        self._pending[host] -= 1
        if self._pending[host] <= 0:
            del self._pending[host]
        if outcome == FAILED:
            self._failed(host, attempt.account)
        elif outcome == SUCCEEDED:
            self._succeeded(host, attempt.account)

    def _failed(self, host: str, account: str) -> None:
        self._recent(host)
        self._failures.setdefault(host, deque()).append((self._clock.seconds(), account))
        if len(self._failures) > MAX_TRACKED:
            for h in list(self._failures)[: MAX_TRACKED // 2]:
                del self._failures[h]

    def _succeeded(self, host: str, account: str) -> None:
        """Forget C{host}'s failures against C{account}; keep those against others."""
        q = self._failures.get(host)
        if q is None:
            return
        kept = deque(e for e in q if e[1] != account)
        if kept:
            self._failures[host] = kept
        else:
            del self._failures[host]
