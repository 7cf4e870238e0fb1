"""
Rewriting an mbox file in place, crash-safe: the kept bytes move down over
the dropped ones, the file is truncated, and the inode stays the same.

Why in place: mutt, procmail and others open the mbox for appending before
they lock it, and never check afterwards that the name still leads to the
same inode. A rewrite that renamed a new file over the mbox would let their
write land in the old, unlinked inode, and the mail would be lost although
they report success. Writing into the same inode (as Dovecot's mbox does),
their O_APPEND write lands at the new end, after we let go of the lock.

The plan (L{Plan}) is a list of runs C{(src, end, dst)}: the bytes
C{[src, end)} move to C{dst}, with C{dst < src}, runs in ascending order and
their destinations too (the file keeps its order); then C{tail} is written at
C{tail_at} and the file is truncated to C{new_size}.

The journal, C{<index base>.rewrite}, says how to finish after a kill -9 at
any moment. Its first line is the plan as JSON (with the inode and the old
size, and what the index must be told); it is fsynced before a byte moves.
Then one line is added (and fdatasynced) per step done:

    p I DONE     run I has its first DONE bytes at their destination, and so
                 have all runs before it (the mbox was fdatasynced before)
    x OLD NEW    after a crash, another program appended OLD..NEW: one more
                 run moves those bytes down behind the others
    t CRC LEN    every run is done; the file is about to be truncated
    g            (moving up) the file was grown to C{new_size} (and synced),
                 before any byte moves; what another program appends later
                 lands after all we write, and stays
    f            the file is complete (tail written, truncated, fsynced)

A plan moves bytes either all down (an expunge; header blocks that shrink)
or all up (header blocks that grow); then C{runs} are done from the last
one, each from its end, and the bytes at risk are the last W - k of a
segment. A run C{(-1 - n, 0, dst)} writes C{literals[n]} (a new header
block) at C{dst}: its place holds only bytes already moved or replaced.

The C{t} line holds the crc and length of (up to 64 of) the bytes after
C{new_size} before the truncate: if they are still there after a kill, the
file was not truncated yet (and what another program appended after
C{old_size} moves down, C{x}); if not, it was, and whatever follows
C{new_size} was appended since and stays. Without C{t}, a file longer than
C{old_size} was appended to (C{x}). A line a kill cut short is cut off
before more are added (L{Journal.reopen}).

Copying in ascending order never touches a source byte of a later run
(C{dst + len} of every run is at most the next run's C{dst}, which is at most
its C{src}), nor the part of the same run after the segment being copied. But
a segment of W bytes moved down by k = src - dst, with W > k, overwrites the
first W - k of its own source bytes while it is copied: were the copy cut
short, they would be lost, and redoing the segment would copy garbage. So
those W - k bytes are first saved in C{<index base>.rewrite-save} (run,
offset, length and crc in its first line), fdatasynced, and only then is the
segment written.

The invariant: whenever the journal says C{p I DONE}, the source bytes of run
I from DONE on, and all later runs, are intact in the file, except at most
the first W - k bytes of the segment that starts at DONE, and then those are
in the save file with a matching header and crc. Recovery (L{finish}, under
the mbox lock, before anything reads the file) therefore redoes that segment
from the save file (if it matches) and the file (for the rest), and goes on;
redoing a segment that was already written writes the same bytes again. A
journal whose first line is incomplete means nothing moved yet: it is deleted.
A journal for another inode (the file was replaced since) is deleted too.

Only after C{f} does the index learn the new offsets (one sqlite
transaction); the journal goes last, so a crash between the two redoes the
index update, which is idempotent.

Many small runs (a flag write that grows every header block of a file another
program wrote) are done in batches of whole steps (L{batch_end}): the whole
span a batch writes is saved as it was (the save file's first line, C{b STEP
LAST LO LEN CRC NEWCRC}, has the batch's extent and the crc of what it writes
there), then the batch is written, synced, and one C{p} line records its last
step. So a rewrite costs about one pass over the bytes after its first change
and a few syncs per L{SEGMENT}, not per run. A batch cut short is redone as it
was begun, whatever runs were added since, and only if the file is still what
the batch left (L{still_valid}): each byte of the span is its saved or its new
value, and the bytes the redo would write have the saved crc. A save file of
the older format (C{STEP 0 LEN CRC LAST}, source bytes only) for the batch
being resumed cannot show that: recovery refuses it (an error naming the
file) and the folder does not open; nothing is written.

Readers of the folder (L{Relocation}) do not block a rewrite; see there.

(Longer than most modules: the kill tests replace this module's C{os} to stop
a rewrite at every write and sync, so every step of the engine lives here.)
"""

from __future__ import annotations

import json
import os
import zlib
from bisect import bisect_right
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from mailsrv.atomic import make_dirs
from mailsrv.store.mboxfmt import read_range

SEGMENT = 8 * 1024 * 1024  # bytes moved between two progress records
CHECK = 64  # bytes at the start of each run whose crc the plan keeps
JOURNAL_SUFFIX = ".rewrite"  # after the folder's index base


@dataclass
class Plan:
    """What an in-place rewrite does to the file, and then to the index."""

    ino: int
    old_size: int
    new_size: int
    runs: list[tuple[int, int, int]]  # (src, end, dst)
    tail_at: int = -1
    tail: bytes = b""
    removed: list[int] = field(default_factory=list)  # UIDs gone from the index
    moved: list[tuple[int, int, int, int]] = field(default_factory=list)  # (from, start, stop, uid)
    indexed_size: int = -1  # how much of the new file the index describes (-1: new_size)
    up: bool = False  # the bytes move up (the file grows): runs are done from the last one
    literals: list[bytes] = field(default_factory=list)  # runs (-1 - n, 0, dst) write literals[n]
    dflags: list[tuple[str, int]] = field(default_factory=list)  # (flags text, uid) written
    # per run, the crc of its first (up to CHECK) bytes, to tell that the file is still
    # the one the plan is about (another program may rewrite it in place after a kill)
    checks: list[int] = field(default_factory=list)
    # from the journal's t line: the crc and length of the bytes after new_size then
    t_check: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.indexed_size < 0:
            self.indexed_size = self.new_size

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "ino": self.ino,
                "old_size": self.old_size,
                "new_size": self.new_size,
                "runs": self.runs,
                "tail_at": self.tail_at,
                "tail": self.tail.hex(),
                "removed": self.removed,
                "moved": self.moved,
                "indexed_size": self.indexed_size,
                "up": self.up,
                "literals": [b.hex() for b in self.literals],
                "dflags": self.dflags,
                "checks": self.checks,
            },
            separators=(",", ":"),
        ).encode("ascii")

    @classmethod
    def from_json(cls, text: bytes) -> Plan:
        d = json.loads(text)
        return cls(
            int(d["ino"]),
            int(d["old_size"]),
            int(d["new_size"]),
            [(int(a), int(b), int(c)) for a, b, c in d["runs"]],
            int(d["tail_at"]),
            bytes.fromhex(d["tail"]),
            [int(u) for u in d["removed"]],
            [(int(a), int(b), int(c), int(u)) for a, b, c, u in d["moved"]],
            int(d["indexed_size"]),
            bool(d.get("up", False)),
            [bytes.fromhex(h) for h in d.get("literals", [])],
            [(str(t), int(u)) for t, u in d.get("dflags", [])],
            [int(c) for c in d.get("checks", [])],
        )

    def extend(self, old_size: int, size: int) -> None:
        """Bytes another program appended after a crash move down behind the others."""
        if size <= old_size:
            return
        dst = self.new_size
        self.runs.append((old_size, size, dst))
        if self.checks:
            self.checks.append(-1)  # not checked: appended after the plan
        self.new_size = dst + size - old_size
        self.old_size = size


class Journal:
    """The C{.rewrite} journal and its C{-save} file for one folder."""

    def __init__(self, base: Path) -> None:
        self.path = Path(str(base) + JOURNAL_SUFFIX)
        self.save_path = Path(str(base) + ".rewrite-save")
        self._fd = -1

    def begin(self, plan: Plan) -> None:
        """Write the plan and make it durable (before any byte moves)."""
        make_dirs(self.path.parent)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        _write_all(self._fd, plan.to_json() + b"\n")
        os.fdatasync(self._fd)
        # the save file's name too is made durable now, with the journal's
        os.close(os.open(self.save_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        _fsync_dir(self.path.parent)

    def reopen(self) -> None:
        """Open to add lines, after cutting a line a kill left half written."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        size = os.fstat(self._fd).st_size
        tail = os.pread(self._fd, min(size, 4096), max(0, size - 4096))
        cut = size - (len(tail) - tail.rfind(b"\n") - 1)
        if cut != size:
            os.ftruncate(self._fd, cut)
            os.fsync(self._fd)

    def mark(self, line: bytes) -> None:
        _write_all(self._fd, line)
        os.fdatasync(self._fd)

    def save(self, run: int, done: int, data: bytes) -> None:
        """Save the bytes at risk of the segment at (C{run}, C{done})."""
        self._save(b"%d %d %d %d\n" % (run, done, len(data), zlib.crc32(data)), data)

    def save_batch(self, step: int, last: int, lo: int, old: bytes, new_crc: int) -> None:
        """
        Save the bytes C{old} of C{[lo, lo + len(old))}, the whole span the batch
        of steps C{step} to C{last} - 1 writes (L{batch_end}), as they were before
        it, with the crc of what the batch writes there (L{still_valid}).
        """
        head = b"b %d %d %d %d %d %d\n" % (step, last, lo, len(old), zlib.crc32(old), new_crc)
        self._save(head, old)

    def _save(self, head: bytes, data: bytes) -> None:
        fd = os.open(self.save_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, head + data)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def saved(self, run: int, done: int, length: int) -> bytes | None:
        """The bytes saved for the segment at (C{run}, C{done}), if complete."""
        try:
            with open(self.save_path, "rb") as f:
                head = f.readline()
                data = f.read(length + 1)
        except FileNotFoundError:
            return None
        try:
            r, d, n, crc = (int(x) for x in head.split()[:4])
        except ValueError:
            return None
        if (r, d, n) != (run, done, length) or len(data) != length or zlib.crc32(data) != crc:
            return None
        return data

    def batch_saved(self, step: int) -> int:
        """
        The step after the batch that begins at C{step}, if its save file was
        begun (then part of it may have been written, if the save is complete:
        L{batch}); C{step + 1} if the first segment of step C{step} alone was
        saved; -1 if neither.
        """
        words = self._head()
        try:
            if len(words) == 7 and words[0] == b"b":
                return int(words[2]) if int(words[1]) == step else -1
            if len(words) == 5 and words[1] == b"0" and int(words[0]) == step:
                # a batch saved by the version before the whole span was saved: its
                # saved bytes cannot show whether the file was rewritten since
                raise OSError(
                    f"rewrite save file {self.save_path} is of an older version (a batch "
                    "cut short): finish the rewrite with that version, or restore the "
                    "mbox from a backup and remove the rewrite journal"
                )
            if len(words) == 4 and words[1] == b"0":
                return step + 1 if int(words[0]) == step else -1
        except ValueError:
            pass
        return -1

    def batch(self, step: int, lo: int, length: int) -> tuple[bytes, int] | None:
        """
        The bytes saved for the batch that begins at C{step} (of the span at
        C{lo}, C{length} long), and the crc of what it writes there, if complete.
        """
        words = self._head()
        try:
            with open(self.save_path, "rb") as f:
                f.readline()
                data = f.read(length + 1)
            if len(words) != 7 or words[0] != b"b":
                return None
            s, _, a, n, crc, new_crc = (int(x) for x in words[1:])
        except (FileNotFoundError, ValueError):
            return None
        if (s, a, n) != (step, lo, length) or len(data) != n or zlib.crc32(data) != crc:
            return None
        return data, new_crc

    def _head(self) -> list[bytes]:
        try:
            with open(self.save_path, "rb") as f:
                return f.readline().split()
        except FileNotFoundError:
            return []

    def read(self) -> tuple[Plan, tuple[int, int], str] | None:
        """
        (plan, progress, stage) from the journal, or None if there is none usable;
        the stage is "" (moving), "g" (grown, moving up), "t" (truncating) or
        "f" (file done).
        """
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        lines = text.split(b"\n")
        if len(lines) < 2:
            return None  # the plan itself is incomplete: nothing moved
        try:
            plan = Plan.from_json(lines[0])
        except (ValueError, KeyError, TypeError):
            return None
        progress = (0, 0)
        stage = ""
        for ln in lines[1:-1]:  # the last piece has no newline: incomplete
            words = ln.split()
            try:
                if words[:1] == [b"p"] and len(words) == 3:
                    progress = (int(words[1]), int(words[2]))
                elif words[:1] == [b"x"] and len(words) == 3:
                    plan.extend(int(words[1]), int(words[2]))
                    if stage == "t":
                        # written after the t line found the file not truncated: the
                        # run it adds moves first, and a new t line (about the new
                        # new_size) comes before the truncate
                        stage = ""
                        plan.t_check = None
                elif words[:1] == [b"t"] and len(words) == 3:
                    stage = "t"
                    plan.t_check = (int(words[1]), int(words[2]))
                elif words in ([b"g"], [b"t"], [b"f"]):
                    stage = words[0].decode()
                else:
                    raise ValueError(ln)
            except ValueError:
                # lines are only ever added whole (L{reopen}): this is damage, and going
                # on from an older line could copy bytes that were overwritten since
                raise OSError(f"rewrite journal {self.path} is damaged: {ln!r}")
        return plan, progress, stage

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        for p in (self.path, self.save_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def move(
    fd: int,
    plan: Plan,
    journal: Journal,
    progress: tuple[int, int] = (0, 0),
    guard: Callable[[], AbstractContextManager] = nullcontext,
    advanced: Callable[[int], None] = lambda src: None,
    truncate: bool = True,
    grown: bool = False,
) -> None:
    """
    Carry out C{plan} on the mbox C{fd} from C{progress} (step, bytes done) on,
    recording each step in the (begun) journal, up to and including the C{f}
    line. Each segment (or batch of small steps, L{batch_end}) is written
    inside C{guard()}, which then gets C{advanced(src)}: the source offset
    below which (moving down), or from which on (moving up), every kept byte
    is at its destination.
    """
    order = _order(plan)
    step, done = _resume(plan, order, progress)
    if plan.up and not grown:
        # the file grows to its new size before a byte moves (zeros at the end for now):
        # another program's append can then only land after everything we write. The
        # growth is durable before the g line says so: a file not grown after a kill
        # is one whose bytes after old_size were appended (L{finish})
        if os.fstat(fd).st_size < plan.new_size:
            os.ftruncate(fd, plan.new_size)
            os.fsync(fd)
        journal.mark(b"g\n")
    while step < len(order):
        last = -1
        if done == 0:
            # a batch cut short is redone as it was begun (another program's append,
            # a run more, must not change which steps it holds)
            last = journal.batch_saved(step)
            if last < 0:
                last = batch_end(plan, order, step)
            last = min(last, len(order))
        if last > step + 1:
            _move_batch(fd, plan, journal, order, step, last, guard, advanced)
            step = last
        else:
            _move_step(fd, plan, journal, step, order[step], done, guard, advanced)
            step += 1
        done = 0
    if plan.tail:
        _pwrite_all(fd, plan.tail, plan.tail_at)
    if truncate and not plan.up:
        # what the bytes after the new end are now, to tell after a kill whether
        # the truncate happened (another program may have appended since)
        n = max(0, min(64, os.fstat(fd).st_size - plan.new_size))
        crc = zlib.crc32(os.pread(fd, n, plan.new_size))
        journal.mark(b"t %d %d\n" % (crc, n))
        os.ftruncate(fd, plan.new_size)
    os.fsync(fd)
    journal.mark(b"f\n")


def _order(plan: Plan) -> list[int]:
    """The runs in the order they are done: ascending, or from the last one moving up."""
    order = list(range(len(plan.runs)))
    if plan.up:
        order.reverse()
    return order


def _work(plan: Plan, i: int) -> int:
    """How many bytes run C{i} writes (none if it stays where it is)."""
    src, end, dst = plan.runs[i]
    if src < 0:
        return len(plan.literals[-1 - src])
    return 0 if src == dst else end - src


def _resume(plan: Plan, order: list[int], progress: tuple[int, int]) -> tuple[int, int]:
    """The step to go on with after C{progress}: the next one if that one is done."""
    step, done = progress
    if step < len(order) and done > 0:
        src, end, _ = plan.runs[order[step]]
        if done >= (1 if src < 0 else end - src):
            return step + 1, 0
    return step, done


def batch_end(plan: Plan, order: list[int], step: int) -> int:
    """
    The step after the batch that begins at C{step}: whole steps that write
    at most L{SEGMENT} bytes together are done as one (one save, one write,
    one sync, one progress line), so that a rewrite of many small runs (a
    flag write that grows every header block) costs syncs per segment of
    the file, not per message. A batch of one step is done segment by segment.
    """
    total = 0
    j = step
    while j < len(order):
        total += _work(plan, order[j])
        if total > SEGMENT:
            break
        j += 1
    return j


def _move_step(
    fd: int,
    plan: Plan,
    journal: Journal,
    step: int,
    i: int,
    done: int,
    guard: Callable[[], AbstractContextManager],
    advanced: Callable[[int], None],
) -> None:
    """Carry out run C{i} (step C{step}) from C{done} on, segment by segment."""
    src, end, dst = plan.runs[i]
    if src < 0:  # new bytes (a header block): written whole, idempotent
        if not done:
            with guard():
                _pwrite_all(fd, plan.literals[-1 - src], dst)
            os.fdatasync(fd)
            journal.mark(b"p %d 1\n" % step)
        return
    if src == dst:
        return
    n = end - src
    k = abs(dst - src)
    while done < n:
        w = min(SEGMENT, n - done)
        # moving down, segments go up from the start of the run, and the first
        # w - k source bytes of a segment are overwritten while it is copied;
        # moving up, they go down from its end, and it is the last w - k
        lo = src + done if not plan.up else end - done - w
        risk = w - k
        if risk > 0:
            keep_at = 0 if not plan.up else w - risk
            saved = journal.saved(step, done, risk)
            if saved is None:
                data = read_range(fd, lo, lo + w)
                journal.save(step, done, data[keep_at : keep_at + risk])
            elif not plan.up:  # a segment cut short: those bytes are only saved
                data = saved + read_range(fd, lo + risk, lo + w)
            else:
                data = read_range(fd, lo, lo + w - risk) + saved
        else:
            data = read_range(fd, lo, lo + w)
        with guard():
            _pwrite_all(fd, data, lo + (dst - src))
            advanced(lo + w if not plan.up else lo)
        os.fdatasync(fd)
        done += w
        journal.mark(b"p %d %d\n" % (step, done))


def _move_batch(
    fd: int,
    plan: Plan,
    journal: Journal,
    order: list[int],
    step: int,
    last: int,
    guard: Callable[[], AbstractContextManager],
    advanced: Callable[[int], None],
) -> None:
    """
    Carry out steps C{step} to C{last} - 1 as one: the whole span the batch
    writes is saved first, as it was, with the batch's extent and the crc of
    what the batch writes there; then all is written, synced, and one
    progress line says the last step is done. Redoing a batch cut short
    takes the bytes within the span from the save file and the others (which
    no write of the batch touches, nor any later step's) from the file.
    """
    runs, lo, hi = _batch_extent(plan, order, step, last)
    found = journal.batch(step, lo, hi - lo)
    if found is None:
        old = read_range(fd, lo, hi)
        pieces = _batch_pieces(plan, runs, _reader(fd, lo, old))
        if hi > lo:  # nothing written: any batch redone from here reads intact sources
            journal.save_batch(step, last, lo, old, zlib.crc32(_overlay(old, lo, pieces)))
    else:  # a batch cut short: the bytes within its span are only saved
        pieces = _batch_pieces(plan, runs, _reader(fd, lo, found[0]))
    with guard():
        at, buf = -1, bytearray()
        for dst, d in pieces:  # adjacent pieces go out in one write
            if buf and dst != at + len(buf):
                _pwrite_all(fd, buf, at)
                buf = bytearray()
            if not buf:
                at = dst
            buf += d
        if buf:
            _pwrite_all(fd, buf, at)
        copies = [r for r in runs if r[0] >= 0 and r[0] != r[2] and r[1] > r[0]]
        if copies:
            advanced(min(c[0] for c in copies) if plan.up else max(c[1] for c in copies))
    os.fdatasync(fd)
    src, end, _ = runs[-1]
    journal.mark(b"p %d %d\n" % (last - 1, 1 if src < 0 else end - src))


def _batch_extent(
    plan: Plan, order: list[int], step: int, last: int
) -> tuple[list[tuple[int, int, int]], int, int]:
    """The runs of the batch of steps C{step} to C{last} - 1, and the span it writes."""
    runs = [plan.runs[order[t]] for t in range(step, last)]
    spans = [(dst, dst + _work(plan, order[t])) for t, (_, _, dst) in enumerate(runs, step)]
    spans = [(a, b) for a, b in spans if b > a]
    lo = min((a for a, _ in spans), default=0)
    hi = max((b for _, b in spans), default=0)
    return runs, lo, hi


def _reader(fd: int, lo: int, old: bytes) -> Callable[[int, int], bytes]:
    """
    Reads C{[a, b)} of the file as a batch found it: within the span at C{lo}
    from C{old} (its saved bytes), elsewhere from the file.
    """
    hi = lo + len(old)

    def read(a: int, b: int) -> bytes:
        parts = []
        if a < lo:
            parts.append(read_range(fd, a, min(b, lo)))
        if b > lo and a < hi:
            parts.append(old[max(a, lo) - lo : min(b, hi) - lo])
        if b > hi:
            parts.append(read_range(fd, max(a, hi), b))
        return b"".join(parts)

    return read


def _batch_pieces(
    plan: Plan, runs: list[tuple[int, int, int]], old: Callable[[int, int], bytes]
) -> list[tuple[int, bytes]]:
    """What a batch writes: (destination, bytes), in ascending order."""
    return sorted(
        [(dst, old(src, end)) for src, end, dst in runs if src >= 0 and src != dst and end > src]
        + [(dst, plan.literals[-1 - src]) for src, _, dst in runs if src < 0]
    )


def _overlay(old: bytes, lo: int, pieces: list[tuple[int, bytes]]) -> bytearray:
    """The span at C{lo} (C{old} before) as the batch of C{pieces} leaves it."""
    new = bytearray(old)
    for dst, d in pieces:
        new[dst - lo : dst - lo + len(d)] = d
    return new


def run_checks(fd: int, plan: Plan) -> list[int]:
    """The crc of the first bytes of each run (of each new block), before anything moves."""
    out = []
    for src, end, _ in plan.runs:
        if src < 0:
            out.append(zlib.crc32(plan.literals[-1 - src][:CHECK]))
        else:
            out.append(zlib.crc32(os.pread(fd, min(CHECK, end - src), src)))
    return out


def still_valid(
    fd: int, plan: Plan, progress: tuple[int, int], stage: str, journal: Journal | None = None
) -> bool:
    """
    Whether the file is still the one C{plan} is about, as far as C{progress}:
    every run done has its first bytes at its destination, every run not begun
    at its source. A program that rewrote the file in place after a kill (mutt,
    once the dead process's dotlock was stale) makes this false: then the
    journal must be dropped and the file rescanned, not "finished".
    """
    if not plan.checks:
        return True
    order = _order(plan)
    current = len(order) if stage == "f" or stage == "t" else progress[0]
    # steps maybe half moved: the step after a completed one may have begun before its
    # first progress line, and so may every step of a batch whose bytes were saved
    half = current + 1
    if journal is not None and current < len(order):
        first = _resume(plan, order, progress)[0]
        last = min(journal.batch_saved(first), len(order))
        if last > first + 1:
            intact = _batch_intact(fd, plan, order, first, last, journal)
            if intact is False:
                return False
            if intact:
                half = max(half, last - 1)
    for step, i in enumerate(order):
        src, end, dst = plan.runs[i]
        check = plan.checks[i] if i < len(plan.checks) else -1
        if check < 0 or current <= step <= half:
            continue  # appended after the plan, or maybe half moved
        n = len(plan.literals[-1 - src][:CHECK]) if src < 0 else min(CHECK, end - src)
        if src < 0 and step > current:
            continue  # a new block not written yet: nothing to see
        at = dst if step < current or src < 0 else src
        if zlib.crc32(os.pread(fd, n, at)) != check:
            return False
    return True


def _batch_intact(
    fd: int, plan: Plan, order: list[int], step: int, last: int, journal: Journal
) -> bool | None:
    """
    Whether the batch of steps C{step} to C{last} - 1, saved and maybe cut
    short, may be redone over the file: each byte of its span is either the one
    it had (saved) or the one the batch writes, what a redo would write is what
    was to be written (the crc in the save file: the bytes it reads outside the
    span are unchanged), and each step's first bytes are what the plan found.
    None if its save was cut short (then nothing of the batch was written).
    """
    runs, lo, hi = _batch_extent(plan, order, step, last)
    found = journal.batch(step, lo, hi - lo)
    if found is None:
        return None
    old, new_crc = found
    read = _reader(fd, lo, old)
    try:
        new = _overlay(old, lo, _batch_pieces(plan, runs, read))
    except OSError:  # the file is shorter than what the batch reads
        return False
    if zlib.crc32(new) != new_crc:
        return False
    for t in range(step, last):
        i = order[t]
        src, end, _ = plan.runs[i]
        check = plan.checks[i] if i < len(plan.checks) else -1
        if src >= 0 and check >= 0 and zlib.crc32(read(src, min(end, src + CHECK))) != check:
            return False
    now = os.pread(fd, hi - lo, lo)
    if len(now) != hi - lo:
        return False
    block = 4096
    for a in range(0, hi - lo, block):
        b = a + block
        part = now[a:b]
        if part == new[a:b] or part == old[a:b]:
            continue
        for j in range(a, min(b, hi - lo)):  # a write cut short within the block
            if now[j] != new[j] and now[j] != old[j]:
                return False
    return True


def finish(fd: int, plan: Plan, journal: Journal, progress: tuple[int, int], stage: str) -> None:
    """
    Finish an interrupted rewrite (the mbox locked, the journal reopened): take
    in what another program appended since, then go on from C{progress}.
    """
    if stage == "f":
        return
    size = os.fstat(fd).st_size
    truncate = True
    grown = stage == "g"
    if grown:
        if size < plan.new_size:  # a journal whose g line came before the growth
            os.ftruncate(fd, plan.new_size)
    elif stage == "t":
        crc, n = plan.t_check or (0, 0)
        if n == 0 or zlib.crc32(os.pread(fd, n, plan.new_size)) != crc:
            truncate = False  # truncated already: what follows the new end was appended since
        elif size > plan.old_size:  # not truncated, and another program appended meanwhile
            journal.mark(b"x %d %d\n" % (plan.old_size, size))
            plan.extend(plan.old_size, size)
    elif size > plan.old_size and not (plan.up and _grown(fd, plan, size)):
        journal.mark(b"x %d %d\n" % (plan.old_size, size))
        plan.extend(plan.old_size, size)
    move(fd, plan, journal, progress, truncate=truncate, grown=grown)


def _grown(fd: int, plan: Plan, size: int) -> bool:
    """
    Whether the file was grown (moving up) before a kill cut short the g line:
    zeros from C{old_size} to C{new_size}, where an append would have put its
    From line.
    """
    if size < plan.new_size:
        return False
    at = plan.old_size
    while at < plan.new_size:
        chunk = os.pread(fd, min(SEGMENT, plan.new_size - at), at)
        if not chunk or chunk.count(0) != len(chunk):
            return False
        at += len(chunk)
    return True


class Relocation:
    """
    Where the bytes of a file layout went when an in-place rewrite moved them:
    attached to the read handle of the old layout when the rewrite starts, so
    that every reader that still uses the old offsets (a session's stale
    snapshot, a message being streamed by POP3 RETR or IMAP FETCH) reads the
    right bytes at every moment: below C{frontier} a kept byte is read at its
    new place (through C{next}, the new layout's handle), from C{frontier} on
    at its old place, which the rewrite has not touched yet. The rewrite moves
    the frontier together with each segment it writes, under the handle's lock,
    which readers hold for each read: a reader waits for at most one segment.
    Bytes of dropped messages are gone (L{MessageGone}) from the start; a
    reader that was streaming one had its remaining bytes copied aside first.
    """

    def __init__(
        self, runs: list[tuple[int, int, int]], first: int, next_handle, up: bool = False
    ) -> None:
        runs = [r for r in runs if r[0] >= 0]  # new header blocks replace what was there
        self.srcs = [r[0] for r in runs]
        self.ends = [r[1] for r in runs]
        self.dsts = [r[2] for r in runs]
        self.first = first  # bytes below this offset stay where they are
        self.up = up  # moving up, the frontier comes down from the end
        self.frontier = self.ends[-1] if up and runs else first
        self.next = next_handle
        self.broken = False  # the rewrite failed: nothing after C{first} can be trusted

    def complete(self) -> None:
        """Every kept byte is at its new place."""
        self.frontier = -1 if self.up else (self.ends[-1] if self.ends else self.first)

    def moved(self, off: int) -> bool:
        """Whether the kept byte at C{off} is at its new place already."""
        return off >= self.frontier if self.up else off < self.frontier

    def run_at(self, off: int) -> int:
        """Index of the run holding offset C{off}; -1 if it was dropped."""
        i = bisect_right(self.srcs, off) - 1
        if i < 0 or off >= self.ends[i]:
            return -1
        return i

    def keeps(self, a: int, b: int) -> bool:
        """Whether the bytes C{[a, b)} are all kept (unchanged or moved)."""
        if b <= self.first:
            return True
        if a < self.first:
            a = self.first
        while a < b:
            i = self.run_at(a)
            if i < 0:
                return False
            a = self.ends[i]
        return True


class MessageGone(KeyError):
    """The bytes asked for belonged to a message that an expunge removed."""


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], off + done)


# This module does its own os-level writes and fsyncs (not mailsrv.atomic's), so that the kill
# tests, which replace this module's os, can stop it at every step.
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.write(fd, view[done:])


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
