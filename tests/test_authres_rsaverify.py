"""
The verifier processes' RSA verification by OpenSSL
(L{mailsrv.authres.rsaverify}) gives dkimpy's answers, and a verifier
process uses it.
"""

from __future__ import annotations

import hashlib

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mailsrv.authres.rsaverify import Verifier

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
NUMBERS = KEY.public_key().public_numbers()
PUBLIC = {"modulus": NUMBERS.n, "publicExponent": NUMBERS.e}


def signed(data: bytes, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
    return KEY.sign(data, padding.PKCS1v15(), algorithm or hashes.SHA256())


def both(hash_: object, signature: bytes, public: dict[str, int] = PUBLIC) -> tuple[bool, bool]:
    """dkimpy's answer and ours."""
    return (
        dkim.crypto.RSASSA_PKCS1_v1_5_verify(hash_, signature, public),
        Verifier()(hash_, signature, public),
    )


def test_a_good_signature_verifies_with_both() -> None:
    assert both(hashlib.sha256(b"message"), signed(b"message")) == (True, True)


def test_sha1_signatures_as_dkimpy_verifies_them() -> None:
    sig = signed(b"message", hashes.SHA1())
    assert both(hashlib.sha1(b"message"), sig) == (True, True)
    assert both(hashlib.sha256(b"message"), sig) == (False, False)


def test_a_changed_message_or_signature_fails_with_both() -> None:
    sig = signed(b"message")
    assert both(hashlib.sha256(b"massage"), sig) == (False, False)
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    assert both(hashlib.sha256(b"message"), bad) == (False, False)
    assert both(hashlib.sha256(b"message"), sig[:-1]) == (False, False)
    assert both(hashlib.sha256(b"message"), b"") == (False, False)


def test_a_signature_signed_by_another_key_fails() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sig = other.sign(b"message", padding.PKCS1v15(), hashes.SHA256())
    assert both(hashlib.sha256(b"message"), sig) == (False, False)


def test_a_signature_with_its_leading_zero_octet_dropped_verifies() -> None:
    # A signer that writes the integer without its leading zero octet: dkimpy
    # reads it as an integer, so it verifies; so must ours.
    for i in range(5000):
        data = b"message %d" % i
        sig = signed(data)
        if sig[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero octet in 5000")
    assert both(hashlib.sha256(data), sig[1:]) == (True, True)


def test_a_signature_longer_than_the_modulus_fails() -> None:
    sig = signed(b"message")
    assert Verifier()(hashlib.sha256(b"message"), b"\x00" + sig, PUBLIC) is False


def test_a_modulus_too_small_for_the_digest_raises_as_dkimpy() -> None:
    tiny = {"modulus": (1 << 255) + 1, "publicExponent": 65537}
    for verify in (dkim.crypto.RSASSA_PKCS1_v1_5_verify, Verifier()):
        with pytest.raises(dkim.crypto.DigestTooLargeError):
            verify(hashlib.sha256(b"message"), b"\x01" * 32, tiny)


def test_keys_are_kept_up_to_the_limit() -> None:
    verifier = Verifier(max_keys=2)
    for _ in range(3):
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        n = key.public_key().public_numbers().n
        sig = key.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
        assert verifier(hashlib.sha256(b"m"), sig, {"modulus": n, "publicExponent": 65537})
    assert len(verifier._keys) == 2


def test_dkim_signed_messages_verify_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a verifier process does after install(): dkimpy's DKIM verification
    # calls it, and gives its answers.
    from cryptography.hazmat.primitives import serialization

    pem = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    message = b"From: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
    sig = dkim.sign(message, b"s", b"example.test", pem, include_headers=[b"from", b"subject"])
    calls: list[bool] = []
    verifier = Verifier()

    def counted(*args: object) -> bool:
        calls.append(verifier(*args))  # type: ignore[arg-type]
        return calls[-1]

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_verify", counted)

    def dns(name: bytes, timeout: float = 5) -> bytes:
        return record

    assert dkim.verify(sig + message, dnsfunc=dns)
    assert not dkim.verify(sig + message.replace(b"hi", b"ho"), dnsfunc=dns)
    assert calls == [True, False]


def test_keys_openssl_refuses_are_verified_as_dkimpy_does() -> None:
    # A 4096-bit key with a 101-bit public exponent: valid RSA, which OpenSSL
    # will not use (an exponent over 64 bits with a modulus over 3072 bits).
    big = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    numbers = big.private_numbers()
    p, q = numbers.p, numbers.q
    phi = (p - 1) * (q - 1)
    e = (1 << 100) + 1
    while True:
        try:
            d = pow(e, -1, phi)
            break
        except ValueError:
            e += 2
    n = p * q
    public = {"modulus": n, "publicExponent": e}
    digest = hashlib.sha256(b"message")
    encoded = dkim.crypto.EMSA_PKCS1_v1_5_encode(digest, 512)
    signature = pow(int.from_bytes(encoded, "big"), d, n).to_bytes(512, "big")
    assert both(digest, signature, public) == (True, True)
    assert both(hashlib.sha256(b"massage"), signature, public) == (False, False)
