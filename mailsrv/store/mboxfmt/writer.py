"""
Writing a message into an mbox file: in mbox form (mboxrd-quoted, LF line
ends, without the sender's bookkeeping fields, with header padding), small
messages whole and large ones streamed.
"""

from __future__ import annotations

import os

from mailsrv.store.mboxfmt.fields import header_end, strip_hidden, with_padding
from mailsrv.store.mboxfmt.limits import HEADER_LIMIT, READ_CHUNK, SMALL_MESSAGE
from mailsrv.store.mboxfmt.quoting import quote_lines


def iter_lines_chunks(f, size: int = READ_CHUNK):
    """Yield pieces of binary file C{f}, each ending at a line end (the last may not)."""
    carry = b""
    while True:
        data = f.read(size)
        if not data:
            if carry:
                yield carry
            return
        data = carry + data if carry else data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        carry = data[cut:]
        yield data[:cut]


def mbox_pieces(f):
    """
    Yield binary file C{f} in mbox form (L{quote_lines}), in pieces of whole
    lines, without the L{HIDDEN_FIELDS} of its header block: a message we
    store carries no bookkeeping of its sender's, so neither we nor mutt take
    flags from it (Dovecot's mbox save drops them too). The header block ends
    where the scanner says (L{header_end}); if it does not end within
    L{HEADER_LIMIT}, the whole lines in that reach are taken as header.
    """
    chunks = (quote_lines(piece) for piece in iter_lines_chunks(f))
    head = b""
    exhausted = True
    hend = -1
    for q in chunks:
        head += q
        hend = header_end(head)
        if hend >= 0 or len(head) >= HEADER_LIMIT:
            exhausted = False
            break
    if hend >= 0:
        cut = hend
    elif exhausted and len(head) <= HEADER_LIMIT:
        cut = len(head)
    else:
        cut = head.rfind(b"\n", 0, HEADER_LIMIT) + 1
    if head:
        block = strip_hidden(head[:cut])[0]
        if hend >= 0:
            block = with_padding(block)
        yield block + head[cut:]
    yield from chunks


def quoted_message(source) -> tuple[list[bytes] | None, int]:
    """
    Return (pieces, length) of an L{IMessageSource} in mbox form (L{mbox_pieces}),
    ending with a newline. Small messages are returned whole; for large ones
    C{pieces} is None and L{write_quoted} streams them (the length is counted
    in a first pass).
    """
    total = 0
    pieces: list[bytes] | None = [] if source.size <= SMALL_MESSAGE else None
    last = b"\n"
    with source.open() as f:
        for q in mbox_pieces(f):
            total += len(q)
            last = q[-1:] or last
            if pieces is not None:
                pieces.append(q)
    if total and last != b"\n":
        total += 1
        if pieces is not None:
            pieces.append(b"\n")
    return pieces, total


def write_quoted(fd: int, source) -> int:
    """Stream a large source into C{fd} in mbox form; return the bytes written."""
    total = 0
    last = b"\n"
    buf: list[bytes] = []
    buffered = 0
    with source.open() as f:
        for q in mbox_pieces(f):
            last = q[-1:] or last
            buf.append(q)
            buffered += len(q)
            if buffered >= 1024 * 1024:
                total += write_all(fd, b"".join(buf))
                buf, buffered = [], 0
    if total + buffered and last != b"\n":
        buf.append(b"\n")
    if buf:
        total += write_all(fd, b"".join(buf))
    return total


def write_all(fd: int, data: bytes) -> int:
    """os.write until everything is written."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.write(fd, view[done:])
    return done
