"""
NOTIFY (RFC 5465): the command's arguments, read into a L{NotifySpec}, and
the question a session asks of it for every change: does the client want
to hear of this event in this mailbox?

Where the RFC leaves a choice, the choices are Dovecot's: ``inboxes`` means
the same as ``personal`` (RFC 5465 6.3 allows it when the server cannot tell
where mail is delivered), a mailbox matched by several event groups gets
the events of them all, and a group with NONE adds nothing. Where Dovecot
is laxer than the RFC, the RFC rules: an event group naming MessageNew
without MessageExpunge (or FlagChange without both), other than message
events for the selected mailbox, fetch attributes for another mailbox,
or SET with no event group at all is a BAD (RFC 5465 5, 6.1, 8); the
BADEVENT code lists the events supported, in parentheses (RFC 5465 3.1, 8).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass

from mailsrv.store.names import DELIMITER

MESSAGE_NEW = "MessageNew"
MESSAGE_EXPUNGE = "MessageExpunge"
FLAG_CHANGE = "FlagChange"
ANNOTATION_CHANGE = "AnnotationChange"
MAILBOX_NAME = "MailboxName"
SUBSCRIPTION_CHANGE = "SubscriptionChange"
MAILBOX_METADATA_CHANGE = "MailboxMetadataChange"
SERVER_METADATA_CHANGE = "ServerMetadataChange"

# RFC 5465 5: the events RFC 5465 names, spelled as it spells them.
KNOWN_EVENTS = (
    MESSAGE_NEW,
    MESSAGE_EXPUNGE,
    FLAG_CHANGE,
    ANNOTATION_CHANGE,
    MAILBOX_NAME,
    SUBSCRIPTION_CHANGE,
    MAILBOX_METADATA_CHANGE,
    SERVER_METADATA_CHANGE,
)
# Those this server sends: no ANNOTATE (RFC 5257) nor METADATA (RFC 5464) here.
SUPPORTED_EVENTS = (MESSAGE_NEW, MESSAGE_EXPUNGE, FLAG_CHANGE, MAILBOX_NAME, SUBSCRIPTION_CHANGE)
# RFC 5465 8: message-event.
MESSAGE_EVENTS = frozenset({MESSAGE_NEW, MESSAGE_EXPUNGE, FLAG_CHANGE, ANNOTATION_CHANGE})

SELECTED = "SELECTED"
SELECTED_DELAYED = "SELECTED-DELAYED"
PERSONAL = "PERSONAL"
INBOXES = "INBOXES"
SUBSCRIBED = "SUBSCRIBED"
SUBTREE = "SUBTREE"
MAILBOXES = "MAILBOXES"
_OTHER_FILTERS = frozenset({PERSONAL, INBOXES, SUBSCRIBED, SUBTREE, MAILBOXES})

_BY_NAME = {e.upper(): e for e in KNOWN_EVENTS}


class NotifySyntaxError(Exception):
    """The arguments break RFC 5465's grammar or rules: a BAD; C{str()} is the text."""


class BadEvent(Exception):
    """An event this server does not send (RFC 5465 3.1): NO [BADEVENT (...)]."""


def bad_event_code() -> bytes:
    """C{BADEVENT (...)}: RFC 5465 3.1, it MUST list all the events the server supports."""
    return b"BADEVENT (" + " ".join(SUPPORTED_EVENTS).encode("ascii") + b")"


@dataclass(frozen=True)
class Filter:
    """One event group for mailboxes other than the selected one (RFC 5465 6.2-6.6)."""

    kind: str  # PERSONAL, INBOXES, SUBSCRIBED, SUBTREE, MAILBOXES
    names: tuple[str, ...]  # SUBTREE and MAILBOXES: the names given (no wildcards, RFC 5465 6.6)
    events: frozenset[str]

    def matches(self, name: str, subscribed: Container[str]) -> bool:
        """Whether mailbox C{name} is one this filter names."""
        if self.kind in (PERSONAL, INBOXES):
            return True  # RFC 5465 6.3: inboxes as personal, the user's own mailboxes
        if self.kind == SUBSCRIBED:
            return name in subscribed
        if self.kind == SUBTREE:
            return any(name == n or name.startswith(n + DELIMITER) for n in self.names)
        return name in self.names


@dataclass(frozen=True)
class NotifySpec:
    """What a NOTIFY SET asked for."""

    status: bool = False  # the STATUS indicator: STATUS of each watched mailbox before the OK
    selected_events: frozenset[str] = frozenset()  # for the selected mailbox
    selected_delayed: bool = False  # SELECTED-DELAYED: expunges wait for a command (RFC 5465 6.1.2)
    fetch: bytes | None = None  # MessageNew's fetch-att list for the selected mailbox, raw
    filters: tuple[Filter, ...] = ()

    def events_for(self, name: str, subscribed: Container[str]) -> frozenset[str]:
        """The events wanted for mailbox C{name} (not the selected one): all its groups'."""
        out: frozenset[str] = frozenset()
        for f in self.filters:
            if f.matches(name, subscribed):
                out |= f.events
        return out

    def wants(self, event: str, name: str, subscribed: Container[str]) -> bool:
        """Whether C{event} in mailbox C{name} is to be told."""
        return any(event in f.events and f.matches(name, subscribed) for f in self.filters)

    def has(self, event: str) -> bool:
        """Whether any group (the selected mailbox's aside) asks for C{event}."""
        return any(event in f.events for f in self.filters)

    @property
    def watches_mailboxes(self) -> bool:
        """Whether any group asks for events of mailboxes other than the selected one."""
        return any(f.events for f in self.filters)

    @property
    def uses_subscriptions(self) -> bool:
        """Whether the subscription list matters: a SUBSCRIBED filter or SubscriptionChange."""
        return any(f.kind == SUBSCRIBED and f.events for f in self.filters) or self.has(
            SUBSCRIPTION_CHANGE
        )


# --- reading the arguments ---------------------------------------------------


class _Quoted(bytes):
    """A quoted string's contents (an atom is plain bytes)."""


@dataclass
class _Group:
    """A parenthesized list: its items and its bytes as sent."""

    items: list[object]
    raw: bytes


def _tokens(line: bytes) -> list[object]:
    """The items of C{line}: atoms (bytes), quoted strings (L{_Quoted}), lists (L{_Group})."""
    items, i = _items(line, 0, top=True)
    return items


def _items(line: bytes, i: int, top: bool) -> tuple[list[object], int]:
    items: list[object] = []
    n = len(line)
    while True:
        while i < n and line[i] == 0x20:
            i += 1
        if i >= n:
            if not top:
                raise NotifySyntaxError("Missing ')'")
            return items, i
        c = line[i : i + 1]
        if c == b")":
            if top:
                raise NotifySyntaxError("Unexpected ')'")
            return items, i + 1
        if c == b"(":
            start = i
            inner, i = _items(line, i + 1, top=False)
            items.append(_Group(inner, line[start:i]))
        elif c == b'"':
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise NotifySyntaxError("Unterminated quoted string")
                ch = line[i]
                if ch == 0x5C and i + 1 < n:  # backslash
                    out.append(line[i + 1])
                    i += 2
                elif ch == 0x22:
                    i += 1
                    break
                else:
                    out.append(ch)
                    i += 1
            items.append(_Quoted(bytes(out)))
        elif c == b"{":
            raise NotifySyntaxError("Literals are not accepted in NOTIFY")
        else:
            start = i
            while i < n and line[i] not in b" ()":
                if line[i] == 0x5B:  # '[': a fetch section, spaces and parentheses in it
                    end = line.find(b"]", i)
                    if end < 0:
                        raise NotifySyntaxError("Missing ']'")
                    i = end
                i += 1
            items.append(line[start:i])


def _atom(item: object) -> str | None:
    if isinstance(item, bytes) and not isinstance(item, _Quoted):
        return item.decode("ascii", "replace")
    return None


def parse_notify(line: bytes, decode_name: Callable[[bytes], str]) -> NotifySpec | None:
    """
    Read NOTIFY's arguments (RFC 5465 8): None for NOTIFY NONE, else the
    L{NotifySpec}. C{decode_name} turns a mailbox astring into a folder name
    (and raises L{NotifySyntaxError} for one it cannot read). Raises
    L{NotifySyntaxError} (a BAD) or L{BadEvent} (a NO).
    """
    items = _tokens(line.strip(b" "))
    if not items:
        raise NotifySyntaxError("Missing NOTIFY arguments")
    verb = (_atom(items[0]) or "").upper()
    if verb == "NONE":
        if len(items) != 1:
            raise NotifySyntaxError("NOTIFY NONE takes no arguments")
        return None
    if verb != "SET":
        raise NotifySyntaxError("Expected SET or NONE")
    rest = items[1:]
    status = bool(rest) and (_atom(rest[0]) or "").upper() == "STATUS"
    if status:
        rest = rest[1:]
    if not rest:
        raise NotifySyntaxError("NOTIFY SET needs an event group")  # RFC 5465 8: event-groups
    selected: frozenset[str] | None = None
    delayed = False
    fetch: bytes | None = None
    filters: list[Filter] = []
    unsupported: set[str] = set()
    for group in rest:
        if not isinstance(group, _Group) or not group.items:
            raise NotifySyntaxError("Expected an event group")
        kind = (_atom(group.items[0]) or "").upper()
        args = group.items[1:]
        if kind in (SELECTED, SELECTED_DELAYED):
            if selected is not None:
                # RFC 5465 6.1: only one of them in a NOTIFY command.
                raise NotifySyntaxError("Only one of SELECTED and SELECTED-DELAYED")
            if len(args) != 1:
                raise NotifySyntaxError("Expected the events")
            events, fetch, unknown = _events(args[0], allow_fetch=True)
            if events - MESSAGE_EVENTS:
                # RFC 5465 6.1: "It is an error to specify other types of events".
                raise NotifySyntaxError("Only message events for the selected mailbox")
            selected, delayed = events, kind == SELECTED_DELAYED
        elif kind in _OTHER_FILTERS:
            names: tuple[str, ...] = ()
            if kind in (SUBTREE, MAILBOXES):
                if not args:
                    raise NotifySyntaxError("Expected mailbox names")
                names, args = _names(args[0], decode_name), args[1:]
            if len(args) != 1:
                raise NotifySyntaxError("Expected the events")
            events, _, unknown = _events(args[0], allow_fetch=False)
            if events:
                filters.append(Filter(kind, names, events))
        else:
            raise NotifySyntaxError("Unknown mailbox filter")
        unsupported |= unknown | (events - set(SUPPORTED_EVENTS))
    if unsupported:
        raise BadEvent(" ".join(sorted(unsupported)))
    return NotifySpec(status, selected or frozenset(), delayed, fetch, tuple(filters))


def _names(item: object, decode_name: Callable[[bytes], str]) -> tuple[str, ...]:
    """RFC 5465 8: one-or-more-mailbox, a mailbox or a list of them."""
    raw = item.items if isinstance(item, _Group) else [item]
    if not raw:
        raise NotifySyntaxError("Expected mailbox names")
    out = []
    for one in raw:
        if not isinstance(one, bytes):
            raise NotifySyntaxError("Expected a mailbox name")
        out.append(decode_name(bytes(one)))
    return tuple(out)


def _events(item: object, allow_fetch: bool) -> tuple[frozenset[str], bytes | None, set[str]]:
    """
    RFC 5465 8: C{events}, NONE or a list of events; fires with the known
    events, MessageNew's fetch-att list (raw) and the names it does not know.
    """
    if _atom(item) is not None and (_atom(item) or "").upper() == "NONE":
        return frozenset(), None, set()
    if not isinstance(item, _Group) or not item.items:
        raise NotifySyntaxError("Expected a list of events or NONE")
    events: set[str] = set()
    unknown: set[str] = set()
    fetch: bytes | None = None
    it = item.items
    i = 0
    while i < len(it):
        name = _atom(it[i])
        if name is None:
            raise NotifySyntaxError("Expected an event name")
        event = _BY_NAME.get(name.upper())
        if event is None:
            unknown.add(name)  # RFC 5465 8: event-ext, an atom; a NO [BADEVENT]
        else:
            events.add(event)
        if event == MESSAGE_NEW and i + 1 < len(it) and isinstance(it[i + 1], _Group):
            if not allow_fetch:
                # RFC 5465 5.2: the FETCH responses are for the selected mailbox only.
                raise NotifySyntaxError("Fetch attributes only for the selected mailbox")
            group = it[i + 1]
            assert isinstance(group, _Group)
            fetch = group.raw
            i += 1
        i += 1
    # RFC 5465 5: MessageNew and MessageExpunge together; FlagChange and
    # AnnotationChange with both.
    if (MESSAGE_NEW in events) != (MESSAGE_EXPUNGE in events):
        raise NotifySyntaxError("MessageNew and MessageExpunge must be together")
    if events & {FLAG_CHANGE, ANNOTATION_CHANGE} and MESSAGE_NEW not in events:
        raise NotifySyntaxError("FlagChange requires MessageNew and MessageExpunge")
    return frozenset(events), fetch, unknown
