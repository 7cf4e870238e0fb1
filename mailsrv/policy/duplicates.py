"""
Mass duplicate mail ([policy] C{duplicate_recipients}, C{duplicate_window},
C{mailing_lists}): the same message sent by one sender, or from one client,
to more than N distinct recipients within a window is deferred, then
refused, at the end of DATA, on the MX and on submission.

The same message: a hash of its body (L{BodyDigest}), computed as the
message streams in, never read again. The header is left out (its
Message-ID, Date, To and trace fields differ per copy), and so is what
differs between copies a program generates from one text:

  - case, and every whitespace character (runs, line ends, CRLF or LF,
    indentation, the wrapping of base64 and of text);
  - quoted-printable soft line breaks (C{=} at the end of a line), so a
    text re-wrapped at another width is the same text;
  - every line that starts with C{--} (MIME boundary lines, whose boundary
    is random per copy) and every line that names a C{boundary=} (a nested
    multipart's Content-Type, or its folded continuation).

What still makes copies differ, by design: anything personalised per
recipient (a name, an unsubscribe or tracking link, a Content-ID), another
transfer encoding of the same text, random text added to each copy. This
is an exact hash of a normalised body, not a fuzzy one (rspamd's fuzzy
storage is that). Lines starting with C{--} are left out wholesale: two
bodies that differ only there (a signature under C{-- }) count as one. An
empty body (after normalising) is never counted: it says nothing about
which message it is.

Counted, per key, the distinct envelope recipients (lower-cased) of
messages with that body within a sliding window, in slices as
L{mailsrv.policy.rates} counts (a recipient is forgotten once a whole
window has passed since the end of the slice it was last sent to). The
keys, both counted: (body, envelope sender) and (body, client), the client
being the logged-in user on submission and the client address on the MX
(an IPv6 client by its /64, as the rate limits count it). A recipient sent
the message again (the client's retry after a 451) is not counted twice.

The null sender: a bounce is never counted under the sender C{<>}, which
every server in the world shares (identical notices from many servers
would add up as one sender's). It is counted under its client: one server
sending one identical DSN to more than N of our users within the window is
backscatter, and a real DSN names its recipient and quotes the message it
is about, so no two are alike.

Not counted: recipients that are list aliases here (each of their routes
goes through a list, L{mailsrv.routing.Mailbox.mailing_list}: the
addresses issue's lists); messages whose envelope sender, client address
or C{List-Id:} field an entry of C{mailing_lists} names (L{MailingLists});
everything when C{duplicate_recipients} is 0.

The answer to a message that would take a key over N: deferred the first
time (451 4.7.1; ratware seldom retries), refused (550 5.7.1) when the key
goes over again while its deferral is within the window: a real MTA's
retry, a few minutes later, is refused and its sender gets a bounce with
the text, which tells an honest sender (a mailing list not yet allowed)
what to do. There is no separate hard multiple of N: the second attempt is
already refused. Each deferral and refusal is one log line with the key,
the count and the body hash's first 12 hex digits. A message's recipients
are counted when this check lets it through (a later check that refuses it,
or a failed delivery, does not take them back: its retry is to the same
recipients, which are not counted twice).

Memory is bounded: at most C{max_members} recipients are kept in all
(each key has at most N: a message that would take it over is not
counted), the least recently counted keys first swept out as their slices
expire, and evicted past the bound; deferral marks likewise.

A pure function of the clock's time, so tests advance a task.Clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.auth.throttle import account_key, client_key
from mailsrv.filter.verdict import ACCEPTED, DEFER, REJECT, Envelope, Verdict
from mailsrv.policy.networks import Network, NetworkError, client_address, parse_network
from mailsrv.policy.rates import MAX_TRACKED, SLICES
from mailsrv.replies import Reply
from mailsrv.smtp.checks import IMessageCheck

MAX_MEMBERS = 500_000  # recipients kept in all: bounds memory under a spray of messages
MAX_LIST_FIELD = 998  # octets of List-Id kept (RFC 5322 2.1.1: a line's length)
SWEEP_PER_COUNT = 2  # expired keys looked at, at most, per message counted (amortised)

# 451 (RFC 5321 4.2.2: requested action aborted), 4.7.1 delivery not
# authorized, message refused (RFC 3463 3.8): the client may try again.
DEFER_CODE, DEFER_ENHANCED = 451, "4.7.1"
# 550 (RFC 5321 4.2.2: requested action not taken), 5.7.1 delivery not
# authorized, message refused (RFC 3463 3.8): for good.
REFUSE_CODE, REFUSE_ENHANCED = 550, "5.7.1"

# The body's normalisation (module docstring): lines that start with "--" or
# name a boundary (before the soft breaks join a QP line to the boundary line
# after it), QP soft breaks, then every whitespace byte.
_SOFT_BREAK = re.compile(rb"=[ \t]*\r?\n")
_BOUNDARY_LINE = re.compile(rb"^(?:--|[^\n]*boundary=)[^\n]*(?:\n|$)", re.MULTILINE)
_WHITESPACE = b" \t\r\n\x0b\x0c"


class BodyDigest:
    """
    The normalised hash of one message's body, fed as it streams in (whole
    lines, LF line ends), and the message's C{List-Id:} field value.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()  # the fastest here (SHA extensions); blake2b 1.7x
        self._octets = 0  # normalised octets hashed
        self._list_field = b""  # the List-Id field's value, unfolded

    def update(self, lines: bytes) -> None:
        """Whole body lines, LF-terminated (a block of them, or one)."""
        data = lines.lower()
        # The regular expression only where it may match (a few blocks of a
        # message; a one-byte search is a memchr, the others are dearer).
        if (b"-" in data and (data.startswith(b"--") or b"\n--" in data)) or (
            b"=" in data and b"boundary=" in data
        ):
            data = _BOUNDARY_LINE.sub(b"", data)
        data = _SOFT_BREAK.sub(b"", data).translate(None, _WHITESPACE)
        if data:
            self._octets += len(data)
            self._hash.update(data)

    def list_id_field(self, value: bytes) -> None:
        """A C{List-Id:} field's value, or a folded continuation of it."""
        if len(self._list_field) < MAX_LIST_FIELD:  # a field repeated without end is cut
            self._list_field += value

    @property
    def list_id(self) -> str | None:
        """The message's list identifier (RFC 2919), lower-case; None without one."""
        return list_id_value(self._list_field) if self._list_field else None

    @property
    def empty(self) -> bool:
        """Whether nothing was left of the body once normalised."""
        return self._octets == 0

    def digest(self) -> bytes:
        return self._hash.digest()


def list_id_value(field_value: bytes) -> str | None:
    """
    The list identifier of a C{List-Id:} field value (RFC 2919 2: the part
    in angle brackets), lower-case; None if there is none.
    """
    text = field_value.decode("ascii", "replace")
    found = re.findall(r"<([^<>\s]+)>", text)
    return found[-1].lower() if found else None


# --- the allow list --------------------------------------------------------------------

#: RFC 2919 2: list-label "." list-id-namespace, dot-atoms.
_LIST_ID = re.compile(r"[^<>@\s.]+(\.[^<>@\s.]+)+")


@dataclass(frozen=True)
class MailingLists:
    """
    The [policy] C{mailing_lists} entries: envelope senders (an address, or
    C{@domain} for any sender there, as VERP senders need), client networks
    (CIDR or an address), and list identifiers matched against a message's
    C{List-Id:} (C{"Name <id.example.org>"} or C{id.example.org}). Anyone
    can write a List-Id: prefer the list's sender or network where they
    are known.
    """

    senders: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()
    list_ids: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> MailingLists:
        """The entries, or L{ValueError} naming every bad one."""
        senders: set[str] = set()
        domains: set[str] = set()
        networks: list[Network] = []
        list_ids: set[str] = set()
        problems: list[str] = []
        for entry in entries:
            kind, value = classify_entry(entry)
            if kind == "sender":
                senders.add(value)
            elif kind == "domain":
                domains.add(value)
            elif kind == "network":
                networks.append(parse_network(value))
            elif kind == "list-id":
                list_ids.add(value)
            else:
                problems.append(value)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(frozenset(senders), frozenset(domains), tuple(networks), frozenset(list_ids))

    def allows(self, sender: str, client: str, list_id: str | None) -> str | None:
        """The entry that lets this message through (for the log), or None."""
        address = sender.lower().rstrip(".")
        if address and address in self.senders:
            return address
        domain = address.rpartition("@")[2]
        if address and domain in self.domains:
            return "@" + domain
        if self.networks:
            addr = client_address(client)
            if addr is not None:
                for net in self.networks:
                    if addr.version == net.version and addr in net:
                        return str(net)
        if list_id is not None and list_id in self.list_ids:
            return list_id
        return None


def classify_entry(entry: Any) -> tuple[str, str]:
    """
    What a C{mailing_lists} entry is: (kind, normalised value), kind one of
    sender, domain, network, list-id; or ("error", a text naming it).
    """
    if not isinstance(entry, str) or not entry.strip():
        return "error", f"{entry!r} is not an address, a network or a List-Id"
    text = entry.strip()
    if "<" in text or ">" in text:
        found = list_id_value(text.encode("utf-8", "replace"))
        if found is not None and _LIST_ID.fullmatch(found):
            return "list-id", found
        return "error", f"{text!r} is not a List-Id (RFC 2919: Name <list.example.org>)"
    if "@" in text:
        local, _, domain = text.rpartition("@")
        if domain and "." in domain and not any(c.isspace() for c in text):
            if not local:
                return "domain", domain.lower().rstrip(".")
            return "sender", text.lower().rstrip(".")
        return "error", f"{text!r} is not an address (local@domain or @domain)"
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    else:
        try:
            parse_network(text)
        except NetworkError as e:
            return "error", e.problems[0]
        return "network", text
    if _LIST_ID.fullmatch(text):
        return "list-id", text.lower()
    return "error", f"{text!r} is not an address, a network (CIDR) or a List-Id"


# --- counting --------------------------------------------------------------------------


class DistinctCounter:
    """
    Distinct members (recipients) per key within a sliding window, in
    slices as L{mailsrv.policy.rates.SlidingCounter}; at most
    C{max_members} members kept in all.
    """

    def __init__(
        self,
        clock: Any,
        window: float,
        slices: int = SLICES,
        max_members: int = MAX_MEMBERS,
    ) -> None:
        self._clock = clock
        self._slice = window / slices
        self._slices = slices
        self._max = max_members
        self._members = 0
        # key -> [last slice counted, {member: slice it was last counted in}];
        # the dict itself in order of last count, least recent first.
        self._keys: OrderedDict[Hashable, list[Any]] = OrderedDict()

    def _now_slice(self) -> int:
        return int(self._clock.seconds() // self._slice)

    def _live(self, key: Hashable, now_slice: int) -> dict[str, int] | None:
        """C{key}'s members still within the window (dropping the others), or None."""
        entry = self._keys.get(key)
        if entry is None:
            return None
        members: dict[str, int] = entry[1]
        oldest = now_slice - self._slices
        if entry[0] < oldest:
            expired = list(members)
        else:
            expired = [m for m, s in members.items() if s < oldest]
        for m in expired:
            del members[m]
        self._members -= len(expired)
        if not members:
            del self._keys[key]
            return None
        return members

    def count(self, key: Hashable, extra: Iterable[str] = ()) -> int:
        """How many distinct members C{key} has within the window, with C{extra} added."""
        members = self._live(key, self._now_slice()) or {}
        return len(members) + len(set(extra).difference(members))

    def add(self, key: Hashable, new: Iterable[str]) -> None:
        """Count C{new} members for C{key} now."""
        now_slice = self._now_slice()
        members = self._live(key, now_slice)
        if members is None:
            members = {}
            self._keys[key] = [now_slice, members]
        else:
            self._keys[key][0] = now_slice
            self._keys.move_to_end(key)
        for m in new:
            if m not in members:
                self._members += 1
            members[m] = now_slice
        self._sweep(now_slice)
        while self._members > self._max and self._keys:
            _, (_, evicted) = self._keys.popitem(last=False)
            self._members -= len(evicted)

    def _sweep(self, now_slice: int) -> None:
        """Forget a few least recently counted keys whose slices have all expired."""
        oldest = now_slice - self._slices
        for _ in range(SWEEP_PER_COUNT):
            if not self._keys:
                return
            key, (last, members) = next(iter(self._keys.items()))
            if last >= oldest:
                return  # the least recent key is live: so are all the others
            del self._keys[key]
            self._members -= len(members)

    def tracked(self) -> int:
        """How many members are kept in all: what bounds the memory used."""
        return self._members

    def keys(self) -> int:
        return len(self._keys)


class DuplicateMail:
    """The mass duplicate mail check of a server, shared by its SMTP listeners."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        limit: int,
        window: float,
        mailing_lists: MailingLists | None = None,
        max_members: int = MAX_MEMBERS,
        max_marks: int = MAX_TRACKED,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self.mailing_lists = mailing_lists or MailingLists()
        self.counter = DistinctCounter(clock, window, max_members=max_members)
        self._max_marks = max_marks
        # key -> when its last message over the limit was deferred, least recent first.
        self._deferred: OrderedDict[Hashable, float] = OrderedDict()

    def message(self, list_recipients: Iterable[str] = ()) -> DuplicateCheck:
        """The check of one message; C{list_recipients}: its recipients that are list aliases."""
        return DuplicateCheck(self, frozenset(list_recipients))

    def verdict(self, envelope: Envelope, body: BodyDigest, counted: Sequence[str]) -> Verdict:
        """
        Whether the message C{body} from C{envelope} to C{counted} (its
        recipients that count) is taken (then counted), deferred or refused.
        """
        if self.limit <= 0 or body.empty:
            return ACCEPTED
        allowed = self.mailing_lists.allows(envelope.sender, envelope.client_ip, body.list_id)
        if allowed is not None:
            return ACCEPTED
        rcpts = sorted({r.lower() for r in counted})
        if not rcpts:
            return ACCEPTED
        digest = body.digest()
        keys = [(digest, k) for k in duplicate_keys(envelope)]
        over = [(n, key) for key in keys if (n := self.counter.count(key, rcpts)) > self.limit]
        if not over:
            for key in keys:
                self.counter.add(key, rcpts)
            return ACCEPTED
        count, key = max(over)
        now = self._clock.seconds()
        refuse = any(self._deferred_within_window(k, now) for _, k in over)
        if not refuse:
            for _, k in over:
                self._mark(k, now)
        self.log.info(
            "{queue_id}: duplicate mail {outcome}: {count} distinct recipients of body "
            "{body} by {key} within {window} (limit {limit})",
            queue_id=envelope.queue_id,
            outcome="refused" if refuse else "deferred",
            count=count,
            body=digest.hex()[:12],
            key=key[1],
            window=describe_window(self.window),
            limit=self.limit,
        )
        return refusal(refuse, self.limit, self.window)

    def _deferred_within_window(self, key: Hashable, now: float) -> bool:
        when = self._deferred.get(key)
        if when is None:
            return False
        if now - when >= self.window:
            del self._deferred[key]
            return False
        return True

    def _mark(self, key: Hashable, now: float) -> None:
        self._deferred[key] = now
        self._deferred.move_to_end(key)
        while len(self._deferred) > self._max_marks:
            self._deferred.popitem(last=False)

    def marks(self) -> int:
        return len(self._deferred)


@implementer(IMessageCheck)
class DuplicateCheck:
    """
    The check of one message at the end of DATA (one of
    L{mailsrv.smtp.checks}): its body hash is fed as the message streams in
    (L{body}), its recipients that are list aliases were known at RCPT. A
    check per message rather than one per server, because what it needs
    (the hash, the routes) is the message's own and is known before the
    end of DATA; the server-wide counts are L{DuplicateMail}'s.
    """

    def __init__(self, duplicates: DuplicateMail, list_recipients: frozenset[str]) -> None:
        self.duplicates = duplicates
        self.list_recipients = list_recipients
        self.body = BodyDigest()

    def check(self, message_source: Any, envelope: Envelope) -> defer.Deferred:
        """A Deferred L{Verdict}: accept, defer (451 4.7.1) or reject (550 5.7.1)."""
        counted = [r for r in envelope.recipients if r not in self.list_recipients]
        return defer.succeed(self.duplicates.verdict(envelope, self.body, counted))


def duplicate_keys(envelope: Envelope) -> list[str]:
    """
    Whom a message counts against: its envelope sender (not C{<>}) and its
    client (the logged-in user on submission, else the address, IPv6 by /64).
    """
    keys = [] if not envelope.sender else ["sender:" + envelope.sender.lower().rstrip(".")]
    if envelope.user is not None:
        keys.append("user:" + account_key(envelope.user))
    else:
        keys.append("client:" + client_key(envelope.client_ip))
    return keys


def refusal(refuse: bool, limit: int, window: float) -> Verdict:
    """The verdict (with its reply) for a message over the limit."""
    what = f"The same message to more than {limit} recipients within {describe_window(window)}"
    ask = "if it is a mailing list, ask the postmaster to allow it"
    if refuse:
        reply = Reply(REFUSE_CODE, REFUSE_ENHANCED, f"{what} is refused as mass mail; {ask}")
        return Verdict(REJECT, reason=reply.text, refusal=reply)
    reply = Reply(DEFER_CODE, DEFER_ENHANCED, f"{what}: deferred; {ask}, else try later")
    return Verdict(DEFER, reason=reply.text, refusal=reply)


def describe_window(seconds: float) -> str:
    """A window as an administrator wrote it: 1h, 30m, 2d, 90s."""
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def build_duplicates(policy: Any, clock: Any) -> DuplicateMail | None:
    """The check C{policy} (a L{mailsrv.config.PolicyConfig}) asks for; None when off."""
    if policy.duplicate_recipients <= 0:
        return None
    lists = MailingLists.parse(policy.mailing_lists)
    return DuplicateMail(clock, policy.duplicate_recipients, policy.duplicate_window, lists)


__all__ = [
    "BodyDigest",
    "DistinctCounter",
    "DuplicateCheck",
    "DuplicateMail",
    "MailingLists",
    "build_duplicates",
    "classify_entry",
    "duplicate_keys",
]
