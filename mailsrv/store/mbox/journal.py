"""
The append journal of a folder (C{<index>.journal}, disk threads), and the
append it guards: messages are appended under the folder's lock in one write
and one fsync; a crash part way is truncated away at the next lock
(L{recover}), and the journal names the messages we appended (read as mboxrd,
L{Ours}) until the index has them.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Sequence
from typing import Any

from mailsrv.atomic import make_dirs, write_atomic
from mailsrv.store import mboxfmt
from mailsrv.store.mbox import inplace
from mailsrv.store.mbox.files import store_logger, unlink_quiet
from mailsrv.store.mbox.state import FolderState

log = store_logger()


class Ours:
    """
    Which messages a scan finds are ours (we appended them: mboxrd): those
    starting in C{ranges} (appends whose place is known to be still right)
    or whose fingerprint is in C{fps}.
    """

    def __init__(self, ranges: Sequence[tuple[int, int]] = (), fps: set[int] | None = None):
        self.ranges = list(ranges)
        self.fps: set[int] = set() if fps is None else fps

    def __call__(self, off: int, fp: int) -> bool:
        return fp in self.fps or any(a <= off < b for a, b in self.ranges)


def recover(st: FolderState, fd: int) -> Ours:
    """
    With the mbox locked, before anything reads it: finish a rewrite that a
    crash interrupted, and truncate away an append that a crash left half
    written. Returns what the append journal knows of our messages that the
    index may not have yet (L{Ours}).

    The append journal (C{<folder>.journal}) has lines
        a INO PRE POST CRC LEN HEAD   an append under way: the file was PRE
                                      long, LEN bytes before it had CRC, and
                                      it starts with the bytes HEAD (hex)
        m PRE OFF OFF ...             where each message of the append
                                      under way at PRE starts (its From line)
        o FP FP ...                   fingerprints of our messages whose
                                      append completed, not indexed yet
    An C{a} line is trusted only if the bytes around PRE are still those:
    another program (mutt) may have rewritten the file since. An append cut
    short is truncated away only if no other program's message follows it: a
    crash leaves our dotlock, which Dovecot (by its pid) and everyone after
    five minutes take as stale, and a message it appended then is kept (our
    half message stays with it, logged) rather than lost.
    """
    inplace.recover_rewrite(st, fd)
    try:
        lines = st.journal.read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return Ours()
    s = os.fstat(fd)
    ours = Ours()
    starts: dict[int, set[int]] = {}
    for line in lines:
        words = line.split()
        if words[:1] == [b"m"] and len(words) > 2:
            try:
                pre, *offs = (int(w) for w in words[1:])
            except ValueError:
                continue
            starts[pre] = set(offs)
    for line in lines:
        words = line.split()
        if words[:1] == [b"o"]:
            ours.fps.update(int(w) for w in words[1:])
            continue
        try:
            if words[:1] == [b"a"] and len(words) == 7:
                ino, pre, post, crc, length = (int(w) for w in words[1:6])
                head = bytes.fromhex(words[6].decode())
            elif len(words) == 3:  # an older version's line: no check possible
                ino, pre, post = (int(w) for w in words)
                crc = length = -1
                head = b""
            else:
                continue
        except ValueError:
            continue
        if ino != s.st_ino or pre > s.st_size:
            continue
        if length >= 0:
            before = os.pread(fd, length, pre - length)
            seen = os.pread(fd, min(len(head), s.st_size - pre), pre)
            if zlib.crc32(before) != crc or not head.startswith(seen):
                continue  # the file changed under this line: not ours any more
        if s.st_size > post or pre < s.st_size < post:
            foreign = _foreign_start(fd, starts.get(pre), min(post, s.st_size))
            if foreign is not None:
                log.error(
                    "an append to {path} cut short at {pre} is followed by another"
                    " program's message at {foreign}: both kept",
                    path=str(st.path),
                    pre=pre,
                    foreign=foreign,
                )
                continue
        if s.st_size >= post:
            ours.ranges.append((pre, post))
        elif pre < s.st_size:  # cut short by a crash
            log.warn(
                "truncating partial append to {path} from {size} to {pre}",
                path=str(st.path),
                size=s.st_size,
                pre=pre,
            )
            os.ftruncate(fd, pre)
            os.fsync(fd)
    return ours


def _foreign_start(fd: int, mine: set[int] | None, end: int) -> int | None:
    """
    Where, before C{end}, a message starts that is not one of ours (C{mine}:
    the From lines of an append, its C{m} line); None if there is none, or
    if the journal does not say where ours start (an older version's).
    """
    if not mine:
        return None
    first = min(mine)
    if first >= end:
        return None
    for off in mboxfmt.scan(fd, first, end).from_offs:
        if off not in mine:
            return int(off)
    return None


def keep_ours(st: FolderState, fd: int, ours: Ours) -> None:
    """
    The index did not take our appended messages: rewrite the journal so it
    names them by fingerprint (offsets go stale when another program
    rewrites the file), for the scan that will index them.
    """
    fps = set(ours.fps)
    for a, b in ours.ranges:
        fps.update(mboxfmt.scan(fd, a, b).fps)
    write_atomic(st.journal, b"o " + b" ".join(b"%d" % fp for fp in sorted(fps)) + b"\n")


def write_journal(
    st: FolderState,
    fd: int,
    ino: int,
    pre: int,
    post: int,
    head: bytes,
    starts: Sequence[int] = (),
) -> int:
    """
    Add an append under way to the journal (L{recover}), with where its
    messages start; returns the journal's length before, to take the lines
    back with L{unwrite_journal}.
    """
    length = min(pre, 256)
    crc = zlib.crc32(os.pread(fd, length, pre - length))
    make_dirs(st.journal.parent)
    jfd = os.open(st.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        before = os.fstat(jfd).st_size
        line = b"a %d %d %d %d %d %s\n" % (ino, pre, post, crc, length, head.hex().encode())
        if starts:
            line += b"m %d " % pre + b" ".join(b"%d" % o for o in starts) + b"\n"
        mboxfmt.write_all(jfd, line)
        os.fdatasync(jfd)
    finally:
        os.close(jfd)
    return before


def unwrite_journal(st: FolderState, length: int) -> None:
    if length == 0:
        unlink_quiet(st.journal)
    else:
        os.truncate(st.journal, length)


# Quoted messages one batch keeps in memory, at most; the rest are streamed
# from their sources by append_locked (a MULTIAPPEND of 1,000 messages).
PREPARED_IN_MEMORY = 4 * 1024 * 1024


def prepare(items: list[tuple[Any, str, float]]) -> tuple[list, dict[int, BaseException]]:
    """Quote each message (before locking); a source that cannot be read fails alone."""
    prepared = []
    errors: dict[int, BaseException] = {}
    held = 0
    for i, (source, sender, when) in enumerate(items):
        try:
            pieces, qlen = mboxfmt.quoted_message(source)
        except Exception as e:
            errors[i] = e
            continue
        if pieces is not None:
            held += qlen
            if held > PREPARED_IN_MEMORY:
                pieces = None  # written from the source again, streamed
        prepared.append((mboxfmt.from_line(sender, when), pieces, source, qlen))
    return prepared, errors


def append_locked(st: FolderState, fd: int, prepared: list) -> int:
    """
    Append prepared messages in one write and one fsync; on any error truncate
    back to the old end. Returns the new size. The append stays in the journal
    (L{recover}) until the caller has indexed it and unlinks the journal.
    """
    total = sum(len(line) + qlen + 1 for line, _, _, qlen in prepared)
    s = os.fstat(fd)
    pre = s.st_size
    pad = b""
    if pre > 0:
        tail = os.pread(fd, 2, pre - 2 if pre >= 2 else 0)
        if tail == b"\n" and pre == 1:
            pad = b""
        elif not tail.endswith(b"\n"):
            pad = b"\n\n"
        elif tail != b"\n\n":
            pad = b"\n"
    total += len(pad)
    starts = []
    off = pre + len(pad)
    for line, _, _, qlen in prepared:
        starts.append(off)
        off += len(line) + qlen + 1
    jlen = write_journal(st, fd, s.st_ino, pre, pre + total, pad + prepared[0][0], starts)
    try:
        os.lseek(fd, pre, os.SEEK_SET)
        written = 0
        buf = [pad]
        buffered = len(pad)
        for line, pieces, source, _ in prepared:
            buf.append(line)
            buffered += len(line)
            if pieces is None:
                written += mboxfmt.write_all(fd, b"".join(buf))
                buf, buffered = [], 0
                written += mboxfmt.write_quoted(fd, source)
            else:
                buf.extend(pieces)
                buffered += sum(len(p) for p in pieces)
            buf.append(b"\n")
            buffered += 1
            if buffered >= 4 * 1024 * 1024:
                written += mboxfmt.write_all(fd, b"".join(buf))
                buf, buffered = [], 0
        if buf:
            written += mboxfmt.write_all(fd, b"".join(buf))
        if written != total:
            raise OSError(errno.EIO, "message changed while being stored")
        os.fsync(fd)
    except BaseException:
        try:
            os.ftruncate(fd, pre)
            os.fsync(fd)
        except OSError:
            log.failure("could not truncate {path} after a failed append", path=str(st.path))
            raise
        unwrite_journal(st, jlen)
        raise
    return pre + total  # the journal keeps the range until the index has the messages
