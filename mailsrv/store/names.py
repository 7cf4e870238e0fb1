"""Folder and user names: validation, and where they live on disk."""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path
from urllib.parse import quote

from mailsrv.addresses.domains import ascii_domain, normalise_local
from mailsrv.interfaces import FolderError

INBOX = "INBOX"
DELIMITER = "/"
MAX_NAME = 512
# The longest name of one file (Linux NAME_MAX). Each folder level is a file
# or directory; a folder's index files are named by the whole name quoted
# (store/index.py), plus a suffix (".sqlite-journal", SQLite's, is 15;
# room is left for its other temporary files); a dotlock
# takes a temporary file ".<level>.lk.<host>.<pid>.<ns>" beside the mbox
# (store/locking.py), up to 98 more than the level.
NAME_MAX = 255
_INDEX_SUFFIX_MAX = 20
_DOTLOCK_EXTRA_MAX = 100


def fits_on_disk(name: str) -> bool:
    """Whether every file the store keeps for folder C{name} has a name the file system takes."""
    raw = name.encode("utf-8", "surrogatepass")
    if len(quote(raw, safe="")) + _INDEX_SUFFIX_MAX > NAME_MAX:
        return False
    return all(len(level) + _DOTLOCK_EXTRA_MAX <= NAME_MAX for level in raw.split(b"/"))


def canonical_folder(name: str) -> str:
    """
    Return the canonical form of an IMAP folder name, or raise L{FolderError}.

    INBOX is matched case-insensitively (RFC 3501 5.1). Names that would
    leave the user's directory, or that no file system should hold, are
    refused: empty components, ``.`` and ``..``, a leading ``/``, NUL and
    other control characters, names beginning with a dot (reserved for
    the store's own files), and names too long for the file system's file
    names (L{fits_on_disk}).
    """
    if not isinstance(name, str) or not name:
        raise FolderError("Folder name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise FolderError("Folder name is too long")
    if name.startswith(DELIMITER) or name.endswith(DELIMITER):
        raise FolderError("Folder name must not begin or end with /")
    parts = name.split(DELIMITER)
    for part in parts:
        if not part:
            raise FolderError("Folder name has an empty level")
        if part in (".", "..") or part.startswith("."):
            raise FolderError("Folder name levels must not begin with a dot")
        if any(unicodedata.category(c) in ("Cc", "Cs") or c == "\\" for c in part):
            raise FolderError("Folder name contains a control character")
    if not fits_on_disk(name):
        raise FolderError("Folder name is too long")
    if parts[0].upper() == INBOX:
        if len(parts) == 1:
            return INBOX
        parts[0] = INBOX
    return DELIMITER.join(parts)


@functools.lru_cache(maxsize=4096)
def split_user(address: str) -> tuple[str, str]:
    """
    Split C{local@domain} into its parts; ValueError if unusable. The domain
    comes back in lower-case A-labels (an IDN is one user whether written
    with U-labels or A-labels, RFC 5890), a UTF-8 local part in Unicode NFC
    (RFC 6530 10.1), so each user has one name, and one folder on disk. A
    pure function, remembered for the last 4,096 addresses (every lookup of
    a user and every routing step calls it; a refused one is not kept).
    """
    if not isinstance(address, str) or address.count("@") < 1:
        raise ValueError(f"not an address: {address!r}")
    local, _, domain = address.rpartition("@")
    if any(unicodedata.category(c) == "Cs" for c in address):
        raise ValueError(f"not a usable mailbox address: {address!r}")  # not UTF-8
    local = normalise_local(local)
    domain = ascii_domain(domain.rstrip("."))
    if (
        not local
        or not domain
        or local in (".", "..")
        or local.startswith(".")
        or any(c in local for c in "/\\\x00")
        or any(ord(c) < 32 or ord(c) == 127 for c in local + domain)
        or any(c in domain for c in "/\\@")
        or domain.startswith(".")
    ):
        raise ValueError(f"not a usable mailbox address: {address!r}")
    return local, domain


def normalize_user(address: str) -> str:
    """Return C{local@domain} as L{split_user} gives its parts."""
    local, domain = split_user(address)
    return f"{local}@{domain}"


def user_dir(mail_dir: Path, address: str) -> Path:
    """C{<mail_dir>/<domain>/<local>}: the user's folders live here."""
    local, domain = split_user(address)
    return mail_dir / domain / local


def folder_path(mail_dir: Path, address: str, name: str) -> Path:
    """The mbox file holding folder C{name} of C{address}."""
    return user_dir(mail_dir, address).joinpath(*canonical_folder(name).split(DELIMITER))
