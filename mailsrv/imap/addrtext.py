"""
An address header (From, To, Cc, Bcc) as the text that SEARCH FROM/TO/CC/BCC
match (RFC 3501 6.4.4): the addresses parsed out of the field (RFC 5322 3.4)
and written again in one plain form, as Dovecot does, so that comments and
odd spacing hide nothing: ``"Joe Q. Public" <user-from (comment)@ (comment)
domain.org>`` reads ``"Joe Q. Public" <user-from@domain.org>``.

The form, per address, joined by ``", "``: ``<local@domain>``; with a
display name ``name <local@domain>``, the name in quotes when it is not one
atom, or with its encoded words (RFC 2047) decoded and bare; a route as
``<@a,@b:local@domain>``; a group as ``name: member, member;``. With no
display name, the last comment of the address stands for one (the old
``user@domain (Full Name)`` form). The parser is lenient: whatever it cannot
make sense of is dropped, never an error.
"""

from __future__ import annotations

import email.header
import re

_SPECIALS = '()<>@,;:\\".[]'
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")

# Token kinds
_WORD = "word"  # an atom
_QUOTED = "quoted"  # a quoted string, unescaped
_COMMENT = "comment"  # a comment's text, unescaped
_LITERAL = "literal"  # a domain literal, brackets kept


def _tokens(text: str) -> list[tuple[str, str]]:
    """RFC 5322 3.2: atoms, quoted strings, comments, domain literals and specials."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == '"':
            buf, i = _until(text, i + 1, '"')
            out.append((_QUOTED, buf))
        elif c == "(":
            depth, chars = 1, []
            i += 1
            while i < n and depth:
                ch = text[i]
                if ch == "\\" and i + 1 < n:
                    chars.append(text[i + 1])
                    i += 2
                    continue
                depth += (ch == "(") - (ch == ")")
                if depth:
                    chars.append(ch)
                i += 1
            out.append((_COMMENT, " ".join("".join(chars).split())))
        elif c == "[":
            buf, i = _until(text, i + 1, "]")
            out.append((_LITERAL, "[" + buf + "]"))
        elif c in _SPECIALS:
            out.append((c, c))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIALS and text[j] not in " \t\r\n":
                j += 1
            out.append((_WORD, text[i:j]))
            i = j
    return out


def _until(text: str, i: int, end: str) -> tuple[str, int]:
    """The text from C{i} to the closing C{end} (backslash escapes undone), and the index after."""
    buf = []
    n = len(text)
    while i < n and text[i] != end:
        if text[i] == "\\" and i + 1 < n:
            i += 1
        buf.append(text[i])
        i += 1
    return "".join(buf), i + 1


def _phrase(tokens: list[tuple[str, str]]) -> str:
    """Words and quoted strings joined by single spaces; a "." (obsolete phrase) sticks to the word before."""
    out = ""
    for kind, value in tokens:
        if kind == ".":
            out += "."
        elif kind in (_WORD, _QUOTED):
            out += (" " if out else "") + value
    return out


def _decode_words(text: str) -> str:
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:
        return text


def _addr_spec(tokens: list[tuple[str, str]]) -> str:
    """local@domain from the tokens, comments and spaces left out."""
    parts = [v for k, v in tokens if k in (_WORD, _QUOTED, _LITERAL, ".", "@")]
    return "".join(parts)


def _name(raw: str) -> str:
    """
    A display name as written: encoded words decoded and left bare (RFC 2047
    5: they may not be quoted), else in quotes unless it is one atom.
    """
    if "=?" in raw:
        return _decode_words(raw)
    if _ATEXT.fullmatch(raw):
        return raw
    return '"' + raw.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mailbox(tokens: list[tuple[str, str]]) -> str:
    """One mailbox (RFC 5322 3.4) in the plain form; "" if it holds nothing."""
    comments = [v for k, v in tokens if k == _COMMENT and v]
    kinds = [k for k, _ in tokens]
    if "<" in kinds:
        lt = kinds.index("<")
        gt = kinds.index(">", lt) if ">" in kinds[lt:] else len(tokens)
        name = _phrase(tokens[:lt])
        inner = tokens[lt + 1 : gt]
        inner_kinds = [k for k, _ in inner]
        route = ""
        if ":" in inner_kinds:
            colon = inner_kinds.index(":")
            route = "".join(v for k, v in inner[:colon] if k in (_WORD, _LITERAL, ".", "@", ","))
            inner = inner[colon + 1 :]
        addr = route + (":" if route else "") + _addr_spec(inner)
    else:
        name = route = ""
        addr = _addr_spec(tokens)
    if not name and comments:
        name = comments[-1]
    shown = _name(name) if name else ""
    if not addr:
        return shown
    return shown + (" " if shown else "") + "<" + addr + ">"


def address_text(value: str) -> str:
    """The address list in field value C{value}, in the plain form this module describes."""
    out: list[str] = []
    group: list[str] | None = None
    group_name = ""
    cur: list[tuple[str, str]] = []
    depth = 0

    def flush() -> None:
        item = _mailbox(cur) if cur else ""
        cur.clear()
        if item:
            (out if group is None else group).append(item)

    for kind, value_ in _tokens(value):
        if kind == "<":
            depth += 1
        elif kind == ">":
            depth = max(0, depth - 1)
        if depth == 0 and kind == ",":
            flush()
        elif depth == 0 and kind == ":" and group is None:
            group_name, group = _phrase(cur), []
            cur.clear()
        elif depth == 0 and kind == ";" and group is not None:
            flush()
            members = ", ".join(group)
            out.append(_name(group_name) + ":" + (" " + members if members else "") + ";")
            group = None
        else:
            cur.append((kind, value_))
    flush()
    if group is not None:  # a group left open
        out.append(_name(group_name) + ": " + ", ".join(group) + ";")
    return ", ".join(out)
