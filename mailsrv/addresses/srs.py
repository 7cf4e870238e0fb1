"""
The Sender Rewriting Scheme (SRS) for forwarded mail: a message forwarded to
an external address leaves with an envelope sender in our own SRS domain, so
that the receiver's SPF check (RFC 7208) looks at our domain, and a bounce to
that address can be verified (hash, time stamp) and sent back to the original
sender. The scheme is the "Guarded" one of the SRS paper (libsrs2's, and
Postfix postsrsd's); C{srslib} makes the addresses, and this module checks
the ones that come back itself.

An SRS0 address (first hop) is C{SRS0=HHHHHHHH=TT=orig.domain=orig.local@srs.domain}:
HHHHHHHH the first L{HASH_LENGTH} characters of the base64 HMAC-SHA1 of the
rest, keyed with our secret, TT the day number (mod 1024) in base 32. An SRS1
address (a later hop) keeps the first hop's SRS0 part whole and adds its own
hash: C{SRS1=HHHHHHHH=first.hop==HHHH=TT=orig.domain=orig.local@srs.domain}.
After C{SRS0}/C{SRS1} (in any case) comes one separator, C{=}, C{+} or C{-}.

A hash is good only at exactly L{HASH_LENGTH} characters: a shorter one (a
prefix of ours) would make guessing easy. Hashes are compared in constant
time and without regard to case, as libsrs2 does, because relays may change
the case of a local part. That leaves 5 bits of a guesser's chance per
character (the best guess, a letter, is right 2 times in 64), so 40 bits for
the 8 characters: one forged address in about 2**40 (10**12) tries. Both
SRS0 and SRS1 addresses expire: the SRS0 time stamp (the embedded first
hop's one, for SRS1) must be at most L{MAX_AGE_DAYS} - 1 days old.

The secret is 32 random bytes in the data folder (C{srs.secret}), made on
first use.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import srslib

from mailsrv.atomic import write_atomic

# srslib's default: an SRS0 address is good on the day it was made and the 20
# days after it (21 day stamps), then reversing it fails as expired.
MAX_AGE_DAYS = 21

# Base64 characters of the HMAC kept in an address we make. Only this length
# is accepted back: the 4-character hashes of earlier builds are refused.
HASH_LENGTH = 8

SECRET_BYTES = 32
SECRET_FILE = "srs.secret"

_SEPARATORS = "=+-"  # after the SRS0/SRS1 tag (libsrs2's SRS_IS_SRS_ADDRESS)
_STAMP_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # the SRS paper's base 32
_STAMP_DAYS = 1024  # 2 base-32 characters
_DAY = 86400


class SRSError(ValueError):
    """An address that is not to be reversed; the text says why."""


class MalformedSRSAddress(SRSError):
    """Not an SRS address at all, or not one in a form we make."""


class ForgedSRSAddress(SRSError):
    """The hash does not match: the address was not made with our secret."""


class ExpiredSRSAddress(SRSError):
    """The time stamp is older than L{MAX_AGE_DAYS} (or not a time stamp)."""


class SRSSecretError(Exception):
    """The secret file cannot be read, or holds nothing."""


def load_or_create_secret(path: Path | str) -> bytes:
    """
    The SRS secret kept at C{path}: read it, or on first use create it
    (L{SECRET_BYTES} random bytes, mode 0600, written atomically; of two
    processes creating it at once, both end up with the one that won).
    """
    path = Path(path)
    if not path.exists():
        try:
            write_atomic(path, secrets.token_bytes(SECRET_BYTES), 0o600, replace=False)
        except FileExistsError:
            pass
        except OSError as e:
            raise SRSSecretError(f"cannot create the SRS secret {path}: {e.strerror or e}")
    try:
        secret = path.read_bytes()
    except OSError as e:
        raise SRSSecretError(f"cannot read the SRS secret {path}: {e.strerror or e}")
    if not secret:
        raise SRSSecretError(
            f"the SRS secret {path} is empty; remove it to have a new one made "
            "(SRS addresses made with the old one can then no longer be reversed)"
        )
    return secret


@dataclass(frozen=True)
class SRS0Parts:
    """The fields of an SRS0 local part (after C{SRS0} and its separator)."""

    hash: str
    stamp: str
    host: str
    local: str


@dataclass(frozen=True)
class SRS1Parts:
    """
    The fields of an SRS1 local part: our hash, the first hop's host, and the
    first hop's SRS0 local part without its C{SRS0} tag (C{opaque}, from its
    separator on), whose fields are C{first}.
    """

    hash: str
    host: str
    opaque: str
    first: SRS0Parts


def _is_tagged(local: str, tag: str) -> bool:
    return len(local) > 5 and local[:4].upper() == tag and local[4] in _SEPARATORS


def _srs0_fields(rest: str) -> SRS0Parts | None:
    """C{HASH=TT=host=local} (what follows C{SRS0} and its separator), or None."""
    fields = rest.split("=", 3)
    if len(fields) != 4 or not all(fields):
        return None
    return SRS0Parts(*fields)


def parse_srs(local: str) -> SRS0Parts | SRS1Parts | None:
    """
    The fields of the SRS local part C{local} in the Guarded scheme, or None
    if it is not one (libsrs2's parse: C{SRS0} or C{SRS1} in any case, one
    separator, then fields split at C{=}; the last field keeps its own C{=}).
    """
    if _is_tagged(local, "SRS0"):
        return _srs0_fields(local[5:])
    if _is_tagged(local, "SRS1"):
        fields = local[5:].split("=", 2)
        if len(fields) != 3 or not fields[0] or not fields[1]:
            return None
        opaque = fields[2]
        if not opaque or opaque[0] not in _SEPARATORS:
            return None
        first = _srs0_fields(opaque[1:])
        if first is None:
            return None
        return SRS1Parts(fields[0], fields[1], opaque, first)
    return None


class SRSRewriter:
    """
    Rewrites envelope senders of forwarded mail into SRS addresses in
    C{domain}, and reverses them when a bounce comes back.

    C{now} gives the time in seconds since the epoch (a reactor's
    C{seconds}, or a L{twisted.internet.task.Clock}'s in tests).
    """

    def __init__(
        self, secret: bytes, domain: str, *, now: Callable[[], float] | None = None
    ) -> None:
        if not secret:
            raise SRSSecretError("the SRS secret is empty")
        self.domain = domain
        self._secret = secret
        self._srs = srslib.SRS(secret, validity_days=MAX_AGE_DAYS, hash_length=HASH_LENGTH)
        if now is not None:
            # srslib's clock hook (it reads the time through this attribute only).
            self._srs._time_fn = now
        self._now = self._srs._time_fn

    def forward(self, sender: str) -> str:
        """
        The envelope sender to use when forwarding mail from C{sender}: SRS0
        for an ordinary address; SRS1 for an SRS0 or SRS1 address made by
        another host (bounces then go back through that first hop). The null
        sender stays null: a bounce is never rewritten (RFC 5321 4.5.5). An
        address that only looks like SRS (no hash, time stamp and host to
        check on the way back) is rewritten as an ordinary one.
        """
        if sender == "":
            return ""
        local, sep, host = sender.rpartition("@")
        if not sep or not local or not host:
            raise MalformedSRSAddress(f"not an address to rewrite: {sender!r}")
        parts = parse_srs(local)
        if isinstance(parts, SRS1Parts):
            return self._srs.generate_srs1_address(parts.host, parts.opaque, self.domain)
        if isinstance(parts, SRS0Parts):
            return self._srs.generate_srs1_address(host, local[4:], self.domain)
        return self._srs.generate_srs0_address(host, local, self.domain)

    def reverse(self, address: str) -> str:
        """
        Where a bounce to the SRS address C{address} goes: the original
        sender (SRS0), or the first hop's SRS0 address (SRS1). The domain of
        C{address} is not checked here: routing decides which domains are ours.

        @raise ForgedSRSAddress: the hash is not ours at our length.
        @raise ExpiredSRSAddress: the SRS0 time stamp (for SRS1, the first
            hop's) is older than L{MAX_AGE_DAYS}, or not a time stamp.
        @raise MalformedSRSAddress: not an SRS address.
        """
        local, at, _ = address.rpartition("@")
        parts = parse_srs(local) if at else None
        if isinstance(parts, SRS0Parts):
            self._check_hash(parts.hash, parts.stamp + parts.host + parts.local, address)
            self._check_stamp(parts.stamp, address)
            return f"{parts.local}@{parts.host}"
        if isinstance(parts, SRS1Parts):
            self._check_hash(parts.hash, parts.host + parts.opaque, address)
            self._check_stamp(parts.first.stamp, address)
            return f"SRS0{parts.opaque}@{parts.host}"
        raise MalformedSRSAddress(f"not an SRS address: {address!r}")

    def _check_hash(self, given: str, hashed: str, address: str) -> None:
        """
        C{given} is our hash of C{hashed}: exactly L{HASH_LENGTH} characters,
        compared in constant time without regard to case (as libsrs2 does).
        """
        ours = self._srs.generate_hash(hashed, self._secret, HASH_LENGTH)
        if len(given) != HASH_LENGTH or not hmac.compare_digest(
            given.lower().encode("utf-8"), ours.lower().encode("utf-8")
        ):
            raise ForgedSRSAddress(f"SRS address with a bad hash: {address!r}")

    def _check_stamp(self, stamp: str, address: str) -> None:
        """C{stamp} is a day stamp of today or the L{MAX_AGE_DAYS} - 1 days before."""
        digits = [_STAMP_ALPHABET.find(c) for c in stamp.upper()]
        if len(digits) == 2 and min(digits) >= 0:
            today = int(self._now() // _DAY) % _STAMP_DAYS
            if (today - (digits[0] * 32 + digits[1])) % _STAMP_DAYS < MAX_AGE_DAYS:
                return
        raise ExpiredSRSAddress(
            f"SRS address older than {MAX_AGE_DAYS} days or with a bad time stamp: {address!r}"
        )

    @staticmethod
    def is_srs(address: str) -> bool:
        """
        Whether C{address} has the form of an SRS address (C{SRS0} or
        C{SRS1}, in any case, and a separator), genuine or not, well formed
        or not: L{reverse} tells which.
        """
        local, at, _ = address.rpartition("@")
        return bool(at) and (_is_tagged(local, "SRS0") or _is_tagged(local, "SRS1"))
