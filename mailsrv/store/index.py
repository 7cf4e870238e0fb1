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

Row = tuple  # (uid, from_off, start, end, size, flags, idate, crc, fp, rd, dflags)


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


def flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(flags))


class FolderIndex:
    """One folder's index database."""

    log = SafeLogger()

    def __init__(self, base: Path, new_validity: Callable[[], int]) -> None:
        self.path = Path(str(base) + ".sqlite")
        make_dirs(self.path.parent)
        self.fresh = False
        try:
            self._open(new_validity)
        except sqlite3.DatabaseError as e:
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
                " crc INTEGER, fp INTEGER, rd INTEGER NOT NULL DEFAULT 1, dflags TEXT)"
            )
            cols = [r[1] for r in db.execute("PRAGMA table_info(msgs)")]
            if "rd" not in cols:  # an index from before the column: its rows were read as mboxrd
                db.execute("ALTER TABLE msgs ADD COLUMN rd INTEGER NOT NULL DEFAULT 1")
            if "dflags" not in cols:  # NULL: what the file says is not known
                db.execute("ALTER TABLE msgs ADD COLUMN dflags TEXT")
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
                }
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            elif int(meta.get("version", 0)) != SCHEMA_VERSION:
                raise sqlite3.DatabaseError("unknown index version")
            elif "recent_uid" not in meta:
                # An index from before \Recent was kept: what it holds was seen already.
                db.execute("INSERT INTO meta VALUES ('recent_uid', ?)", (meta["uid_next"],))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # sqlite ends it itself on some errors (a full disk)
                db.execute("ROLLBACK")
            raise
        self.uid_validity = int(meta["uid_validity"])
        self.uid_next = int(meta["uid_next"])
        size, mtime, ino = int(meta["size"]), int(meta["mtime_ns"]), int(meta["ino"])
        self.covered: tuple[int, int, int] | None = None if size < 0 else (size, mtime, ino)

    def rows(self):
        """All messages, in UID (= file) order (an iterator)."""
        return self._db.execute(
            "SELECT uid, from_off, start, stop, size, flags, idate, crc, fp, rd, dflags"
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
        self, rows: Iterable[Row], uid_next: int, covered: tuple[int, int, int]
    ) -> None:
        """Make the index describe exactly C{rows}, in one transaction."""

        def fn(db):
            db.execute("DELETE FROM msgs")
            db.executemany("INSERT INTO msgs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._set_meta(uid_next, covered)

        self._tx(fn)
        self.uid_next, self.covered = uid_next, covered

    def add(
        self, rows: list[Row], uid_next: int, covered: tuple[int, int, int], durable: bool = True
    ) -> None:
        """
        Record messages appended at the end of the file. C{durable=False} commits
        without waiting for the disk (synchronous=NORMAL): for messages already
        fsynced in the mbox, whose rows the tail scan rebuilds if a crash loses
        them. A later durable commit makes this one durable too (one WAL).
        """

        def fn(db):
            db.executemany("INSERT INTO msgs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._set_meta(uid_next, covered)

        if durable:
            self._tx(fn)
        else:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._tx(fn)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
        self.uid_next, self.covered = uid_next, covered

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
        """

        def fn(db):
            db.executemany("DELETE FROM msgs WHERE uid = ?", [(u,) for u in removed])
            db.executemany("UPDATE msgs SET from_off = ?, start = ?, stop = ? WHERE uid = ?", moved)
            if dflags:
                db.executemany("UPDATE msgs SET dflags = ? WHERE uid = ?", dflags)
            self._set_meta(self.uid_next, covered)

        self._tx(fn)
        self.covered = covered

    def set_covered(self, covered: tuple[int, int, int]) -> None:
        self._tx(lambda db: self._set_meta(self.uid_next, covered))
        self.covered = covered

    def set_flags(self, changes: list[tuple[str, int]]) -> None:
        """C{changes}: (flags text, uid) pairs, stored in one transaction."""
        self._tx(lambda db: db.executemany("UPDATE msgs SET flags = ? WHERE uid = ?", changes))

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
