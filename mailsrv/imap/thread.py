"""
THREAD (RFC 5256 3): the ORDEREDSUBJECT and REFERENCES algorithms over
L{Entry} lists, and the thread-list response syntax (RFC 5256 4). Trees are
walked without recursion: a reply chain thousands of messages deep is
ordinary in a mailing-list archive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mailsrv.imap.sort import Entry, sent_date

ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")


class Node:
    """A container of the threading algorithms: a message (or none: a dummy) and its children."""

    __slots__ = ("entry", "parent", "children")

    def __init__(self, entry: Entry | None = None) -> None:
        self.entry = entry
        self.parent: Node | None = None
        self.children: list[Node] = []


def _date_key(node: Node) -> tuple[float, int]:
    """A node's place among its siblings: sent date, then mailbox order; a dummy's first child's."""
    while node.entry is None:
        node = node.children[0]
    return sent_date(node.entry), node.entry.seq


def ordered_subject(entries: Sequence[Entry]) -> list[Node]:
    """
    RFC 5256 3, ORDEREDSUBJECT: by base subject, then sent date; one thread per
    base subject, its first message the parent of all the others; threads by
    the sent date of their first message.
    """
    by_subject = sorted(entries, key=lambda e: (e.keys.subject, sent_date(e), e.seq))
    roots: list[Node] = []
    current: Node | None = None
    for e in by_subject:
        if current is not None and current.entry is not None:
            if current.entry.keys.subject == e.keys.subject:
                child = Node(e)
                child.parent = current
                current.children.append(child)
                continue
        current = Node(e)
        roots.append(current)
    roots.sort(key=_date_key)
    return roots


def _is_ancestor(a: Node, b: Node) -> bool:
    """Whether C{a} is C{b} or one of its ancestors (a node without children is no one's)."""
    if a is b:
        return True
    if not a.children:
        return False
    n: Node | None = b
    while n is not None:
        if n is a:
            return True
        n = n.parent
    return False


def _link(parent: Node, child: Node) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
    child.parent = parent
    parent.children.append(child)


def _depth(node: Node) -> int:
    depth = 0
    parent = node.parent
    while parent is not None:
        depth += 1
        parent = parent.parent
    return depth


def _walk(roots: Sequence[Node]) -> list[Node]:
    """Every node under C{roots}, parents before their children."""
    out = list(roots)
    i = 0
    while i < len(out):
        out.extend(out[i].children)
        i += 1
    return out


def _sort_all(roots: list[Node]) -> None:
    """RFC 5256 3 (REFERENCES 4 and 6): siblings by sent date at every level, children first."""
    for node in reversed(_walk(roots)):
        if len(node.children) > 1:
            node.children.sort(key=_date_key)
    roots.sort(key=_date_key)


def references(entries: Sequence[Entry]) -> list[Node]:
    """RFC 5256 3, REFERENCES: threads from Message-ID, References and In-Reply-To."""
    ids: dict[bytes, Node] = {}
    order: list[Node] = []  # every container, in the order first made
    # (1) containers and parent/child links.
    for e in entries:
        mid = e.keys.message_id
        node = ids.get(mid) if mid is not None else None
        if node is None or node.entry is not None:
            node = Node(e)  # (1A): no Message-ID, or a duplicate: a unique one
            if mid is not None and mid not in ids:
                ids[mid] = node
            order.append(node)
        else:
            node.entry = e
        prev: Node | None = None
        for ref in e.keys.references:
            ref_node = ids.get(ref)
            if ref_node is None:
                ref_node = ids[ref] = Node()
                order.append(ref_node)
            # (1B) link each reference to the next unless linked already or a loop.
            if prev is not None and ref_node.parent is None and not _is_ancestor(ref_node, prev):
                _link(prev, ref_node)
            prev = ref_node
        # (1C) the last reference is the parent, replacing a parent from a truncated chain.
        if prev is None:
            if node.parent is not None:
                node.parent.children.remove(node)
                node.parent = None
        elif node.parent is not prev and not _is_ancestor(node, prev):
            _link(prev, node)
    # (2) the root set; (3) dummies pruned, deepest first.
    roots = [n for n in order if n.parent is None]
    inner = [n for n in order if n.entry is None and n.parent is not None]
    inner.sort(key=_depth, reverse=True)
    for node in inner:
        parent = node.parent
        assert parent is not None
        i = parent.children.index(node)
        for c in node.children:
            c.parent = parent
        parent.children[i : i + 1] = node.children
    pruned: list[Node] = []
    for node in roots:
        if node.entry is None and len(node.children) <= 1:
            for c in node.children:  # a root dummy's only child takes its place
                c.parent = None
                pruned.append(c)
            continue
        pruned.append(node)
    # (4) the root set by sent date (a dummy by its first child's).
    for node in pruned:
        if node.entry is None:
            node.children.sort(key=_date_key)
    pruned.sort(key=_date_key)
    roots = _merge_subjects(pruned)
    # (6) every set of siblings by sent date.
    _sort_all(roots)
    return roots


def _first(node: Node) -> Entry:
    while node.entry is None:
        node = node.children[0]
    return node.entry


def _merge_subjects(roots: list[Node]) -> list[Node]:
    """RFC 5256 3 (REFERENCES 5): root threads with the same base subject gathered."""
    table: dict[bytes, Node] = {}
    for node in roots:  # (5B)
        e = _first(node)
        if not e.keys.subject:
            continue
        old = table.get(e.keys.subject)
        if (
            old is None
            or (node.entry is None and old.entry is not None)
            or (old.entry is not None and _first(old).keys.reply and not e.keys.reply)
        ):
            table[e.keys.subject] = node
    gone: set[int] = set()
    out: list[Node] = list(roots)
    place = {id(n): i for i, n in enumerate(out)}
    for node in roots:  # (5C)
        if id(node) in gone:
            continue
        e = _first(node)
        other = table.get(e.keys.subject) if e.keys.subject else None
        if other is None or other is node:
            continue
        if node.entry is None and other.entry is None:
            for c in node.children:
                c.parent = other
            other.children.extend(node.children)
            node.children = []
            gone.add(id(node))
        elif other.entry is None:
            _link(other, node)
            gone.add(id(node))
        elif node.entry is None:
            _link(node, other)
            gone.add(id(other))
            table[e.keys.subject] = node
        elif not _first(other).keys.reply and e.keys.reply:
            _link(other, node)
            gone.add(id(node))
        else:
            dummy = Node()
            out[place[id(other)]] = dummy
            place[id(dummy)] = place[id(other)]
            _link(dummy, other)
            _link(dummy, node)
            gone.add(id(node))
            table[e.keys.subject] = dummy
    return [n for n in out if id(n) not in gone]


def thread_list(roots: Sequence[Node], number: Callable[[Entry], int]) -> bytes:
    """
    RFC 5256 4: thread-list = "(" (thread-members / thread-nested) ")";
    a message then its only child in one list, two or more children each in
    its own parentheses. C{number} gives the number shown (sequence or UID).
    """
    out: list[bytes] = []
    stack: list[Node | bytes] = []
    for root in reversed(roots):
        stack += [b")", root, b"("]
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):
            out.append(item)
            continue
        node: Node = item
        while True:
            if node.entry is not None:
                if out and out[-1] != b"(":
                    out.append(b" ")
                out.append(b"%d" % number(node.entry))
                if len(node.children) == 1:
                    node = node.children[0]
                    continue
                if node.children:
                    out.append(b" ")
            for c in reversed(node.children):
                stack += [b")", c, b"("]
            break
    return b"".join(out)
