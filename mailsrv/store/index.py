"""
The per-folder index: an sqlite3 database (WAL) beside, not inside, the mail
directory. It holds UIDVALIDITY, UIDNEXT, which state of the mbox file it
describes (size, mtime_ns, inode), and per message its UID, offsets, CRLF
size, flags, internal date and a fingerprint to recognise it after another
program rewrote the file, the flags its Status:/X-Status: headers said when
it was last read (to notice when another program changes them), and whether
it was written mboxrd-quoted (by us:
read with one '>' less on ^>+From lines) or by another program (mboxo: read as
it is). Its meta row C{recent_uid} is the first UID no IMAP session has been
given as \\Recent yet (RFC 3501 2.3.2; Dovecot's first_recent_uid): messages
another program appends get UIDs from UIDNEXT on, so they are recent too.

Mod-sequences (RFC 7162 3.1): meta C{highest_modseq} is the folder's counter
(HIGHESTMODSEQ); every change takes the next value: the rows a transaction
adds or whose flags it changes get it in their C{modseq} column (indexed, so
"changed since" costs what changed), and the UIDs an expunge removes are kept
with it in table C{vanished} (C{seq} orders them; at most C{vanished_limit},
the oldest dropped first), so that "expunged since" can be answered; meta
C{vanished_floor} is the lowest modseq from which that answer is complete.
An index from before modseqs gets modseq 1 everywhere, HIGHESTMODSEQ 1.
Blocking; used from the disk threads only, one thread at a time per folder.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote, unquote

from mailsrv.atomic import make_dirs
from mailsrv.logsafe import SafeLogger

SCHEMA_VERSION = 1
SUFFIXES = (".sqlite", ".sqlite-wal", ".sqlite-shm", ".journal", ".rewrite", ".rewrite-save")

Row = tuple  # (uid, from_off, start, end, size, flags, idate, crc, fp, rd, dflags, modseq)
VANISHED_LIMIT = 100_000  # expunged UIDs kept per folder for "expunged since" (QRESYNC)


def index_base(index_dir: Path, domain: str, local: str, name: str) -> Path:
    """C{<index_dir>/<domain>/<local>/<quoted name>} (add a suffix from L{SUFFIXES})."""
    return index_dir / domain / local / quote(name, safe="")


def name_of(filename: str) -> str | None:
    """The folder name an index file belongs to, or None."""
    for suffix in SUFFIXES:
        if filename.endswith(suffix):
            return unquote(filename[: -len(suffix)])
    return None


def remove_index(base: Path) -> None:
    """Delete a folder's index files."""
    for suffix in SUFFIXES:
        try:
            os.unlink(str(base) + suffix)
        except FileNotFoundError:
            pass


def _corrupt(error: sqlite3.DatabaseError) -> bool:
    """Whether C{error} says the index file is damaged or not an index (then rebuilt)."""
    name = getattr(error, "sqlite_errorname", "")
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or name.startswith("SQLITE_CORRUPT_"):
        return True
    return not isinstance(error, sqlite3.OperationalError) and not name


def flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(flags))


class FolderIndex:
    """One folder's index database."""

    log = SafeLogger()

    def __init__(
        self,
        base: Path,
        new_validity: Callable[[], int],
        vanished_limit: int = VANISHED_LIMIT,
    ) -> None:
        self.vanished_limit = vanished_limit
        self.path = Path(str(base) + ".sqlite")
        make_dirs(self.path.parent)
        self.fresh = False
        try:
            self._open(new_validity)
        except sqlite3.DatabaseError as e:
            if not _corrupt(e):
                # A full disk, an I/O error, a lock: the index may be sound.
                # Never thrown away for that (its UIDs are what clients know).
                try:
                    self._db.close()
                except Exception:
                    pass
                raise
            self.log.warn(
                "index {path} unusable ({error}); rebuilding", path=str(self.path), error=str(e)
            )
            try:
                self._db.close()
            except Exception:
                pass
            remove_index(base)
            self._open(new_validity)

    def _open(self, new_validity: Callable[[], int]) -> None:
        # sqlite gives its -wal and -shm files the database's mode: 0600 from the start.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed UID assignment survives power loss
        db.execute("PRAGMA cache_size=-512")  # KiB; reads and appends are sequential (default 2 MB)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS msgs (uid INTEGER PRIMARY KEY, from_off INTEGER,"
                " start INTEGER, stop INTEGER, size INTEGER, flags TEXT, idate REAL,"
                " crc INTEGER, fp INTEGER, rd INTEGER NOT NULL DEFAULT 1, dflags TEXT,"
                " modseq INTEGER NOT NULL DEFAULT 1)"
            )
            cols = [r[1] for r in db.execute("PRAGMA table_info(msgs)")]
            if "rd" not in cols:  # an index from before the column: its rows were read as mboxrd
                db.execute("ALTER TABLE msgs ADD COLUMN rd INTEGER NOT NULL DEFAULT 1")
            if "dflags" not in cols:  # NULL: what the file says is not known
                db.execute("ALTER TABLE msgs ADD COLUMN dflags TEXT")
            if "modseq" not in cols:  # an index from before modseqs: all were 1
                db.execute("ALTER TABLE msgs ADD COLUMN modseq INTEGER NOT NULL DEFAULT 1")
            db.execute("CREATE INDEX IF NOT EXISTS msgs_modseq ON msgs (modseq)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS vanished"
                " (seq INTEGER PRIMARY KEY, uid INTEGER, modseq INTEGER)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS vanished_modseq ON vanished (modseq)")
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if not meta:
                self.fresh = True
                meta = {
                    "version": SCHEMA_VERSION,
                    "uid_validity": new_validity(),
                    "uid_next": 1,
                    "size": -1,
                    "mtime_ns": -1,
                    "ino": -1,
                    "recent_uid": 1,
                    "highest_modseq": 1,
                    "vanished_floor": 1,
                }
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            elif int(meta.get("version", 0)) != SCHEMA_VERSION:
                raise sqlite3.DatabaseError("unknown index version")
            elif "recent_uid" not in meta:
                # An index from before \Recent was kept: what it holds was seen already.
                db.execute("INSERT INTO meta VALUES ('recent_uid', ?)", (meta["uid_next"],))
            for key in ("highest_modseq", "vanished_floor"):
                if key not in meta:  # an index from before modseqs: everything is at 1
                    db.execute("INSERT INTO meta VALUES (?, 1)", (key,))
                    meta[key] = 1
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # sqlite ends it itself on some errors (a full disk)
                db.execute("ROLLBACK")
            raise
        self.uid_validity = int(meta["uid_validity"])
        self.uid_next = int(meta["uid_next"])
        self.highest_modseq = int(meta["highest_modseq"])
        size, mtime, ino = int(meta["size"]), int(meta["mtime_ns"]), int(meta["ino"])
        self.covered: tuple[int, int, int] | None = None if size < 0 else (size, mtime, ino)

    def rows(self):
        """All messages, in UID (= file) order (an iterator)."""
        return self._db.execute(
            "SELECT uid, from_off, start, stop, size, flags, idate, crc, fp, rd, dflags, modseq"
            " FROM msgs ORDER BY uid"
        )

    def _set_meta(self, uid_next: int, covered: tuple[int, int, int]) -> None:
        self._db.executemany(
            "UPDATE meta SET value = ? WHERE key = ?",
            [
                (uid_next, "uid_next"),
                (covered[0], "size"),
                (covered[1], "mtime_ns"),
                (covered[2], "ino"),
            ],
        )

    @property
    def next_modseq(self) -> int:
        """The modseq the next change gets (RFC 7162 3.1: the counter only grows)."""
        return self.highest_modseq + 1

    def _set_modseq(self, db: sqlite3.Connection, modseq: int) -> None:
        db.execute("UPDATE meta SET value = ? WHERE key = 'highest_modseq'", (modseq,))

    def _add_vanished(self, db: sqlite3.Connection, uids: list[int], modseq: int) -> None:
        """Keep expunged C{uids} with their modseq; drop the oldest beyond the limit."""
        db.executemany(
            "INSERT INTO vanished (uid, modseq) VALUES (?, ?)", [(u, modseq) for u in uids]
        )
        top = db.execute("SELECT max(seq) FROM vanished").fetchone()[0]
        cut = top - self.vanished_limit if top is not None else 0
        if cut > 0:
            row = db.execute(
                "SELECT seq, modseq FROM vanished WHERE seq <= ? ORDER BY seq DESC LIMIT 1",
                (cut,),
            ).fetchone()
            if row is not None:
                # modseqs grow with seq: what is left is complete above the last one dropped
                db.execute("DELETE FROM vanished WHERE seq <= ?", (row[0],))
                db.execute(
                    "UPDATE meta SET value = max(value, ?) WHERE key = 'vanished_floor'",
                    (row[1],),
                )

    def _tx(self, fn) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # sqlite ends it itself on some errors (a full disk)
                db.execute("ROLLBACK")
            raise

    def replace_all(
        self,
        rows: Iterable[Row],
        uid_next: int,
        covered: tuple[int, int, int],
        modseq: int | None = None,
        vanished: list[int] | None = None,
    ) -> None:
        """
        Make the index describe exactly C{rows}, in one transaction. C{modseq}:
        the folder's HIGHESTMODSEQ after (the rows carry theirs), if it grew;
        C{vanished}: the UIDs that are gone, expunged at C{modseq}.
        """

        def fn(db):
            db.execute("DELETE FROM msgs")
            db.executemany("INSERT INTO msgs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._set_meta(uid_next, covered)
            if modseq is not None:
                self._set_modseq(db, modseq)
                if vanished:
                    self._add_vanished(db, vanished, modseq)

        self._tx(fn)
        self.uid_next, self.covered = uid_next, covered
        if modseq is not None:
            self.highest_modseq = modseq

    def add(
        self, rows: list[Row], uid_next: int, covered: tuple[int, int, int], durable: bool = True
    ) -> None:
        """
        Record messages appended at the end of the file. C{durable=False} commits
        without waiting for the disk (synchronous=NORMAL): for messages already
        fsynced in the mbox, whose rows the tail scan rebuilds if a crash loses
        them. A later durable commit makes this one durable too (one WAL).

        Each row carries its modseq (L{next_modseq}); HIGHESTMODSEQ becomes theirs.
        """
        modseq = max((r[11] for r in rows), default=self.highest_modseq)

        def fn(db):
            db.executemany("INSERT INTO msgs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._set_meta(uid_next, covered)
            if modseq != self.highest_modseq:
                self._set_modseq(db, modseq)

        if durable:
            self._tx(fn)
        else:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._tx(fn)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
        self.uid_next, self.covered = uid_next, covered
        self.highest_modseq = modseq

    def last_row(self) -> tuple[int, int, int] | None:
        """(from_off, start, crc) of the last message, or None if there is none."""
        return self._db.execute(
            "SELECT from_off, start, crc FROM msgs ORDER BY uid DESC LIMIT 1"
        ).fetchone()

    def rewrite(
        self,
        removed: list[int],
        moved: list[tuple[int, int, int, int]],
        covered: tuple[int, int, int],
        dflags: list[tuple[str, int]] | None = None,
    ) -> None:
        """
        After a rewrite of the file: drop C{removed} UIDs, move others ((from,
        start, stop, uid)), record what Status:/X-Status: now say ((text, uid)).
        Removing takes a new modseq, kept with the removed UIDs (idempotent:
        UIDs already gone are not recorded again).
        """
        modseq = self.next_modseq
        gone: list[int] = []

        def fn(db):
            for u in removed:
                if db.execute("DELETE FROM msgs WHERE uid = ?", (u,)).rowcount:
                    gone.append(u)
            if gone:
                self._set_modseq(db, modseq)
                self._add_vanished(db, gone, modseq)
            db.executemany("UPDATE msgs SET from_off = ?, start = ?, stop = ? WHERE uid = ?", moved)
            if dflags:
                db.executemany("UPDATE msgs SET dflags = ? WHERE uid = ?", dflags)
            self._set_meta(self.uid_next, covered)

        self._tx(fn)
        self.covered = covered
        if gone:
            self.highest_modseq = modseq

    def set_covered(self, covered: tuple[int, int, int]) -> None:
        self._tx(lambda db: self._set_meta(self.uid_next, covered))
        self.covered = covered

    def set_flags(self, changes: list[tuple[str, int]]) -> int:
        """
        C{changes}: (flags text, uid) pairs, stored in one transaction with one
        new modseq (RFC 7162 3.1), which is returned.
        """
        modseq = self.next_modseq

        def fn(db):
            db.executemany(
                "UPDATE msgs SET flags = ?, modseq = ? WHERE uid = ?",
                [(text, modseq, uid) for text, uid in changes],
            )
            self._set_modseq(db, modseq)

        self._tx(fn)
        self.highest_modseq = modseq
        return modseq

    def changed_since(self, modseq: int) -> list[tuple[int, int, frozenset[str]]]:
        """(uid, modseq, flags) of the messages changed after C{modseq}, in UID order."""
        rows = self._db.execute(
            "SELECT uid, modseq, flags FROM msgs WHERE modseq > ?", (modseq,)
        ).fetchall()
        rows.sort()
        return [(u, m, frozenset(f.split()) if f else frozenset()) for u, m, f in rows]

    def vanished_since(self, modseq: int) -> list[int] | None:
        """
        The UIDs expunged after C{modseq}, sorted; None if older expunges than
        that were dropped (the history is too short to tell).
        """
        row = self._db.execute("SELECT value FROM meta WHERE key = 'vanished_floor'").fetchone()
        if modseq < int(row[0]):
            return None
        got = self._db.execute("SELECT uid FROM vanished WHERE modseq > ?", (modseq,))
        return sorted(u for (u,) in got)

    def recent_uid(self) -> int:
        """The first UID no session has been given as \\Recent (as the database says now)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'recent_uid'").fetchone()
        return int(row[0])

    def claim_recent(self, upto: int) -> int:
        """
        Give the caller the messages below UID C{upto} that no session has had
        yet; return the first UID it gets: C{first <= uid < upto} are its own
        (none if C{first >= upto}). One transaction, so two
        sessions, also of two processes, never get the same message. It does
        not wait for the disk: a claim lost in a crash only makes messages
        recent once more.
        """
        got: list[int] = []

        def fn(db):
            row = db.execute("SELECT value FROM meta WHERE key = 'recent_uid'").fetchone()
            got.append(int(row[0]))
            if got[0] < upto:
                db.execute("UPDATE meta SET value = ? WHERE key = 'recent_uid'", (upto,))

        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._tx(fn)
        finally:
            self._db.execute("PRAGMA synchronous=FULL")
        return got[0]

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error:
            pass


def renew_validity(path: Path, restore: str, now: int) -> int | None:
    """
    Give the index at C{path} (a C{.sqlite} file) a new UIDVALIDITY, greater
    than its own and at least C{now}, once per C{restore} (an id kept in meta
    C{restored}, in the same transaction): a data folder put back from a
    backup serves UIDs that clients saw given to other messages since, and
    RFC 3501 2.3.1.1 says UIDVALIDITY MUST then be greater. The messages,
    their UIDs and flags stay. The new value, or None if this restore was
    done already (an interrupted start-up run again).
    """
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if meta.get("restored") == restore or "uid_validity" not in meta:
                # done already; or an index with no meta, which gets a fresh one at open
                db.execute("ROLLBACK")
                return None
            validity = max(int(meta["uid_validity"]) + 1, now)
            if validity > 0xFFFFFFFF:  # RFC 3501 2.3.1.1: a non-zero 32-bit number
                validity = 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'uid_validity'", (validity,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('restored', ?)", (restore,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        db.close()
    return validity
