"""
LIST and LSUB mailbox patterns (RFC 3501 6.3.8): ``*`` matches any run of
characters, ``%`` any run that does not cross the hierarchy delimiter.

A pattern is matched as a bit-parallel NFA in one pass over the name: each
character costs a few integer operations whatever the pattern holds, so a
pattern of many wildcards takes no longer than a plain one (a regular
expression would backtrack, exponentially in the number of ``*``).
"""

from __future__ import annotations

from mailsrv.store.names import DELIMITER, INBOX

_STAR = "*"
_PERCENT = "%"


class ListPattern:
    """A compiled LIST pattern (reference name and mailbox name joined); see L{match}."""

    def __init__(self, pattern: str, delimiter: str = DELIMITER) -> None:
        # RFC 3501 5.1: INBOX is case-insensitive, also as the first level.
        head = pattern[: len(INBOX)]
        if head.upper() == INBOX and pattern[len(INBOX) : len(INBOX) + 1] in ("", delimiter):
            pattern = INBOX + pattern[len(INBOX) :]
        self.pattern = pattern
        self._delimiter = delimiter
        # Elements: literal characters and wildcards. A run of wildcards is
        # one wildcard: "*" if any of them is "*" (it absorbs "%"), else "%".
        elements: list[str] = []
        wild: list[bool] = []
        for c in pattern:
            if c in (_STAR, _PERCENT):
                if wild and wild[-1]:
                    if c == _STAR:
                        elements[-1] = _STAR
                    continue
                elements.append(c)
                wild.append(True)
            else:
                elements.append(c)
                wild.append(False)
        self._literal: dict[str, int] = {}  # character -> the literal elements it matches
        self._star = self._percent = 0
        for i, (c, w) in enumerate(zip(elements, wild, strict=True)):
            bit = 1 << i
            if not w:
                self._literal[c] = self._literal.get(c, 0) | bit
            elif c == _STAR:
                self._star |= bit
            else:
                self._percent |= bit
        self._wild = self._star | self._percent
        self._accept = 1 << len(elements)
        self._start = self._closure(1)
        # Shortcuts for the shapes clients send most: "name", "prefix*", "prefix%".
        first = next((i for i, w in enumerate(wild) if w), len(elements))
        self._prefix = "".join(elements[:first])
        self._plain = first == len(elements)
        self._tail = elements[first] if first == len(elements) - 1 else None
        self._min_length = wild.count(False)  # each literal character takes one of the name

    def _closure(self, states: int) -> int:
        # A wildcard may match nothing; after collapsing no two are adjacent,
        # so one step reaches every state an empty match can.
        return states | ((states & self._wild) << 1)

    def match(self, name: str) -> bool:
        """Whether C{name} matches the whole pattern."""
        if self._plain:
            return name == self._prefix
        if len(name) < self._min_length or not name.startswith(self._prefix):
            return False
        if self._tail == _STAR:
            return True
        if self._tail == _PERCENT:
            return self._delimiter not in name[len(self._prefix) :]
        states = self._start
        literal, star, percent = self._literal, self._star, self._percent
        delimiter = self._delimiter
        for c in name:
            nxt = ((states & literal.get(c, 0)) << 1) | (states & star)
            if c != delimiter:
                nxt |= states & percent
            states = self._closure(nxt)
            if not states:
                return False
        return bool(states & self._accept)
