"""
IMAP URLs (RFC 5092) as CATENATE (RFC 4469) and URLAUTH (RFC 4467) take
them: the absolute form ``imap://user;AUTH=*@host/INBOX;UIDVALIDITY=n/;UID=n
/;SECTION=x/;PARTIAL=o.l`` with URLAUTH's tail (``;EXPIRE=t;URLAUTH=access
[:mech:token]``), the relative forms (``/INBOX;UIDVALIDITY=n/;UID=n``,
``;UID=n/;SECTION=x``, ...) and the message lists (``/INBOX?SUBJECT%20x``).

L{parse} gives an L{ImapUrl}, every field decoded; what it means (is the
mailbox this user's, may URLAUTH's verifier be trusted) is for the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone

from mailsrv.imap import mutf7

_MAX_NUMBER = 0xFFFFFFFF  # RFC 3501 9: number and nz-number are 32-bit

# RFC 5092 11 (RFC 3986 2.3): uchar = unreserved / pct-encoded / sub-delims-sh;
# achar = uchar / "&" / "=" / "~"; bchar = achar / ":" / "@" / "/".
_UCHAR = r"A-Za-z0-9\-._~!$'()*+,"
_ACHAR = re.compile(rf"(?:[{_UCHAR}&=]|%[0-9A-Fa-f]{{2}})+")
_BCHAR = re.compile(rf"(?:[{_UCHAR}&=:@/]|%[0-9A-Fa-f]{{2}})+")
_NUMBER = re.compile(r"[0-9]{1,10}")
_PARTIAL = re.compile(r"([0-9]{1,10})(?:\.([0-9]{1,10}))?")
_PORT = re.compile(r"[0-9]{1,5}")
_HOST = re.compile(r"\[[0-9A-Fa-f:.vV]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,=]|%[0-9A-Fa-f]{2})*")
# RFC 4467 2.2: uauth-mechanism = "INTERNAL" / 1*(ALPHA / DIGIT / "-" / ".");
# enc-urlauth = 32*HEXDIG.
_MECHANISM = re.compile(r"[A-Za-z0-9\-.]+")
_TOKEN = re.compile(r"[0-9A-Fa-f]{32,}")
# RFC 3339 5.6 date-time (RFC 4467 2.2's expire).
_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


class InvalidURL(ValueError):
    """The text is not an IMAP URL of the form asked for; the message says why."""


@dataclass(frozen=True)
class ImapUrl:
    """
    One IMAP URL, decoded (RFC 5092). A field the URL does not have is None.

    C{mailbox} is the name as text (the %-escapes are UTF-8, RFC 5092 3.4);
    L{mailbox_wire} spells it in modified UTF-7 as an IMAP command would.
    C{partial} is (offset, length), length None for "to the end".
    C{access} is URLAUTH's access identifier as written (``submit+fred``,
    ``user+fred``, ``authuser``, ``anonymous``), its user part %-decoded;
    C{rump} is the URL text up to and including it, as sent, which is what
    the verifier (C{mechanism}, C{token}) authorizes (RFC 4467 2.2, 7).
    C{text} is the whole URL as the client sent it (for ``[BADURL text]``).
    """

    text: str
    absolute: bool = False
    user: str | None = None
    auth: str | None = None
    host: str | None = None
    port: int | None = None
    mailbox: str | None = None
    uidvalidity: int | None = None
    search: str | None = None
    uid: int | None = None
    section: str | None = None
    partial: tuple[int, int | None] | None = None
    expire: datetime | None = None
    access: str | None = None
    mechanism: str | None = None
    token: str | None = None
    rump: str | None = None

    @property
    def mailbox_wire(self) -> bytes | None:
        """The mailbox name in modified UTF-7 (RFC 3501 5.1.3), as a command spells it."""
        return None if self.mailbox is None else mutf7.encode(self.mailbox)

    @property
    def is_message_part(self) -> bool:
        """True when the URL names one message or a part of it (imessagepart)."""
        return self.mailbox is not None and self.uid is not None and self.search is None

    def resolved(self, mailbox: str | None, uidvalidity: int | None = None) -> ImapUrl:
        """
        This URL with a base mailbox filled in where it names none (RFC 5092
        7.1, RFC 3986 5.2 with the mailbox as the base's last directory): a
        relative ``;UID=n`` against INBOX is INBOX's message n. A relative
        path that names a mailbox is under the base one (``a/;UID=1`` from
        ``Sent`` is ``Sent/a``); a URL with a leading ``/`` stays as it is.
        """
        if self.absolute or self.text.startswith("/") or mailbox is None:
            return self
        if self.mailbox is None:
            return replace(self, mailbox=mailbox, uidvalidity=uidvalidity)
        return replace(self, mailbox=mailbox + "/" + self.mailbox)


def percent_decode(text: str) -> bytes:
    """The octets that C{text}'s %-escapes (RFC 3986 2.1) and characters spell."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                raise InvalidURL("a % not followed by two hex digits")
            out.append(int(pair, 16))
            i += 3
        else:
            if ord(char) > 0x7E or ord(char) < 0x21:
                raise InvalidURL("a character that must be %-escaped")
            out.append(ord(char))
            i += 1
    return bytes(out)


def _text(encoded: str, pattern: re.Pattern[str], what: str) -> str:
    """An enc-* component (RFC 5092 11) decoded to text; its escapes are UTF-8."""
    if not pattern.fullmatch(encoded):
        raise InvalidURL(f"bad character in the {what}")
    try:
        return percent_decode(encoded).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidURL(f"the {what} is not UTF-8") from None


def _number(digits: str, what: str, nonzero: bool = True) -> int:
    if not _NUMBER.fullmatch(digits):
        raise InvalidURL(f"the {what} is not a number")
    value = int(digits)
    if value > _MAX_NUMBER or (nonzero and value == 0):
        raise InvalidURL(f"the {what} is out of range")
    return value


def _date_time(text: str) -> datetime:
    """RFC 3339 5.6 date-time, aware."""
    m = _DATE_TIME.fullmatch(text)
    if m is None:
        raise InvalidURL("EXPIRE is not an RFC 3339 date-time")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction = m.group(7)
    micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
    if m.group(8):
        tz = UTC
    else:
        sign = -1 if m.group(9) == "-" else 1
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if offset >= timedelta(hours=24):
            raise InvalidURL("EXPIRE has a bad time zone")
        tz = timezone(sign * offset)
    try:
        # RFC 3339 5.6 allows a leap second (60); kept as the second before.
        return datetime(year, month, day, hour, minute, min(second, 59), micro, tzinfo=tz)
    except ValueError:
        raise InvalidURL("EXPIRE is not a valid date-time") from None


def _starts(text: str, prefix: str) -> bool:
    """RFC 5234 2.3: the literal strings of the grammar are case-insensitive."""
    return text[: len(prefix)].upper() == prefix


def _server(text: str) -> dict[str, object]:
    """iserver = [iuserinfo "@"] host [":" port] (RFC 5092 11)."""
    fields: dict[str, object] = {}
    userinfo, at, hostport = text.rpartition("@")
    if at:
        user, semi, auth = userinfo.partition(";")
        if semi:
            if not _starts(auth, "AUTH="):
                raise InvalidURL("only ;AUTH= may follow the user name")
            auth = auth[5:]
            fields["auth"] = "*" if auth == "*" else _text(auth, _ACHAR, "AUTH type")
        if user:
            fields["user"] = _text(user, _ACHAR, "user name")
        elif not semi:
            raise InvalidURL("an empty user name")
    host, colon, port = hostport, "", ""
    if not hostport.endswith("]"):
        host, colon, port = hostport.rpartition(":")
        if not colon:
            host = hostport
    if not host or not _HOST.fullmatch(host):
        raise InvalidURL("a bad host name")
    fields["host"] = percent_decode(host).decode("utf-8", "replace").lower()
    if colon:
        if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            raise InvalidURL("a bad port")
        fields["port"] = int(port)
    return fields


def _urlauth(tail: str, whole: str) -> dict[str, object]:
    """iurlauth = [";EXPIRE=" date-time] ";URLAUTH=" access [iua-verifier] (RFC 4467 2.2)."""
    fields: dict[str, object] = {}
    if _starts(tail, ";EXPIRE="):
        end = tail.upper().find(";URLAUTH=")
        if end < 0:
            raise InvalidURL("EXPIRE without URLAUTH")
        fields["expire"] = _date_time(tail[8:end])
        tail = tail[end:]
    if not _starts(tail, ";URLAUTH="):
        raise InvalidURL("unexpected text after the message part")
    access, colon, verifier = tail[9:].partition(":")
    lowered = access.lower()
    if lowered in ("authuser", "anonymous"):
        fields["access"] = lowered
    else:
        kind, plus, user = access.partition("+")
        if not plus or kind.lower() not in ("submit", "user") or not user:
            raise InvalidURL("a bad URLAUTH access identifier")
        fields["access"] = kind.lower() + "+" + _text(user, _ACHAR, "access user")
    fields["rump"] = whole[: len(whole) - len(tail) + 9 + len(access)]
    if colon:
        mechanism, colon2, token = verifier.partition(":")
        if not colon2 or not _MECHANISM.fullmatch(mechanism) or not _TOKEN.fullmatch(token):
            raise InvalidURL("a bad URLAUTH verifier")
        fields["mechanism"] = mechanism.upper()
        fields["token"] = token.lower()
    return fields


def _message_part(text: str, fields: dict[str, object]) -> str:
    """
    The optional ``;UID=n[/;SECTION=s][/;PARTIAL=p]`` steps at the start of
    C{text} (each after the first preceded by ``/``) into C{fields}; what is left.
    """
    rest = text
    if _starts(rest, ";UID="):
        digits = re.match(r"[0-9]*", rest[5:])
        assert digits is not None
        fields["uid"] = _number(digits.group(), "UID")
        rest = rest[5 + digits.end() :]
        if not _starts(rest, "/;SECTION=") and not _starts(rest, "/;PARTIAL="):
            return rest
        rest = rest[1:]
    if _starts(rest, ";SECTION="):
        # enc-section is 1*bchar: it runs to the next ";", less the "/" of
        # a "/;PARTIAL=" after it.
        end = rest.find(";", 9)
        section = rest[9:] if end < 0 else rest[9:end]
        if section.endswith("/") and end >= 0:
            if not _starts(rest[end:], ";PARTIAL="):
                raise InvalidURL("unexpected text after the section")
            section = section[:-1]
        fields["section"] = _text(section, _BCHAR, "section")
        rest = "" if end < 0 else rest[end:]
    if _starts(rest, ";PARTIAL="):
        m = _PARTIAL.match(rest, 9)
        if m is None:
            raise InvalidURL("a bad PARTIAL range")
        offset = _number(m.group(1), "PARTIAL offset", nonzero=False)
        length = None if m.group(2) is None else _number(m.group(2), "PARTIAL length")
        fields["partial"] = (offset, length)
        rest = rest[m.end() :]
    return rest


def _path(text: str, whole: str, urlauth: bool) -> dict[str, object]:
    """
    The path of a URL, after the ``/`` that follows the server or begins an
    absolute path: icommand, or with C{urlauth} False a relative path.
    """
    fields: dict[str, object] = {}
    if not text:
        return fields
    if text.startswith(";"):
        # irelative-path's imsg-or-part without a mailbox (RFC 5092 7.1).
        if urlauth:
            raise InvalidURL("no mailbox name")
        rest = _message_part(text, fields)
        if rest or not fields:
            raise InvalidURL("unexpected text in the URL")
        return fields
    m = re.match(r"[^;?]*", text)
    assert m is not None
    mailbox, rest = m.group(), text[m.end() :]
    if _starts(rest, ";UIDVALIDITY="):
        digits = re.match(r"[0-9]*", rest[13:])
        assert digits is not None
        fields["uidvalidity"] = _number(digits.group(), "UIDVALIDITY")
        rest = rest[13 + digits.end() :]
        if rest.startswith("/;"):
            rest = rest[1:]
    elif rest.startswith(";") and mailbox.endswith("/"):
        mailbox = mailbox[:-1]  # the "/" of "/;UID="
    if not mailbox:
        raise InvalidURL("an empty mailbox name")
    fields["mailbox"] = _text(mailbox, _BCHAR, "mailbox name")
    if rest.startswith("?"):
        fields["search"] = _text(rest[1:], _BCHAR, "search")
        return fields
    if not rest:
        return fields
    if not _starts(rest, ";UID="):
        raise InvalidURL("unexpected text after the mailbox name")
    rest = _message_part(rest, fields)
    if rest:
        if not urlauth:
            raise InvalidURL("unexpected text after the message part")
        fields.update(_urlauth(rest, whole))
    return fields


def parse(text: str | bytes, *, relative: bool = True) -> ImapUrl:
    """
    The IMAP URL C{text} (RFC 5092), or L{InvalidURL} saying what is wrong.
    An absolute URL (``imap://...``) may carry URLAUTH's tail (RFC 4467);
    with C{relative} (the default) the relative forms are taken too
    (``/mailbox...``, ``mailbox...``, ``;UID=...``, ``//server/...``), which
    L{ImapUrl.resolved} completes against a base mailbox.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidURL("a character that must be %-escaped") from None
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
        raise InvalidURL("a character that must be %-escaped")
    if _starts(text, "IMAP://"):
        rest, absolute = text[7:], True
    elif text.startswith("//") and relative:
        rest, absolute = text[2:], False
    elif not relative:
        raise InvalidURL("not an imap:// URL")
    else:
        if not text:
            raise InvalidURL("an empty URL")
        path = text[1:] if text.startswith("/") else text
        fields = _path(path, text, urlauth=text.startswith("/"))
        if text.startswith("/") and not path:
            raise InvalidURL("no mailbox name")
        return ImapUrl(text=text, **fields)  # type: ignore[arg-type]
    server, slash, path = rest.partition("/")
    fields = _server(server)
    if slash:
        fields.update(_path(path, text, urlauth=True))
    return ImapUrl(text=text, absolute=absolute, **fields)  # type: ignore[arg-type]
