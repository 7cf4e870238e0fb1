"""
The header fields mbox programs keep their bookkeeping in (Status:,
X-Status:, X-Keywords:, ...): finding the end of a header block, hiding those
fields from sessions, reading flags from Status:/X-Status: and writing them
back, and the blank X-Keywords: padding that lets flags be written in place.
"""

from __future__ import annotations

from mailsrv.interfaces import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN
from mailsrv.store.mboxfmt.limits import HEADER_LIMIT

STATUS_FLAGS = frozenset({SEEN, ANSWERED, FLAGGED, DELETED, DRAFT})  # what the headers can say
NO_FLAGS: frozenset[str] = frozenset()


# Header fields that mbox programs keep their own bookkeeping in: mutt writes
# Status:, X-Status:, Content-Length: and Lines: when it rewrites a message,
# Dovecot X-Keywords:, X-UID:, X-IMAP(base):, and mailsrv Status:/X-Status:.
# Sessions do not see them (Dovecot hides the same ones but Lines:), so a
# message's size and bytes stay the same while its flags are written.
HIDDEN_FIELDS = frozenset(
    {
        b"status",
        b"x-status",
        b"x-keywords",
        b"x-uid",
        b"x-imap",
        b"x-imapbase",
        b"content-length",
        b"lines",
    }
)
_HIDDEN_HINTS = (b"status:", b"x-keywords", b"x-uid", b"x-imap", b"content-length", b"lines")


def may_hide(lower_block: bytes) -> bool:
    """Whether a lower-cased header block may hold a hidden field (a quick test)."""
    return any(h in lower_block for h in _HIDDEN_HINTS)


def strip_hidden(block: bytes) -> tuple[bytes, int]:
    """
    The header block C{block} (raw mbox lines) without the L{HIDDEN_FIELDS}
    (and their continuation lines), and the CRLF size of what was left out.
    """
    out = []
    removed = 0
    skipping = False
    pos = 0
    n = len(block)
    while pos < n:
        eol = block.find(b"\n", pos)
        nxt = n if eol < 0 else eol + 1
        line = block[pos:nxt]
        pos = nxt
        if skipping and line[:1] in (b" ", b"\t"):
            removed += _crlf_len(line)
            continue
        name, colon, _ = line.partition(b":")
        skipping = bool(colon) and name.rstrip().lower() in HIDDEN_FIELDS
        if skipping:
            removed += _crlf_len(line)
        else:
            out.append(line)
    return (block if not removed else b"".join(out)), removed


def _crlf_len(line: bytes) -> int:
    if line.endswith(b"\r\n"):
        return len(line)
    if line.endswith(b"\n"):
        return len(line) + 1
    return len(line)


def header_end_at(buf: bytes, pos: int, limit: int, has_cr: bool) -> int:
    """Index just after the blank line ending the header block at C{pos}, or -1."""
    if buf.startswith(b"\n", pos):
        return pos + 1
    if has_cr and buf.startswith(b"\r\n", pos):
        return pos + 2
    a = buf.find(b"\n\n", pos, limit)
    if has_cr:
        b = buf.find(b"\n\r\n", pos, a + 1 if a >= 0 else limit)
        if b >= 0:
            return b + 3
    return a + 2 if a >= 0 else -1


def header_end(data: bytes) -> int:
    """Where the header block at the start of C{data} ends (after its blank line), or -1."""
    return header_end_at(data, 0, min(len(data), HEADER_LIMIT), b"\r" in data)


def with_status(block: bytes, flags: frozenset[str]) -> bytes:
    """
    Header block C{block} (with its blank line) with Status: and X-Status:
    saying C{flags}, as mutt writes them (R: \\Seen, O: not new; X-Status:
    A \\Answered, F \\Flagged, T \\Draft, D \\Deleted).
    """
    nl = b"\r\n" if block.endswith(b"\r\n") else b"\n"
    body = block[: -len(nl)]
    out = []
    skipping = False
    pos = 0
    while pos < len(body):
        eol = body.find(b"\n", pos)
        nxt = len(body) if eol < 0 else eol + 1
        line = body[pos:nxt]
        pos = nxt
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        skipping = bool(colon) and name.rstrip().lower() in (b"status", b"x-status")
        if not skipping:
            out.append(line)
    out.append(b"Status: " + (b"R" if SEEN in flags else b"") + b"O" + nl)
    letters = b"".join(
        ch
        for ch, flag in ((b"A", ANSWERED), (b"F", FLAGGED), (b"T", DRAFT), (b"D", DELETED))
        if flag in flags
    )
    if letters:
        out.append(b"X-Status: " + letters + nl)
    return b"".join(out) + nl


# A blank X-Keywords: field of this many spaces goes into the header of every
# message we store, before its blank line, as Dovecot pads its mbox headers:
# writing flags later (Status: RO, X-Status: AFTD, 26 bytes) takes the bytes
# from the padding and gives them back, so the header keeps its length and no
# byte after it moves. Sessions do not see the field (L{HIDDEN_FIELDS}), and
# mutt and Python's mailbox read no flag or label from an empty X-Keywords:.
PADDING = 30
_PAD_NAME = b"X-Keywords:"


def with_padding(block: bytes, pad: int | None = None) -> bytes:
    """Header block C{block} (with its blank line) with a padding field of C{pad} spaces."""
    if pad is None:
        pad = PADDING
    nl = b"\r\n" if block.endswith(b"\r\n") else b"\n"
    if len(block) <= len(nl):
        return block  # no header at all: the message starts with its blank line
    return block[: -len(nl)] + _PAD_NAME + b" " * pad + nl + nl


def _without_padding(block: bytes) -> tuple[bytes, bool]:
    """
    C{block} without its padding field (an X-Keywords: of only spaces, one
    line), and whether it may take one: not if it holds an X-Keywords: with
    keywords (another program's), which a second field would confuse.
    """
    lines = block.splitlines(keepends=True)
    out = []
    ok = True
    for n, line in enumerate(lines):
        name, colon, value = line.partition(b":")
        if colon and name.rstrip().lower() == b"x-keywords":
            follows = lines[n + 1][:1] if n + 1 < len(lines) else b""
            if value.strip(b" \r\n") or follows in (b" ", b"\t"):
                ok = False
            else:
                continue
        out.append(line)
    return b"".join(out), ok


def with_status_fitted(block: bytes, flags: frozenset[str]) -> bytes:
    """
    L{with_status}, keeping the length of C{block} whenever the padding field
    allows (it gives up or takes back the bytes Status:/X-Status: need), so the
    block is overwritten in place; a block that has to grow (another
    program's message, without padding) gets L{PADDING} too, so that the
    next write fits.
    """
    bare, may_pad = _without_padding(block)
    core = with_status(bare, flags)
    if not may_pad:
        return core
    nl = b"\r\n" if core.endswith(b"\r\n") else b"\n"
    room = len(block) - len(core) - len(_PAD_NAME) - len(nl)
    if room >= 0:
        return with_padding(core, room)
    return with_padding(core)


def hide_fields(data: bytes) -> bytes:
    """A message's raw mbox bytes without the hidden fields of its header block."""
    hend = header_end_at(data, 0, min(len(data), HEADER_LIMIT), b"\r" in data)
    if hend < 0:
        return data
    block, removed = strip_hidden(data[:hend])
    return block + data[hend:] if removed else data


def status_flags(status: bytes, x_status: bytes) -> frozenset[str]:
    """System flags from mutt/Dovecot ``Status:``/``X-Status:`` header values."""
    out = set()
    if b"R" in status:
        out.add(SEEN)
    for ch, flag in ((b"A", ANSWERED), (b"F", FLAGGED), (b"D", DELETED), (b"T", DRAFT)):
        if ch in x_status:
            out.add(flag)
    return frozenset(out)
