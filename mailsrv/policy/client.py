"""
What the server finds out about an SMTP client while it waits to greet it:
its forward-confirmed name (L{mailsrv.policy.rdns}) and, on the MX, what
the DNS block and allow lists say (L{mailsrv.policy.dnsbl}), looked up
together, within one timeout. The connection gate
(L{mailsrv.policy.listener}) starts the lookups when the connection is
accepted and hands the L{ClientReport} to the session (L{IClientChecked})
before the greeting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from zope.interface import Interface, implementer

from mailsrv.logsafe import SafeLogger
from mailsrv.outbound.mx import make_resolver
from mailsrv.policy.dnsbl import DNSBLCheck, DNSBLVerdict, DNSLists, Listing
from mailsrv.policy.networks import client_address
from mailsrv.policy.rdns import ReverseDNS
from mailsrv.replies import Reply, ReplyError

# postscreen's refusal of a listed client, as the greeting: 554 refuses the
# session (RFC 5321 3.1, 4.2.2), 5.7.1 delivery not authorized (RFC 3463 3.8).
BLOCKED = "554 5.7.1 Service unavailable; client {literal} blocked using {zone}\r\n"
# Postfix's reject_unknown_client_hostname, at RCPT: 450 (its
# unknown_client_reject_code; DNS may be failing for now) with 4.7.25
# reverse DNS validation failed (RFC 7372 3.3).
UNKNOWN_CLIENT = Reply(450, "4.7.25", "Client host rejected: cannot find your hostname, {literal}")

MX = "smtp"  # the listener the lists and reject_unknown_client apply to

# DNS lookups at connect under way at once. Each holds a UDP socket until
# it is answered or times out, and clients from ever new addresses (an IPv6
# network) whose DNS never answers could otherwise start them faster than
# they end, until the server has no file descriptor left. Past the bound a
# lookup fails at once: the client passes unchecked, as on a timeout.
MAX_LOOKUPS = 256


def _literal(host: str) -> str:
    addr = client_address(host)
    return f"[{addr if addr is not None else host}]"


@dataclass(frozen=True)
class ClientReport:
    """What the checks at connect found about one SMTP client."""

    address: str
    name: str | None = None  # forward-confirmed reverse DNS name; None: unknown
    # Why the per-client checks (DNSBL, greylisting, reject_unknown_client)
    # are skipped: "allow" (an allowed network) or "dnswl ZONE"; None: not exempt.
    exempt: str | None = None
    blocked_by: Listing | None = None  # the DNSBL that refuses the connection
    refusal: bytes | None = None  # the greeting that refuses it
    rcpt_refusal: ReplyError | None = None  # the reply to every RCPT


class IClientChecked(Interface):
    """A session that is told what the checks at connect found about its client."""

    def client_checked(report: ClientReport) -> None:  # noqa: N805 (zope.interface)
        """Called once, before the session's connectionMade."""


@implementer(IClientChecked)
class ClientChecked:
    """
    The part of an SMTP session that keeps what the checks at connect found:
    C{client_name}, the client's forward-confirmed name (None: unknown, or
    not looked up), for C{Received:} and later checks; C{client}, the whole
    report (C{client.exempt}: an allowed network or a DNSWL listing), None
    when no checks ran.
    """

    client: ClientReport | None = None
    client_name: str | None = None

    def client_checked(self, report: ClientReport) -> None:
        self.client = report
        self.client_name = report.name


class ClientChecks:
    """The lookups of every SMTP connection: reverse DNS, and on the MX the lists."""

    log = SafeLogger()

    def __init__(
        self,
        rdns: ReverseDNS | None,
        lists: DNSBLCheck | None = None,
        reject_unknown_client: bool = False,
    ) -> None:
        self.rdns = rdns
        self.lists = lists
        self.reject_unknown_client = reject_unknown_client

    def check(self, listener: str, host: str, allowed: bool = False) -> defer.Deferred:
        """
        Fires with the L{ClientReport} on C{host}, a client of C{listener}
        (C{allowed}: in an allowed network), within the timeout; never fails.
        """
        mx = listener == MX
        lookups = [defer.succeed(None) if self.rdns is None else self.rdns.name(host)]
        if mx and not allowed and self.lists is not None:
            lookups.append(self.lists.check(host))
        d = defer.gatherResults(lookups)
        d.addCallback(lambda found: self._report(listener, host, allowed, *found))
        return d

    def _report(
        self,
        listener: str,
        host: str,
        allowed: bool,
        name: str | None,
        verdict: DNSBLVerdict | None = None,
    ) -> ClientReport:
        exempt = "allow" if allowed else None
        if verdict is not None and verdict.allowed_by is not None:
            exempt = f"dnswl {verdict.allowed_by.entry.zone}"
        listing = verdict.blocked_by if verdict is not None else None
        refusal = None
        if listing is not None:
            literal = _literal(host)
            refusal = BLOCKED.format(literal=literal, zone=listing.entry.zone).encode()
            assert verdict is not None
            self.log.info(
                "refused {client} on {listener}: blocked using {zone} (answer {answer},"
                " score {score} of {threshold})",
                client=host,
                listener=listener,
                zone=listing.entry.zone,
                answer=listing.answer,
                score=verdict.score,
                threshold=verdict.threshold,
            )
        rcpt_refusal = None
        if listener == MX and self.reject_unknown_client and name is None and exempt is None:
            text = UNKNOWN_CLIENT.text.format(literal=_literal(host))
            rcpt_refusal = ReplyError(UNKNOWN_CLIENT, text, cause="no forward-confirmed name")
        return ClientReport(
            address=host,
            name=name,
            exempt=exempt,
            blocked_by=listing,
            refusal=refusal,
            rcpt_refusal=rcpt_refusal,
        )


class LookupsBusy(Exception):
    """Not looked up: L{MAX_LOOKUPS} lookups are under way."""


class BoundedResolver:
    """
    The lookups of the checks at connect, at most C{limit} under way at
    once (see L{MAX_LOOKUPS}); one log line when the bound is reached, and
    again only once it has come down to half.
    """

    log = SafeLogger()

    def __init__(self, resolver: Any, limit: int = MAX_LOOKUPS) -> None:
        self.resolver = resolver
        self.limit = limit
        self.in_flight = 0
        self._full = False

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred:  # noqa: N802
        return self._lookup("lookupAddress", name, timeout)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> defer.Deferred:  # noqa: N802
        return self._lookup("lookupIPV6Address", name, timeout)

    def lookupPointer(self, name: str, timeout: Any = None) -> defer.Deferred:  # noqa: N802
        return self._lookup("lookupPointer", name, timeout)

    def _lookup(self, method: str, name: str, timeout: Any) -> defer.Deferred:
        if self.in_flight >= self.limit:
            if not self._full:
                self._full = True
                self.log.warn(
                    "{count} DNS lookups at connect under way: clients pass unchecked"
                    " until some end",
                    count=self.in_flight,
                )
            return defer.fail(LookupsBusy(f"{self.in_flight} DNS lookups under way"))
        self.in_flight += 1
        d = defer.maybeDeferred(getattr(self.resolver, method), name, timeout=timeout)
        d.addBoth(self._ended)
        return d

    def _ended(self, result: Any) -> Any:
        self.in_flight -= 1
        if self._full and self.in_flight <= self.limit // 2:
            self._full = False
        return result


class _LazyResolver:
    """
    A resolver built at its first lookup: the system's reads resolv.conf
    and then re-reads it every minute on the reactor, which a server that
    never looks anything up need not do.
    """

    def __init__(self, build: Any) -> None:
        self._build = build
        self._resolver: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._resolver is None:
            self._resolver = self._build()
        return getattr(self._resolver, name)


def client_checks(config: Any, reactor: Any, resolver: Any = None) -> ClientChecks | None:
    """
    The checks of C{config}'s [policy] section, asking C{resolver} (by
    default the relay's kind: C{[dns] nameservers}, else the system's);
    None when there is nothing to look up (no lists, C{reverse_dns} off).
    """
    policy = config.policy
    if not (policy.reverse_dns or policy.dnsbl or policy.dnswl):
        return None
    if resolver is None:
        nameservers = config.dns.nameservers
        resolver = _LazyResolver(lambda: make_resolver(nameservers, reactor))
    resolver = BoundedResolver(resolver)
    timeout = policy.dnsbl_timeout
    lists = None
    if policy.dnsbl or policy.dnswl:
        lists = DNSBLCheck(
            DNSLists(policy.dnsbl, resolver, reactor, timeout),
            DNSLists(policy.dnswl, resolver, reactor, timeout),
            policy.dnsbl_threshold,
        )
    return ClientChecks(
        ReverseDNS(resolver, reactor, timeout) if policy.reverse_dns else None,
        lists,
        reject_unknown_client=policy.reject_unknown_client,
    )
