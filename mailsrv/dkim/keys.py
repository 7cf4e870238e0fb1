"""
DKIM signing keys (RFC 6376 3.6): made by C{mailsrv dkim keygen}, read
when the server starts, and the DNS TXT record that publishes each one.

Key files hold what C{dkimpy} (and opendkim) read: an RSA key as PEM
(PKCS#1), an ed25519 key (RFC 8463) as the base64 of its 32-byte seed.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailsrv.atomic import make_dirs, write_atomic

KEY_TYPES = ("ed25519", "rsa")
RSA_BITS = 2048  # RFC 8301 3.2: at least 1024, and 2048 recommended


class DkimKeyError(ValueError):
    """A key file that cannot be used; the text names the file."""


@dataclass(frozen=True)
class SigningKey:
    """One domain's key as C{dkimpy} signs with it."""

    domain: str
    selector: str
    kind: str  # "ed25519" or "rsa"
    private: bytes  # in the form dkimpy's sign() takes
    public: bytes  # the raw public key bytes of the TXT record's p= tag

    @property
    def algorithm(self) -> bytes:
        """The a= tag (RFC 6376 3.5, RFC 8463 3)."""
        return b"ed25519-sha256" if self.kind == "ed25519" else b"rsa-sha256"

    def txt_record(self) -> str:
        """The TXT record to publish at C{SELECTOR._domainkey.DOMAIN} (RFC 6376 3.6.1)."""
        return txt_record(self.kind, self.public)


def txt_record(kind: str, public: bytes) -> str:
    """C{v=DKIM1; k=KIND; p=BASE64} (RFC 6376 3.6.1; RFC 8463 4 for ed25519)."""
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"


def generate(kind: str) -> tuple[bytes, bytes]:
    """A new key: (the key file's bytes, the raw public key for the TXT record)."""
    if kind == "ed25519":
        ed = ed25519.Ed25519PrivateKey.generate()
        seed = ed.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(seed) + b"\n", _public_bytes(ed)
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, as dkimpy reads it
            serialization.NoEncryption(),
        )
        return pem, _public_bytes(key)
    raise ValueError(f"unknown key type {kind!r} (known: {', '.join(KEY_TYPES)})")


def write_key(path: Path, data: bytes, *, force: bool = False) -> None:
    """
    Write a key file atomically with mode 0600 (its folder 0700 if made);
    an existing file is replaced only when C{force}, else L{FileExistsError}.
    Run as root, the file (and a folder made for it) gets the owner of the
    folder above, as the password file does: the server's user reads it.
    """
    if not path.parent.is_dir():
        make_dirs(path.parent)
        if os.geteuid() == 0:
            st = os.stat(path.parent.parent)
            os.chown(path.parent, st.st_uid, st.st_gid)
    write_atomic(path, data, 0o600, replace=force, keep_owner=True)


def load_key(path: Path, domain: str, selector: str) -> SigningKey:
    """Read the key file at C{path}; L{DkimKeyError} naming the file when it is unusable."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DkimKeyError(f"cannot read the DKIM key of {domain}: {e.strerror}")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data.strip()))
    except (ValueError, TypeError) as e:
        raise DkimKeyError(f"not a DKIM key (PEM RSA, or base64 ed25519 seed): {e}")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return SigningKey(domain, selector, "ed25519", base64.b64encode(seed), _public_bytes(key))
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise DkimKeyError(
                f"{path}: RSA key of {key.key_size} bits (RFC 8301 3.2: 1024 at least)"
            )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return SigningKey(domain, selector, "rsa", pem, _public_bytes(key))
    raise DkimKeyError("DKIM keys are RSA or ed25519")


def _public_bytes(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    """ed25519: the raw 32 bytes (RFC 8463 4); RSA: DER SubjectPublicKeyInfo (RFC 6376 3.6.1)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
