"""
Parsing of the SMTP envelope: the MAIL and RCPT arguments, their paths and
their ESMTP parameters (RFC 5321 4.1.2, RFC 1869 6), and the UTF-8 paths of
SMTPUTF8 (RFC 6531 3.3).

Pure functions on bytes, so they can be tested without a connection.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from mailsrv import replies
from mailsrv.addresses.domains import DomainError, ascii_domain, needs_smtputf8
from mailsrv.replies import Reply

# RFC 5321 4.5.3.1.1-3: size limits on the parts of a path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 5322 3.2.3 atext, RFC 5321 4.1.2 Dot-string.
_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rb"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT))
# RFC 5321 4.1.2 Quoted-string: qtextSMTP or quoted-pairSMTP, printable ASCII only.
_QUOTED_STRING = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
# RFC 6531 3.3: with SMTPUTF8, atext and qtextSMTP also take UTF8-non-ascii.
_U_ATEXT = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_U_DOT_STRING = re.compile(r"%s+(?:\.%s+)*" % (_U_ATEXT, _U_ATEXT))
_U_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"')
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


class NonASCIIAddressError(AddressError):
    """
    A path with UTF-8 in a transaction without the SMTPUTF8 parameter:
    refused with X.6.7 (RFC 6531 3.7.4.1).
    """


class DomainLiteralError(AddressError):
    """A domain literal such as C{[192.0.2.1]}: refused, we route by name only."""


class ArgumentError(ValueError):
    """A MAIL or RCPT argument that does not parse (no path, bad parameters)."""


@dataclass(frozen=True)
class EnvelopeArgument:
    """A parsed MAIL FROM or RCPT TO argument."""

    # local@domain: the local part as the client spelled it (UTF-8 allowed
    # with SMTPUTF8), the domain in lower-case A-labels, the one form domains
    # are compared and routed in (RFC 5890; L{mailsrv.addresses.domains});
    # '' for <>.
    address: str
    params: dict[str, str | None] = field(default_factory=dict)  # keyword in upper case

    @property
    def smtputf8(self) -> bool:
        """Whether the SMTPUTF8 parameter was given (RFC 6531 3.4; meaningful on MAIL)."""
        return "SMTPUTF8" in self.params

    @property
    def needs_smtputf8(self) -> bool:
        """Whether the address has a non-ASCII local part (RFC 6531 3.2)."""
        return needs_smtputf8(self.address)


def parse_mailbox(path: bytes, utf8: bool = False) -> str:
    """
    Return C{local@domain} for the inside of a path (no angle brackets),
    the domain in lower-case A-labels; raise L{AddressError}. A source route
    is dropped (RFC 5321 C). With C{utf8} (the transaction has SMTPUTF8) the
    path may hold UTF-8 (RFC 6531 3.3): in the local part, and U-labels in the
    domain (valid IDNA2008 under UTS-46); without it, a non-ASCII path is a
    L{NonASCIIAddressError}. Bytes that are not UTF-8 are a syntax error.
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
    if len(local) > MAX_LOCAL_PART:  # RFC 6531 3.3: counted in octets
        raise AddressError("local part too long")
    if domain.startswith(b"["):
        raise DomainLiteralError("domain literal")
    if not path.isascii():
        try:
            text_local, text_domain = local.decode("utf-8"), domain.decode("utf-8")
        except UnicodeDecodeError:
            raise AddressError("not UTF-8") from None
        if not utf8:
            raise NonASCIIAddressError("non-ASCII address without SMTPUTF8")
        return _utf8_local(text_local) + "@" + _utf8_domain(text_domain)
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise AddressError("bad local part")
    return local.decode("ascii") + "@" + _check_domain(domain)


def _check_domain(domain: bytes) -> str:
    """An ASCII domain checked (RFC 5321 4.1.2 Domain), in lower case."""
    if not domain or len(domain) > MAX_DOMAIN:
        raise AddressError("bad domain")
    labels = domain.split(b".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError("bad domain")
    if len(labels) > 1 and labels[-1].isdigit():
        raise AddressError("bad domain")  # a bare IP address, not a name
    return domain.decode("ascii").lower()


def _utf8_local(local: str) -> str:
    """A UTF-8 local part checked (RFC 6531 3.3 with RFC 6532 3.2 UTF8-non-ascii)."""
    if not (_U_DOT_STRING.fullmatch(local) or _U_QUOTED_STRING.fullmatch(local)):
        raise AddressError("bad local part")
    # No control or unassigned code points, no lone surrogates or private use:
    # nothing a mailbox name or a log line should hold (RFC 6530 10.1).
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in local):
        raise AddressError("bad local part")
    return local


def _utf8_domain(domain: str) -> str:
    """A domain that may hold U-labels, as lower-case A-labels (RFC 5890, UTS-46)."""
    try:
        a_label = ascii_domain(domain)
    except DomainError:
        raise AddressError("bad domain") from None
    return _check_domain(a_label.encode("ascii"))


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


def mail_parameters_refusal(
    params: dict[str, str | None], max_size: int, submission: bool
) -> Reply | None:
    """
    The reply refusing MAIL's parameters (those we offer, with their values
    checked), or None if they are all right.
    """
    for key, value in params.items():
        if key == "SIZE":  # RFC 1870 6
            if value is None or not value.isdigit():
                return replies.BAD_ARGUMENTS
            if int(value) > max_size:
                return replies.MESSAGE_TOO_BIG
        elif key == "BODY":  # RFC 6152 2
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return replies.BAD_ARGUMENTS
        elif key == "AUTH" and submission:  # RFC 4954 5: accepted, not trusted
            pass
        elif key == "SMTPUTF8":  # RFC 6531 3.4: no value
            if value is not None:
                return replies.BAD_ARGUMENTS
        else:
            return replies.BAD_PARAMETER  # RFC 5321 4.1.1.11: 555
    return None


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
    """
    Parse the argument of MAIL (C{FROM:<path> params}); C{<>} gives ''.
    The path may hold UTF-8 when the parameters include SMTPUTF8 (RFC 6531 3.4).
    """
    path, params = _split(_MAIL_ARG, arg)
    parsed = parse_params(params)
    address = "" if path == b"" else parse_mailbox(path, utf8="SMTPUTF8" in parsed)
    return EnvelopeArgument(address, parsed)


def parse_rcpt_to(arg: bytes, postmaster_domain: str, utf8: bool = False) -> EnvelopeArgument:
    """
    Parse the argument of RCPT (C{TO:<path> params}). The bare
    C{<Postmaster>} (RFC 5321 4.1.1.3) names the postmaster of
    C{postmaster_domain}. C{utf8}: the transaction's MAIL had SMTPUTF8.
    """
    path, params = _split(_RCPT_ARG, arg)
    if path.lower() == b"postmaster":
        return EnvelopeArgument(f"postmaster@{postmaster_domain}", parse_params(params))
    if path == b"":
        raise AddressError("empty recipient")
    return EnvelopeArgument(parse_mailbox(path, utf8=utf8), parse_params(params))
