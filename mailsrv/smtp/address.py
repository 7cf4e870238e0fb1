"""
Parsing of the SMTP envelope: the MAIL and RCPT arguments, their paths and
their ESMTP parameters (RFC 5321 4.1.2, RFC 1869 6).

Pure functions on bytes, so they can be tested without a connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# RFC 5321 4.5.3.1.1-3: size limits on the parts of a path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 5322 3.2.3 atext, RFC 5321 4.1.2 Dot-string.
_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rb"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT))
# RFC 5321 4.1.2 Quoted-string: qtextSMTP or quoted-pairSMTP, printable ASCII only.
_QUOTED_STRING = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
# RFC 5321 4.1.2 Domain: sub-domains of letters, digits and inner hyphens.
_LABEL = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# RFC 5321 4.1.2 A-d-l: a source route, to be ignored (RFC 5321 C).
_SOURCE_ROUTE = re.compile(rb"@[^,:@<>\s]+(?:,@[^,:@<>\s]+)*:")

# "FROM:" / "TO:", optional spaces (tolerated, as Postfix does), then a path
# in angle brackets (a quoted local part may hold spaces and '>'), or a bare
# address, then the parameters.
_PATH = rb'<(?:"(?:[^"\\\r\n]|\\.)*"|[^<>"\r\n])*>|[^\s<>]+'
_MAIL_ARG = re.compile(rb"FROM:[ \t]*(?P<path>%s)(?P<params>.*)\Z" % _PATH, re.I | re.S)
_RCPT_ARG = re.compile(rb"TO:[ \t]*(?P<path>%s)(?P<params>.*)\Z" % _PATH, re.I | re.S)

# RFC 5321 4.1.2 esmtp-param.
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e]+")


class AddressError(ValueError):
    """A path that is not a usable RFC 5321 mailbox."""


class DomainLiteralError(AddressError):
    """A domain literal such as C{[192.0.2.1]}: refused, we route by name only."""


class ArgumentError(ValueError):
    """A MAIL or RCPT argument that does not parse (no path, bad parameters)."""


@dataclass(frozen=True)
class EnvelopeArgument:
    """A parsed MAIL FROM or RCPT TO argument."""

    address: str  # local@domain with the domain in lower case; '' for <>
    params: dict[str, str | None] = field(default_factory=dict)  # keyword in upper case


def parse_mailbox(path: bytes) -> str:
    """
    Return C{local@domain} for the inside of a path (no angle brackets),
    the domain lower-cased; raise L{AddressError}. A source route is dropped
    (RFC 5321 C).
    """
    m = _SOURCE_ROUTE.match(path)
    if m:
        path = path[m.end() :]
    if len(path) > MAX_PATH:
        raise AddressError("path too long")
    at = path.rfind(b"@")
    if at <= 0:
        raise AddressError("no domain")
    local, domain = path[:at], path[at + 1 :]
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise AddressError("bad local part")
    if len(local) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if domain.startswith(b"["):
        raise DomainLiteralError("domain literal")
    if not domain or len(domain) > MAX_DOMAIN:
        raise AddressError("bad domain")
    labels = domain.split(b".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError("bad domain")
    if len(labels) > 1 and labels[-1].isdigit():
        raise AddressError("bad domain")  # a bare IP address, not a name
    return local.decode("ascii") + "@" + domain.decode("ascii").lower()


def parse_params(text: bytes) -> dict[str, str | None]:
    """
    Parse C{KEY[=VALUE]} parameters separated by spaces (RFC 5321 4.1.2);
    raise L{ArgumentError} on bad syntax or a repeated keyword.
    """
    out: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition(b"=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise ArgumentError("bad parameter syntax")
        name = key.decode("ascii").upper()
        if name in out:
            raise ArgumentError(f"duplicate parameter {name}")
        out[name] = value.decode("ascii") if eq else None
    return out


def _split(pattern: re.Pattern[bytes], arg: bytes) -> tuple[bytes, bytes]:
    m = pattern.match(arg.strip())
    if m is None:
        raise ArgumentError("syntax error")
    params = m.group("params")
    if params and not params[:1].isspace():
        raise ArgumentError("syntax error")
    path = m.group("path")
    if path.startswith(b"<"):
        path = path[1:-1]
    return path, params


def parse_mail_from(arg: bytes) -> EnvelopeArgument:
    """Parse the argument of MAIL (C{FROM:<path> params}); C{<>} gives ''."""
    path, params = _split(_MAIL_ARG, arg)
    address = "" if path == b"" else parse_mailbox(path)
    return EnvelopeArgument(address, parse_params(params))


def parse_rcpt_to(arg: bytes, postmaster_domain: str) -> EnvelopeArgument:
    """
    Parse the argument of RCPT (C{TO:<path> params}). The bare
    C{<Postmaster>} (RFC 5321 4.1.1.3) names the postmaster of
    C{postmaster_domain}.
    """
    path, params = _split(_RCPT_ARG, arg)
    if path.lower() == b"postmaster":
        return EnvelopeArgument(f"postmaster@{postmaster_domain}", parse_params(params))
    if path == b"":
        raise AddressError("empty recipient")
    return EnvelopeArgument(parse_mailbox(path), parse_params(params))
