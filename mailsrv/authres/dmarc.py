"""
DMARC (RFC 7489): the policy record of the From: domain (or of its
organizational domain, found with the public suffix list bundled in the
publicsuffixlist package; nothing is fetched at run time), identifier
alignment of the SPF and DKIM results, and the disposition (pct= honoured,
6.6.4). Blocking (DNS): run in a pool thread.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from publicsuffixlist import PublicSuffixList

from mailsrv.authres.dkimverify import DkimResult
from mailsrv.authres.resolver import DnsTempError, Resolver
from mailsrv.authres.spf import SpfResult

POLICIES = ("none", "quarantine", "reject")
MAX_AUTHOR_DOMAINS = 5  # From: domains evaluated; a message naming more is quarantined
MAX_ORGS = 10_000  # organizational domains kept (the oldest forgotten first)


@dataclass(frozen=True)
class DmarcRecord:
    """The tags of a DMARC record that decide a disposition (RFC 7489 6.3)."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class DmarcResult:
    """
    The DMARC result (RFC 8601 2.7.5 / RFC 7489 11.2), the policy that
    applied (p= or sp=) and what to do with the message: none, quarantine or reject.
    """

    result: str  # pass, fail, none, temperror, permerror
    from_domain: str = ""
    policy: str = "none"
    disposition: str = "none"
    reason: str = ""


def parse_record(text: str) -> DmarcRecord | None:
    """
    A DMARC record (RFC 7489 6.3, 6.4), or None when C{text} is not one.
    Unknown tags are ignored (6.3); a bad or missing p= is p=none (6.6.3).
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    first = text.split(";", 1)[0].replace(" ", "")
    if first != "v=DMARC1":
        return None  # 6.3: v= first, exactly DMARC1
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        p = "none"
    sp = tags.get("sp", "").lower()
    if sp not in POLICIES:
        sp = p
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return DmarcRecord(p=p, sp=sp, adkim=adkim, aspf=aspf, pct=pct)


def from_domains(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """
    The RFC5322.From domains (RFC 7489 6.6.1) of every From: field, lower
    case, each once, in order; entries without a domain (an empty group, a
    stray bracket) are left out, so that they cannot hide the others.
    """
    domains: list[str] = []
    for name, value in headers:
        if name.strip().lower() != b"from":
            continue
        text = value.decode("utf-8", "replace").replace("\r", "").replace("\n", "")
        for _, address in getaddresses([text]):
            local, at, domain = address.rpartition("@")
            domain = domain.rstrip(".").lower()
            if at and domain and domain not in domains:
                domains.append(domain)
    return domains


class Dmarc:
    """DMARC evaluation with one public suffix list, loaded once (it is some 10k names)."""

    def __init__(self, chance: Callable[[], float] = random.random) -> None:
        self._psl = PublicSuffixList()  # its bundled copy: no network at run time
        self._chance = chance  # in [0, 1): pct= sampling (RFC 7489 6.6.4)
        # The list's answers, kept: a message asks for its From: domain's,
        # SPF's and each DKIM domain's (some 10 us each), mostly the same few.
        self._orgs: OrderedDict[str, str] = OrderedDict()
        self._orgs_lock = threading.Lock()

    def organizational_domain(self, domain: str) -> str:
        """RFC 7489 3.2: the public suffix plus one label (the domain itself if it is a suffix)."""
        org = self._orgs.get(domain)
        if org is None:
            org = self._psl.privatesuffix(domain) or domain
            with self._orgs_lock:  # pool threads may share this evaluator
                if len(self._orgs) >= MAX_ORGS:
                    self._orgs.popitem(last=False)  # the oldest entry
                self._orgs[domain] = org
        return org

    def aligned(self, a: str, b: str, mode: str) -> bool:
        """RFC 7489 3.1.1, 3.1.2: strict means equal; relaxed, the same organizational domain."""
        a, b = a.rstrip(".").lower(), b.rstrip(".").lower()
        if mode == "s":
            return a == b
        return self.organizational_domain(a) == self.organizational_domain(b)

    def find_record(self, domain: str, resolver: Resolver) -> tuple[DmarcRecord, bool] | None:
        """
        The record of C{domain}, else of its organizational domain (RFC 7489
        6.6.3), and whether it is the latter's; None when there is none.
        Raises L{DnsTempError}.
        """
        org = self.organizational_domain(domain)
        for name, inherited in ((domain, False), (org, True)):
            if inherited and org == domain:
                break
            records = [
                parse_record(t.decode("utf-8", "replace")) for t in resolver.txt(f"_dmarc.{name}")
            ]
            found = [r for r in records if r is not None]
            if len(found) == 1:
                return found[0], inherited
            if len(found) > 1:
                return None  # 6.6.3 step 5: several records, DMARC is not applied
        return None

    def evaluate(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        spf: SpfResult | None,
        dkim: Sequence[DkimResult],
        resolver: Resolver,
    ) -> DmarcResult:
        """The DMARC result for a message with C{headers}, given its SPF and DKIM results."""
        domains = from_domains(headers)
        if not domains:
            return DmarcResult("permerror", reason="no From: domain")
        if len(domains) > MAX_AUTHOR_DOMAINS:
            # Not looked up (each costs DNS in a pool thread); treated as suspicious.
            reason = f"more than {MAX_AUTHOR_DOMAINS} From: domains"
            return DmarcResult("fail", domains[0], "none", "quarantine", reason)
        # RFC 7489 6.6.1: several author domains (several From: fields or
        # addresses, which RFC 5322 3.6 forbids or MUAs show one of): each is
        # evaluated and the strictest failing policy applies.
        results = [self._evaluate(d, spf, dkim, resolver) for d in domains]
        failed = [r for r in results if r.result == "fail"]
        if failed:
            return max(failed, key=lambda r: POLICIES.index(r.disposition))
        errors = [r for r in results if r.result == "temperror"]
        return errors[0] if errors else results[0]

    def _evaluate(
        self,
        domain: str,
        spf: SpfResult | None,
        dkim: Sequence[DkimResult],
        resolver: Resolver,
    ) -> DmarcResult:
        """The DMARC result for one RFC5322.From domain."""
        try:
            found = self.find_record(domain, resolver)
        except DnsTempError as e:
            return DmarcResult("temperror", domain, reason=str(e))
        if found is None:
            return DmarcResult("none", domain)
        record, inherited = found
        policy = record.sp if inherited else record.p
        # RFC 7489 4.2: pass when an aligned identifier passed (SPF 3.1.2, DKIM 3.1.1).
        spf_ok = (
            spf is not None
            and spf.result == "pass"
            and self.aligned(spf.domain, domain, record.aspf)
        )
        dkim_ok = any(
            r.result == "pass" and self.aligned(r.domain, domain, record.adkim) for r in dkim
        )
        if spf_ok or dkim_ok:
            return DmarcResult("pass", domain, policy)
        disposition = policy
        if record.pct < 100 and self._chance() * 100 >= record.pct:
            # RFC 7489 6.6.4: a message not sampled gets the next policy down.
            disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
        # An aligned identifier that could not be checked (RFC 7208 2.6.6, RFC
        # 6376 6.1.2: a DNS error, no answer in time) might have passed: not a failure.
        unchecked = (
            spf is not None
            and spf.result == "temperror"
            and self.aligned(spf.domain, domain, record.aspf)
        ) or any(
            r.result == "temperror" and self.aligned(r.domain, domain, record.adkim) for r in dkim
        )
        if unchecked:
            reason = "an aligned SPF or DKIM result could not be had"
            return DmarcResult("temperror", domain, policy, disposition, reason)
        return DmarcResult("fail", domain, policy, disposition, "no aligned SPF or DKIM pass")
