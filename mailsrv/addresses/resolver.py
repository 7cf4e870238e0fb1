"""
The address rules of the routing step: what an address of one of our
domains stands for. L{AddressRules.resolve} follows an address through the
aliases file, domain aliases, sub-addressing, C{postmaster@}/C{abuse@}, the
catch-alls and SRS to its final recipients: local users (with the folder a
detail names) and addresses at other servers.

For an address in a local domain, in this order (as Postfix's
C{virtual_alias_maps}, local(8) and C{recipient_delimiter} do):

  1. the aliases file: the full address, else a bare name when the domain
     is one of C{server.domains};
  2. a domain alias (C{domain_aliases}): the same local part in the domain
     it stands for, from step 1 again;
  3. a user of that address (the password file);
  4. with a detail (C{alice+lists}): the address without it, by steps 1
     and 3; a user gets the message filed in the folder the detail names
     when that folder exists (L{mailsrv.store.target});
  5. C{postmaster} and C{abuse} (RFC 5321 4.5.1, RFC 2142): the configured
     C{postmaster} address;
  6. the domain's catch-all, when one is configured (for an address a
     domain alias led to, the alias domain's own catch-all comes first).

An address at C{srs_domain} with the form of an SRS address is a bounce
coming back to mail we forwarded: it is verified (hash and time stamp) and
stands for the original sender; a forged or expired one is refused. This
comes before every other rule, as the SRS domain may be a local domain too.

Resolution is synchronous and reads only memory (the alias table, the
password file's cache): it runs on the reactor thread at RCPT time. The
alias table is re-read off the reactor by L{AliasWatcher}.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application import internet
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mailsrv.addresses.aliases import (
    MAX_EXPANSION_DEPTH,
    MAX_EXPANSION_STEPS,
    AliasSyntaxError,
    AliasTable,
    _split_parsed,
    format_address,
    normalise_domain,
    parse_aliases,
    settled,
)
from mailsrv.addresses.srs import (
    SECRET_FILE,
    ExpiredSRSAddress,
    SRSError,
    SRSRewriter,
    load_or_create_secret,
)
from mailsrv.interfaces import IPasswordDatabase, PasswordDatabaseError
from mailsrv.logsafe import SafeLogger

#: RFC 5321 4.1.2 quoted-pairSMTP.
_QUOTED_PAIR = re.compile(r"\\(.)")
#: Local parts that exist in every local domain (RFC 5321 4.5.1, RFC 2142).
ROLE_ACCOUNTS = frozenset({"postmaster", "abuse"})
#: How many expansion steps one SMTP transaction may spend (L{ExpansionBudget}).
MAX_TRANSACTION_STEPS = 50_000
#: How often the aliases file is looked at for changes (seconds).
ALIAS_CHECK_INTERVAL = 5.0
#: How long a changed aliases file must be left alone before it is taken.
SETTLE_TIME = 1.0
_UNSETTLED = object()


def fast_domain(domain: str) -> str:
    """C{domain} in the one form domains are compared in (L{normalise_domain}), quickly."""
    d = domain.lower().rstrip(".")
    if d.isascii() and "xn--" not in d:
        return d  # an ASCII name without A-labels is its own normal form
    try:
        return normalise_domain(d)
    except AliasSyntaxError:
        return d


@dataclass(frozen=True, slots=True)
class Final:
    """One final recipient of an address."""

    address: str  # a local user's stored spelling, or the address at another server
    local: bool
    detail: str | None = None  # the sub-address (alice+lists: "lists")
    forwarded: bool = False  # reached through an alias or SRS: to be sent with an SRS sender
    mailing_list: str | None = None  # the list alias it was reached through


@dataclass(frozen=True, slots=True)
class Resolved:
    """
    What an address stands for: C{finals} in order, each once; C{unknown},
    addresses of our domains that are nobody (members of an alias, logged and
    skipped); C{error}, why there are none (a loop, a forged SRS address);
    C{temporary}, a local problem (the user database cannot be read).
    """

    finals: tuple[Final, ...] = ()
    unknown: tuple[str, ...] = ()
    error: str | None = None
    error_kind: str = ""  # "loop" | "srs" | "syntax" | "budget"
    temporary: str | None = None
    steps: int = field(default=0, compare=False)  # the addresses visited: its cost


@dataclass
class ExpansionBudget:
    """
    The expansion steps one SMTP transaction may still spend on the reactor
    thread: each RCPT of a big alias costs up to L{MAX_EXPANSION_STEPS}
    (about 3 us each); a transaction of many such RCPTs stops at
    L{MAX_TRANSACTION_STEPS} with 452 4.5.3 instead of holding the reactor
    for seconds.
    """

    remaining: int = 0

    @classmethod
    def for_transaction(cls) -> ExpansionBudget:
        return cls(MAX_TRANSACTION_STEPS)


@dataclass(frozen=True)
class AddressSettings:
    """The [addresses] settings the rules use (L{mailsrv.config.AddressesConfig})."""

    domains: frozenset[str]  # where users live
    recipient_delimiter: str = "+"
    postmaster: str | None = None
    catch_all: Mapping[str, str] = field(default_factory=dict)
    domain_aliases: Mapping[str, str] = field(default_factory=dict)
    srs_domain: str | None = None
    lists: Mapping[str, str] = field(default_factory=dict)
    # Folders a sub-address never files into (lower case): the special-use
    # ones (RFC 6154), so that no sender can put mail in Sent, Drafts or Trash.
    protected_folders: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: Any) -> AddressSettings:
        a = config.addresses
        return cls(
            domains=frozenset(config.server.domains),
            recipient_delimiter=a.recipient_delimiter,
            postmaster=a.postmaster,
            catch_all=dict(a.catch_all),
            domain_aliases=dict(a.domain_aliases),
            srs_domain=a.srs_domain,
            lists={k.lower(): v for k, v in a.lists.items()},
            protected_folders=frozenset(f.lower() for f in config.imap.special_folders),
        )


#: One address to visit in L{AddressRules.resolve}.
_Visit = tuple[str, str, int, frozenset, bool, bool, "str | None", "str | None"]


class AddressRules:
    """The address rules of one server; see the module docstring."""

    log = SafeLogger()

    def __init__(
        self,
        settings: AddressSettings,
        *,
        aliases: AliasTable | None = None,
        srs: SRSRewriter | None = None,
    ) -> None:
        self.settings = settings
        self.aliases = aliases
        self.srs = srs
        self._local = settings.domains | frozenset(settings.domain_aliases)

    def is_local_domain(self, domain: str) -> bool:
        return fast_domain(domain) in self._local

    # --- resolution ----------------------------------------------------------

    def resolve(
        self, address: str, passwords: IPasswordDatabase, budget: ExpansionBudget | None = None
    ) -> Resolved:
        """
        The final recipients of C{address} (any domain); see the module
        docstring. C{budget}: the steps the caller may still spend (those
        spent are taken from it); beyond it, an error of kind "budget".
        """
        limit = MAX_EXPANSION_STEPS
        if budget is not None and budget.remaining < limit:
            limit = budget.remaining
        result = self._resolve(address, passwords, limit)
        if budget is not None:
            budget.remaining = max(0, budget.remaining - result.steps)
            if result.error_kind == "loop" and result.steps > limit and limit < MAX_EXPANSION_STEPS:
                return Resolved(
                    error="the transaction's recipients expand to too many addresses",
                    error_kind="budget",
                    steps=result.steps,
                )
        return result

    def _resolve(self, address: str, passwords: IPasswordDatabase, limit: int) -> Resolved:
        local, at, domain = address.rpartition("@")
        if not at or not local:
            return Resolved(error=f"not an address: {address!r}", error_kind="syntax")
        if len(local) >= 2 and local[0] == local[-1] == '"':
            # RFC 5321 4.1.2: "john doe" is the Quoted-string form of the local
            # part john doe (and "alice" of alice); the rules name the part.
            local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
            if not local:
                return Resolved(error=f"not an address: {address!r}", error_kind="syntax")
        domain = fast_domain(domain)
        finals: dict[tuple[bool, str], Final] = {}
        unknown: dict[str, None] = {}
        # Depth-first, in the order listed: (local, domain, depth, the keys of
        # the rules on the way here, skip the aliases file, reached through a
        # rewrite, the list alias on the way, the catch-all of the domain alias
        # that led here).
        stack: list[_Visit] = [(local, domain, 0, frozenset(), False, False, None, None)]
        steps = 0
        while stack:
            steps += 1
            if steps > limit:
                return Resolved(
                    error=f"aliases expand to more than {limit} addresses",
                    error_kind="loop",
                    steps=steps,
                )
            local, domain, depth, path, as_is, rewritten, mlist, catch_all = stack.pop()
            # SRS first: the SRS domain may be one of our mail domains too
            # (postsrsd's usual set-up), whose other rules (a catch-all) must
            # not take a forged SRS address.
            srs = self._srs_original(local, domain)
            if isinstance(srs, Resolved):
                return srs
            targets: tuple[str, ...]
            then_catch_all = None  # for the targets: the catch-all of a domain alias
            if srs is not None:
                targets, stored, detail = (srs,), None, None
            elif domain not in self._local:
                key = (False, format_address(local, domain))
                finals.setdefault(key, Final(key[1], False, None, rewritten, mlist))
                continue
            else:
                try:
                    targets, stored, detail, then_catch_all = self._step(
                        local, domain, as_is, passwords, catch_all
                    )
                except PasswordDatabaseError as e:
                    return Resolved(temporary=str(e))
            if stored is not None:
                finals.setdefault((True, stored), Final(stored, True, detail, False, mlist))
                continue
            if not targets:
                unknown[format_address(local, domain)] = None
                continue
            node = (local.lower(), domain)
            if node in path:
                return Resolved(
                    error=f"alias loop at {format_address(local, domain)}", error_kind="loop"
                )
            if depth >= MAX_EXPANSION_DEPTH:
                return Resolved(
                    error=f"aliases nest deeper than {MAX_EXPANSION_DEPTH}", error_kind="loop"
                )
            if mlist is None:
                name = format_address(local, domain).lower()
                if name in self.settings.lists:
                    mlist = name
            inner = path | {node}
            for target in reversed(targets):
                try:
                    t_local, t_dom = _split_parsed(target)
                except AliasSyntaxError:
                    t_local, t_dom = target, None
                t_domain = domain if t_dom is None else fast_domain(t_dom)
                itself = (t_local.lower(), t_domain) == node
                stack.append(
                    (t_local, t_domain, depth + 1, inner, itself, True, mlist, then_catch_all)
                )
        return Resolved(tuple(finals.values()), tuple(unknown), steps=steps)

    def _step(
        self,
        local: str,
        domain: str,
        as_is: bool,
        passwords: IPasswordDatabase,
        catch_all: str | None = None,
    ) -> tuple[tuple[str, ...], str | None, str | None, str | None]:
        """
        One rule applied to C{local@domain} (a local domain): (targets, None,
        None, X) for a rewrite, ((), stored user, detail, None) for a user,
        ((), None, None, None) for nobody. C{catch_all}: the one to use
        instead of the domain's (that of the domain alias the address was
        rewritten from); X, the one the targets are to use (the catch-all of
        a domain alias, whose own unknown addresses are its).
        """
        s = self.settings
        if not as_is and self.aliases is not None:
            targets = self.aliases.lookup(local, domain)
            if targets is not None:
                return targets, None, None, None
        alias_of = s.domain_aliases.get(domain)
        if alias_of is not None:
            return (format_address(local, alias_of),), None, None, s.catch_all.get(domain)
        stored = passwords.lookup(format_address(local, domain))
        if stored is not None:
            return (), stored, None, None
        base, detail = self._split_detail(local)
        if detail is not None and base:
            if self.aliases is not None:
                targets = self.aliases.lookup(base, domain)
                if targets is not None:
                    return targets, None, None, None
            stored = passwords.lookup(format_address(base, domain))
            if stored is not None:
                if detail.lower() in s.protected_folders:
                    detail = ""  # a special-use folder: the INBOX
                return (), stored, detail or None, None
        if s.postmaster is not None and (base or local).lower() in ROLE_ACCOUNTS:
            return (s.postmaster,), None, None, None
        if catch_all is None:
            catch_all = s.catch_all.get(domain)
        if catch_all is not None:
            return (catch_all,), None, None, None
        return (), None, None, None

    def _split_detail(self, local: str) -> tuple[str, str | None]:
        """C{alice+lists} -> (alice, lists): at the first delimiter character."""
        delimiters = self.settings.recipient_delimiter
        if not delimiters:
            return local, None
        cut = min((i for i in (local.find(d) for d in delimiters) if i >= 0), default=-1)
        if cut < 0:
            return local, None
        return local[:cut], local[cut + 1 :]

    def _srs_original(self, local: str, domain: str) -> str | Resolved | None:
        """
        For an SRS address at our C{srs_domain}: where it goes back to (or why
        not, a L{Resolved}); None for any other address.
        """
        if self.srs is None or domain != self.settings.srs_domain:
            return None
        address = format_address(local, domain)
        if not self.srs.is_srs(address):
            return None
        try:
            return self.srs.reverse(address)
        except ExpiredSRSAddress as e:
            return Resolved(error=str(e), error_kind="srs")
        except SRSError as e:
            return Resolved(error=str(e), error_kind="srs")

    def is_srs_address(self, address: str) -> bool:
        """Whether C{address} has the form of one of our SRS addresses (genuine or not)."""
        local, _, domain = address.rpartition("@")
        return (
            self.srs is not None
            and fast_domain(domain) == self.settings.srs_domain
            and self.srs.is_srs(address)
        )

    # --- senders -------------------------------------------------------------

    def owned_by(self, address: str, user: str, passwords: IPasswordDatabase) -> bool:
        """
        Whether the logged-in C{user} may send as C{address}: it is the user's
        own address, or an address of our domains that reaches only that user
        (an alias, a sub-address, a domain alias of it).

        @raise PasswordDatabaseError: the users cannot be read now (a local
            problem: "try again", not "not yours").
        """
        # Users are told apart as the password file does (its stored spelling,
        # L{mailsrv.auth.passwd.lookup_key}), never by a looser comparison:
        # straße@ and strasse@ may be two users.
        if address == user:
            return True
        _, at, domain = address.rpartition("@")
        if not at or not self.is_local_domain(domain) or self.is_srs_address(address):
            return False
        result = self.resolve(address, passwords)
        if result.temporary is not None:
            raise PasswordDatabaseError(result.temporary)
        if result.error or result.unknown or not result.finals:
            return False
        me = passwords.lookup(user) or user
        return all(f.local and f.address == me for f in result.finals)

    def forward_sender(self, sender: str) -> str:
        """
        The envelope sender for a copy forwarded to another server: an SRS
        address in C{srs_domain}, so that the receiver's SPF check sees our
        domain (and bounces come back to us to be sent on). The null sender
        stays null (RFC 5321 4.5.5), and addresses of our own domains, which
        our SPF record covers, are kept.
        """
        if not sender or self.srs is None:
            return sender
        _, at, domain = sender.rpartition("@")
        if not at or self.is_local_domain(domain):
            return sender
        if self.is_srs_address(sender):
            return sender  # one of ours already
        try:
            return self.srs.forward(sender)
        except (SRSError, ValueError) as e:
            self.log.warn(
                "cannot make an SRS sender for <{sender}>: {why}", sender=sender, why=str(e)
            )
            return sender

    def list_id(self, mailing_list: str | None) -> str | None:
        """The List-Id value (RFC 2919) for mail through C{mailing_list}, or None."""
        if mailing_list is None:
            return None
        return self.settings.lists.get(mailing_list) or None


class AliasWatcher(internet.TimerService):
    """
    Looks at the aliases file (and its C{:include:} files) every few seconds
    and, when one changed, reads it again on the disk thread pool; the new
    table replaces the old on the reactor thread in one step. Problems are
    logged with file and line; a file that cannot be read keeps the aliases
    read before.
    """

    log = SafeLogger()

    def __init__(
        self,
        table: AliasTable,
        reactor: Any,
        pool: Any,
        interval: float = ALIAS_CHECK_INTERVAL,
        process: str = "server",
    ) -> None:
        super().__init__(interval, self.check)
        self.clock = reactor
        self.table = table
        self.reactor = reactor
        self.pool = pool
        self.process = process  # which process reads: the server or the relay process
        self._running: defer.Deferred | None = None
        self._again: Any = None  # the look after a file that was being written

    def stopService(self) -> Any:
        if self._again is not None and self._again.active():
            self._again.cancel()
        return super().stopService()

    def check(self) -> None:
        """
        Look for a change now (one look at a time). The timer does not wait
        for it: stopping never waits for a slow disk.
        """
        if self._running is not None:
            return
        d = deferToThreadPool(self.reactor, self.pool, self._read_if_changed)
        d.addCallback(self._install)
        d.addErrback(lambda f: self.log.failure("reading the aliases file failed", f))
        d.addBoth(self._done)
        self._running = d

    def _done(self, _: Any) -> None:
        self._running = None

    def _read_if_changed(self) -> Any:
        if not self.table.changed():
            return None
        parsed = parse_aliases(self.table.path)
        if not settled(parsed, time.time(), SETTLE_TIME):
            return _UNSETTLED
        return parsed

    def _install(self, parsed: Any) -> None:
        if parsed is None:
            return
        if parsed is _UNSETTLED:
            # Being written: a half-written file would make the aliases past
            # its end unknown (550 for their mail). Look again shortly.
            if self.running and (self._again is None or not self._again.active()):
                self._again = self.reactor.callLater(SETTLE_TIME, self.check)
            return
        problems = self.table.install(parsed)
        self.log.info(
            "aliases: read {path}: {n} entries (by the {process})",
            path=str(self.table.path),
            n=len(self.table.entries),
            process=self.process,
        )
        for problem in problems:
            self.log.warn("aliases: {problem}", problem=problem)


def log_problems(table: AliasTable, log: Callable[..., None]) -> None:
    """Log the problems found when C{table} was first read."""
    for problem in table.problems:
        log("aliases: {problem}", problem=problem)


def address_rules(config: Any, reactor: Any) -> AddressRules:
    """
    The address rules of C{config}: its aliases file read now (blocking: at
    start-up), the SRS secret of its data folder read or made.
    """
    a = config.addresses
    table = AliasTable(a.aliases, config.server.domains)
    secret = load_or_create_secret(config.server.data_dir / SECRET_FILE)
    srs = SRSRewriter(secret, a.srs_domain, now=reactor.seconds)
    return AddressRules(AddressSettings.from_config(config), aliases=table, srs=srs)
