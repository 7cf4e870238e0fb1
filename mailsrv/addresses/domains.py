"""
Domains and addresses in the one form they are compared in: internationalised
domain names (IDNA2008 with the UTS-46 mapping, through the C{idna} package)
as lower-case A-labels, so C{Bücher.example}, C{bücher.example} and
C{xn--bcher-kva.example} name one domain; and what of an address needs
SMTPUTF8 (RFC 6531 3.2: a non-ASCII local part; a domain can always travel
as A-labels).
"""

from __future__ import annotations

import functools
import unicodedata

import idna


class DomainError(ValueError):
    """A domain that is not a valid IDNA2008 / UTS-46 name (the message says why)."""


#: How many domains L{normalise_domain} remembers. UTS-46 mapping costs tens of
#: µs a domain (most of the routing step for an IDN recipient), and the same few
#: domains come again and again: at each RCPT, on each line of an aliases file.
DOMAIN_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=DOMAIN_CACHE_SIZE)
def normalise_domain(domain: str) -> str:
    """
    A domain in the one form used for comparison: lower-case ASCII (A-labels),
    mapped with UTS-46 (the C{idna} package) so C{Bücher.example} and
    C{xn--bcher-kva.example} compare equal. Strict: every label, ASCII or
    not, must be valid IDNA2008; L{DomainError} otherwise. A pure function,
    remembered for the last L{DOMAIN_CACHE_SIZE} domains (a bad one is not).
    """
    domain = domain.strip().rstrip(".")
    if not domain:
        raise DomainError("empty domain")
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise DomainError(f"bad domain {domain!r}: {e}") from None


def ascii_domain(domain: str) -> str:
    """
    C{domain} as lower-case A-labels (RFC 5890 2.3.2.1), for DNS, for an
    envelope sent without SMTPUTF8 and for lookups. An all-ASCII domain is
    only lower-cased (names such as C{host_1.lan} that IDNA2008 refuses still
    pass, as they always have); a domain with U-labels must be valid
    IDNA2008 under UTS-46, else L{DomainError}.
    """
    if domain.isascii():
        return domain.lower()
    return normalise_domain(domain)


def split_address(address: str) -> tuple[str, str]:
    """C{local@domain} -> (local, domain), split at the last C{@}; the domain as given."""
    local, _, domain = address.rpartition("@")
    return local, domain


def ascii_address(address: str) -> str:
    """
    C{address} with its domain as A-labels (its local part untouched): what
    a server without SMTPUTF8 may be sent when only the domain is non-ASCII
    (RFC 6531 3.2). C{''} (the null path) stays C{''}.
    """
    if not address or address.isascii():
        return address
    local, domain = split_address(address)
    if not domain:
        return address
    return f"{local}@{ascii_domain(domain)}"


def needs_smtputf8(address: str) -> bool:
    """
    Whether C{address} can only travel with SMTPUTF8 (RFC 6531 3.2): its local
    part is not ASCII. A non-ASCII domain alone does not need it.
    """
    return not split_address(address)[0].isascii()


def normalise_local(local: str) -> str:
    """
    A UTF-8 local part in Unicode normal form C (RFC 6530 10.1, RFC 6532 3.1:
    one spelling for the same characters however the client composed them).
    """
    if local.isascii():
        return local
    return unicodedata.normalize("NFC", local)
