"""
The IMAP ENVELOPE of a message (RFC 3501 7.4.2) and the RFC 5322 3.4
address lists it carries: groups, source routes, comments and quoted
strings parsed as Dovecot does, encoded-words passed through as they are.

The address parser is a small tokenizer and a recursive-descent reader
that never raises: a malformed list gives what can be read from it, with
C{MISSING_MAILBOX}/C{MISSING_DOMAIN} in the gaps (a NIL host would mark the
start of a group, RFC 3501 7.4.2).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from mailsrv.imap.imapstring import nstring

MISSING_MAILBOX = "MISSING_MAILBOX"
MISSING_DOMAIN = "MISSING_DOMAIN"

# RFC 5322 3.2.3 atext, plus "." (obs-phrase, dot-atom) and 8-bit octets.
_TOKEN_RE = re.compile(
    r"""
      (?P<ws>[ \t\r\n]+)
    | (?P<atom>[^\x00-\x20()<>@,;:\\".\[\]\x7f]+(?:\.[^\x00-\x20()<>@,;:\\".\[\]\x7f]*)*|\.)
    | "(?P<qs>(?:[^"\\]|\\.)*)"?
    | (?P<dlit>\[(?:[^\[\]\\]|\\.)*\]?)
    | (?P<special>[<>@,;:])
    | (?P<open>\()
    | (?P<other>.)
    """,
    re.X | re.S,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_LWSP = re.compile(r"[ \t\r\n]+")


@dataclass(frozen=True)
class Address:
    """
    One ENVELOPE address: a mailbox, or a group marker (start: C{host} is
    None and C{mailbox} the group's name; end: all four None).
    """

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, value) pairs; kind is word, qs, dlit, a special, or comment."""
    out: list[tuple[str, str]] = []
    pos, end = 0, len(text)
    while pos < end:
        m = _TOKEN_RE.match(text, pos)
        if m is None:  # pragma: no cover - the pattern matches any character
            break
        kind = m.lastgroup
        pos = m.end()
        if kind == "ws":
            continue
        if kind == "open":  # a comment, nested (RFC 5322 3.2.2)
            depth, start = 1, pos
            while pos < end and depth:
                c = text[pos]
                if c == "\\":
                    pos += 1
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                pos += 1
            body = text[start : pos - 1] if depth == 0 else text[start:pos]
            out.append(("comment", _QUOTED_PAIR.sub(r"\1", body)))
        elif kind == "qs":
            out.append(("qs", _QUOTED_PAIR.sub(r"\1", m.group("qs"))))
        elif kind == "special":
            out.append((m.group(0), m.group(0)))
        elif kind == "dlit":
            out.append(("dlit", m.group(0)))
        else:
            out.append(("word", m.group(0)))
    return out


def _for_humans(text: str) -> str | None:
    """A display name or subject as Dovecot gives it: white space runs made one space."""
    text = _LWSP.sub(" ", text).strip(" ")
    return text or None


class _Reader:
    """Reads an address list from tokens (RFC 5322 3.4, with obs- forms)."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.toks = tokens
        self.i = 0
        self.comment: str | None = None  # the last comment passed

    def peek(self) -> str:
        while self.i < len(self.toks) and self.toks[self.i][0] == "comment":
            self.comment = self.toks[self.i][1]
            self.i += 1
        return self.toks[self.i][0] if self.i < len(self.toks) else ""

    def take(self) -> str:
        self.peek()
        value = self.toks[self.i][1]
        self.i += 1
        return value

    def words(self, stops: str) -> list[tuple[str, str]]:
        """Words, quoted strings and stray characters up to one of C{stops} or the end."""
        out: list[tuple[str, str]] = []
        while True:
            kind = self.peek()
            if not kind or (len(kind) == 1 and kind in stops):
                return out
            out.append((kind, self.take()))

    def domain(self) -> str:
        parts = []
        while True:
            kind = self.peek()
            if kind in ("word", "dlit"):
                parts.append(self.take())
            else:
                return "".join(parts)

    def addresses(self) -> list[Address]:
        out: list[Address] = []
        in_group = False
        while True:
            kind = self.peek()
            if not kind:
                break
            if kind == ">":  # a stray ">" ends what can be read, as in Dovecot
                break
            if kind == ",":
                self.take()
                continue
            if kind == ";":
                self.take()
                if in_group:
                    out.append(Address(None, None, None, None))
                    in_group = False
                continue
            phrase = self.words("<>@,;:")
            kind = self.peek()
            if kind == ":" and not in_group:  # RFC 5322 3.4: group = display-name ":" [list] ";"
                self.take()
                out.append(Address(None, None, _phrase(phrase) or "", None))
                in_group = True
                continue
            out.append(self.mailbox(phrase))
            if kind == ":":  # a group inside a group: skip to its end
                while self.peek() not in ("", ";"):
                    self.take()
        if in_group:
            out.append(Address(None, None, None, None))
        return out

    def mailbox(self, phrase: list[tuple[str, str]]) -> Address:
        kind = self.peek()
        if kind == "<":  # name-addr: [display-name] angle-addr
            self.take()
            adl = self.route()
            local = _local(self.words("<>@,;:"))
            host = ""
            if self.peek() == "@":
                self.take()
                host = self.domain()
            while self.peek() not in ("", ">", ",", ";"):
                self.take()
            if self.peek() == ">":
                self.take()
            return _address(_for_humans(_phrase(phrase)), adl, local, host)
        if kind == "@":  # addr-spec: local-part "@" domain [comment]
            self.take()
            self.comment = None
            host = self.domain()
            name = _for_humans(self.comment) if self.comment else None
            return _address(name, None, _local(phrase), host)
        return _address(None, None, _local(phrase), "")

    def route(self) -> str | None:
        """RFC 5322 4.4 obs-route: "@a,@b:" before the addr-spec, kept as the adl."""
        if self.peek() != "@":
            return None
        start = self.i
        hops = []
        while self.peek() == "@":
            self.take()
            hops.append("@" + self.domain())
            while self.peek() == ",":
                self.take()
        if self.peek() == ":":
            self.take()
            return ",".join(hops)
        self.i = start  # no colon: "<@x>" is an addr-spec with no local part
        return None


def _phrase(words: list[tuple[str, str]]) -> str:
    return " ".join(value for _kind, value in words)


def _local(words: list[tuple[str, str]]) -> str:
    return "".join(value for _kind, value in words)


def _address(name: str | None, adl: str | None, local: str, host: str) -> Address:
    return Address(name, adl, local or MISSING_MAILBOX, host or MISSING_DOMAIN)


def parse_addresses(value: str) -> list[Address]:
    """The addresses and group markers of an address-list header value."""
    return _Reader(_tokens(value)).addresses()


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=8192)  # correspondents repeat across a folder
def address_list(value: bytes | None) -> bytes:
    """RFC 3501 7.4.2: a parenthesised list of (name adl mailbox host), or NIL."""
    if value is None:
        return b"NIL"
    items = [
        b"(%s %s %s %s)" % (nstring(a.name), nstring(a.adl), nstring(a.mailbox), nstring(a.host))
        for a in parse_addresses(_text(value))
    ]
    return b"(" + b"".join(items) + b")" if items else b"NIL"


_ENVELOPE_FIELDS_RE = re.compile(
    rb"^(date|subject|from|sender|reply-to|to|cc|bcc|in-reply-to|message-id)[ \t]*:"
    rb"(.*(?:\r?\n[ \t].*)*)",
    re.M | re.I,
)
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_WSP = b" \t\r\n"
_WSP_RUN = re.compile(rb"[ \t\r\n]+")
_ENVELOPE_NAMES = frozenset(
    (b"date", b"subject", b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc")
    + (b"in-reply-to", b"message-id")
)


def envelope(block: bytes) -> bytes:
    """The ENVELOPE structure for a header block (RFC 3501 7.4.2)."""
    end = block.find(b"\n\r\n")
    if end < 0:
        end = block.find(b"\n\n")
    if end >= 0:
        block = block[: end + 1]
    values: dict[bytes, bytes] = {}
    for name, value in _ENVELOPE_FIELDS_RE.findall(block):
        name = name.lower()
        if name not in values:
            # RFC 5322 2.2.3: unfolding removes the CRLF before white space.
            values[name] = (_FOLD.sub(b"", value) if b"\n" in value else value).strip(_WSP)
    return _envelope(values)


def envelope_of_fields(fields: Mapping[bytes, bytes]) -> bytes:
    """
    The ENVELOPE from the first raw value (after the colon, folds and all)
    of each header field, keyed by lower-case name.
    """
    return _envelope(
        {
            name: (_FOLD.sub(b"", value) if b"\n" in value else value).strip(_WSP)
            for name, value in fields.items()
            if name in _ENVELOPE_NAMES
        }
    )


def _envelope(values: dict[bytes, bytes]) -> bytes:
    get = values.get
    frm = address_list(get(b"from"))
    # RFC 3501 7.4.2: an absent or empty Sender or Reply-To is the From.
    sender = address_list(get(b"sender"))
    reply_to = address_list(get(b"reply-to"))
    subject = get(b"subject")
    if subject is not None and (b"  " in subject or b"\t" in subject or b"\n" in subject):
        subject = _WSP_RUN.sub(b" ", subject)  # as Dovecot: white space runs made one space
    return b"(%s %s %s %s %s %s %s %s %s %s)" % (
        nstring(get(b"date")),
        nstring(subject),
        frm,
        frm if sender == b"NIL" else sender,
        frm if reply_to == b"NIL" else reply_to,
        address_list(get(b"to")),
        address_list(get(b"cc")),
        address_list(get(b"bcc")),
        nstring(get(b"in-reply-to")),
        nstring(get(b"message-id")),
    )
