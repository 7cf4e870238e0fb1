"""
RSA signature verification for dkimpy by OpenSSL (the C{cryptography}
package), in place of dkimpy's own pure Python arithmetic.

dkimpy verifies an RSA signature with Python integers: a 2048-bit modular
exponentiation and two byte-by-byte conversions, some 0.2 ms a signature,
a third of what verifying a DKIM-signed message costs
(benchmarks/checks_bench.py). L{verify} gives the same answer for the same
arguments (tests/test_authres_rsaverify.py holds the two to it) and
L{install} makes the verifier processes (L{mailsrv.authres.worker_main},
which do nothing else) use it: dkimpy looks the function up in its module
at each call, for DKIM and ARC alike. A server that verifies in its own
threads (C{authentication_workers = 0}) keeps dkimpy's.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from typing import Any

import dkim
import dkim.crypto
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding, rsa

MAX_KEYS = 256  # public keys kept built (a key is some 10 us to build)
MAX_EXPONENT_BITS = 64  # OpenSSL's limit for a modulus over 3072 bits (the one used here for all)
MAX_MODULUS_BITS = 16_384  # OpenSSL's OPENSSL_RSA_MAX_MODULUS_BITS


class Verifier:
    """
    C{verify(hash, signature, public_key)} as dkimpy's
    C{RSASSA_PKCS1_v1_5_verify} (RFC 8017 8.2.2), with the OpenSSL keys
    built from dkimpy's C{{modulus, publicExponent}} kept for reuse.
    """

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._keys: OrderedDict[tuple[int, int], rsa.RSAPublicKey] = OrderedDict()
        self._max_keys = max_keys

    def __call__(self, hash: Any, signature: bytes, public_key: dict[str, int]) -> bool:
        n, e = public_key["modulus"], public_key["publicExponent"]
        modlen = (n.bit_length() + 7) // 8
        # RFC 8017 9.2: the encoding the signature must hold; raises
        # DigestTooLargeError for a modulus too small, as dkimpy's does.
        encoded = dkim.crypto.EMSA_PKCS1_v1_5_encode(hash, modlen)
        digest_info = encoded[encoded.index(b"\x00", 1) + 1 :]
        if len(signature) > modlen:
            return False  # RFC 8017 8.2.2 step 1 (dkimpy: an integer out of range)
        if e.bit_length() > MAX_EXPONENT_BITS or n.bit_length() > MAX_MODULUS_BITS:
            # Keys OpenSSL refuses to use (an exponent over 64 bits with a
            # modulus over 3072, a modulus over 16384 bits): dkimpy's arithmetic.
            return bool(dkim.crypto.RSASSA_PKCS1_v1_5_verify(hash, signature, public_key))
        try:
            key = self._key(n, e)
        except ValueError:
            return bool(dkim.crypto.RSASSA_PKCS1_v1_5_verify(hash, signature, public_key))
        try:
            # RSAVP1 and the padding check by OpenSSL (signature < n, type 1
            # padding across the whole modulus); what remains is the DigestInfo.
            recovered = key.recover_data_from_signature(
                signature.rjust(modlen, b"\x00"), padding.PKCS1v15(), None
            )
        except (InvalidSignature, ValueError):
            return False
        return hmac.compare_digest(recovered, digest_info)

    def _key(self, n: int, e: int) -> rsa.RSAPublicKey:
        key = self._keys.get((n, e))
        if key is None:
            key = rsa.RSAPublicNumbers(e, n).public_key()
            self._keys[(n, e)] = key
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end((n, e))
        return key


def install() -> None:
    """
    Make dkimpy verify RSA signatures with a L{Verifier}, in this process:
    called once by a verifier process as it starts, before any job.
    """
    dkim.RSASSA_PKCS1_v1_5_verify = Verifier()


__all__ = ["Verifier", "install"]
