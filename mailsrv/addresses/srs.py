"""
The Sender Rewriting Scheme (SRS) for forwarded mail: a message forwarded to
an external address leaves with an envelope sender in our own SRS domain, so
that the receiver's SPF check (RFC 7208) looks at our domain, and a bounce to
that address can be verified (hash, time stamp) and sent back to the original
sender. The scheme is the "Guarded" one of the SRS paper (libsrs2's, and
Postfix postsrsd's), done by C{srslib}.

An SRS0 address (first hop) is C{SRS0=HHHH=TT=orig.domain=orig.local@srs.domain}:
HHHH an HMAC-SHA1 of the rest, keyed with our secret, TT the day number
(mod 1024) in base 32. An SRS1 address (a later hop) keeps the first hop's
SRS0 part whole and adds its own hash: C{SRS1=HHHH=first.hop=SRS0opaque@srs.domain}.
Hashes are compared without regard to case, as libsrs2 does, because relays
may change the case of a local part.

The secret is 32 random bytes in the data folder (C{srs.secret}), made on
first use.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import srslib

from mailsrv.atomic import write_atomic

# srslib's default: an SRS0 address is good on the day it was made and the 20
# days after it (21 day stamps), then reversing it fails as expired.
MAX_AGE_DAYS = 21

SECRET_BYTES = 32
SECRET_FILE = "srs.secret"


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
        self._srs = srslib.SRS(secret, validity_days=MAX_AGE_DAYS)
        if now is not None:
            # srslib's clock hook (it reads the time through this attribute only).
            self._srs._time_fn = now

    def forward(self, sender: str) -> str:
        """
        The envelope sender to use when forwarding mail from C{sender}: SRS0
        for an ordinary address; SRS1 for an SRS0 or SRS1 address made by
        another host (bounces then go back through that first hop). The null
        sender stays null: a bounce is never rewritten (RFC 5321 4.5.5).
        """
        if sender == "":
            return ""
        local, sep, host = sender.rpartition("@")
        if not sep or not local or not host:
            raise MalformedSRSAddress(f"not an address to rewrite: {sender!r}")
        return self._srs.forward(sender, self.domain)

    def reverse(self, address: str) -> str:
        """
        Where a bounce to the SRS address C{address} goes: the original
        sender (SRS0), or the first hop's SRS0 address (SRS1). The domain of
        C{address} is not checked here: routing decides which domains are ours.

        @raise ForgedSRSAddress: the hash is not ours.
        @raise ExpiredSRSAddress: the time stamp is older than L{MAX_AGE_DAYS}.
        @raise MalformedSRSAddress: not an SRS address.
        """
        try:
            original = self._srs.reverse(address)
        except srslib.InvalidHashError:
            raise ForgedSRSAddress(f"SRS address with a bad hash: {address!r}")
        except srslib.InvalidTimestampError:
            raise ExpiredSRSAddress(
                f"SRS address older than {MAX_AGE_DAYS} days or with a bad time stamp: {address!r}"
            )
        except srslib.Error:
            raise MalformedSRSAddress(f"not an SRS address: {address!r}")
        return original

    @staticmethod
    def is_srs(address: str) -> bool:
        """
        Whether C{address} has the form of an SRS address (SRS0 or SRS1, from
        us or from another host), genuine or not: L{reverse} tells which.
        """
        try:
            return srslib.SRS.is_srs_address(address, strict=False)
        except srslib.Error:
            return False
