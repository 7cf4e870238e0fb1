"""
The base subject of RFC 5256 2.1 (what SORT SUBJECT and THREAD compare), the
RFC 2047 decoding it starts with, and the i;ascii-casemap comparator key
(RFC 4790 9.2) that SORT compares strings with.
"""

from __future__ import annotations

import base64
import binascii
import re

# RFC 2047 2: =?charset?encoding?encoded-text?=, charset possibly with an RFC 2231 language.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_WS = re.compile(r"[ \t\r\n]+")
# RFC 5256 5: subj-blob = "[" *BLOBCHAR "]" *WSP; BLOBCHAR is any char but "[" and "]".
_BLOB = r"\[[^\[\]]*\][ \t]*"
# subj-refwd = ("re" / ("fw" ["d"])) *WSP [subj-blob] ":"; subj-leader = *subj-blob subj-refwd.
_LEADER = re.compile(r"(?:" + _BLOB + r")*(?:re|fwd?)[ \t]*(?:" + _BLOB + r")?:", re.I)
_BLOB_PREFIX = re.compile(_BLOB)


def _decode_word(charset: str, encoding: str, text: str) -> bytes:
    data = text.encode("ascii", "replace")
    if encoding in "bB":
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    # RFC 2047 4.2: "_" is a space in the Q encoding.
    return binascii.a2b_qp(data, header=True)


def _to_text(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def decode_header(raw: str) -> str:
    """
    RFC 2047 encoded-words decoded to text; the white space between two
    adjacent encoded-words is dropped (RFC 2047 6.2), and adjacent words in one
    charset are decoded together so that a character split between them stays
    whole. A word that does not decode is kept as it is.
    """
    if "=?" not in raw:
        return raw
    out: list[str] = []
    pending = b""
    pending_charset = ""
    pos = 0
    after_word = False  # the text before this match follows a decoded encoded-word

    def flush() -> None:
        nonlocal pending
        if pending:
            out.append(_to_text(pending, pending_charset))
            pending = b""

    for m in _ENCODED_WORD.finditer(raw):
        between = raw[pos : m.start()]
        pos = m.end()
        charset = m.group(1).partition("*")[0].lower()
        try:
            data = _decode_word(charset, m.group(2), m.group(3))
        except (binascii.Error, ValueError):
            flush()
            out.append(between + m.group(0))
            after_word = False
            continue
        adjacent = after_word and not between.strip(" \t\r\n")
        if not adjacent or charset != pending_charset:
            flush()
        if not adjacent:
            out.append(between)
        pending_charset = charset
        pending += data
        after_word = True
    flush()
    out.append(raw[pos:])
    return "".join(out)


def header_text(raw: bytes) -> str:
    """A header field's value as text: 8-bit octets as UTF-8, encoded-words decoded."""
    return decode_header(raw.decode("utf-8", "replace"))


def casemap(text: str) -> bytes:
    """The i;ascii-casemap key (RFC 4790 9.2): UTF-8 octets, only a-z mapped to A-Z."""
    return text.encode("utf-8").upper()


def base_subject(raw: bytes) -> tuple[str, bool]:
    """
    RFC 5256 2.1: the base subject of a Subject field's raw value, and whether
    the extraction removed a reply or forward marker ("re:", "fwd:", "(fwd)",
    "[fwd: ...]"), which THREAD=REFERENCES step 5 needs.
    """
    # (1) decode, then tabs, continuations and runs of spaces become one space.
    s = _WS.sub(" ", header_text(raw))
    if "[" not in s and ":" not in s and not s.rstrip(" ").endswith(")"):
        return s.strip(" "), False  # no leader, blob or trailer but spaces
    reply = False
    while True:
        # (2) remove trailers: subj-trailer = "(fwd)" / WSP, repeatedly.
        while True:
            if s.endswith(" "):
                s = s[:-1]
            elif s[-5:].lower() == "(fwd)":
                s = s[:-5]
                reply = True
            else:
                break
        # (3)-(5): leaders and blobs, until neither matches.
        while True:
            changed = False
            while True:  # (3) subj-leader = (*subj-blob subj-refwd) / WSP
                if s.startswith(" "):
                    s = s[1:]
                    changed = True
                    continue
                m = _LEADER.match(s)
                if m is None:
                    break
                s = s[m.end() :]
                reply = changed = True
            m = _BLOB_PREFIX.match(s)
            # (4) a leading subj-blob goes if a non-empty subj-base is left.
            if m is not None and s[m.end() :].strip(" "):
                s = s[m.end() :]
                changed = True
            if not changed:
                break
        # (6) subj-fwd-hdr "[fwd:" ... subj-fwd-trl "]": unwrap, start again at (2).
        if s[:5].lower() == "[fwd:" and s.endswith("]"):
            s = s[5:-1]
            reply = True
            continue
        return s, reply
