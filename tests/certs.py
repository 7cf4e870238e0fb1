"""
Support for TLS tests: a private CA made on the spot (root, intermediate,
server certificate), written as PEM files the way an ACME client writes them.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
    names: tuple[str, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class CAChain:
    """PEM files of a two-level CA and a server certificate it issued."""

    root: Path  # the root certificate alone: what a client trusts
    fullchain: Path  # server certificate, then the intermediate (as ACME clients write it)
    leaf: Path  # the server certificate alone
    key: Path  # the server's private key


def make_chain(folder: Path, names: tuple[str, ...] = ("mx.example.test", "127.0.0.1")) -> CAChain:
    """Root -> intermediate -> server certificate for C{names}, written in C{folder}."""
    folder.mkdir(parents=True, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root = _issue("Test Root CA", root_key, "Test Root CA", root_key, ca=True)
    inter = _issue("Test Intermediate CA", inter_key, "Test Root CA", root_key, ca=True)
    leaf = _issue(names[0], leaf_key, "Test Intermediate CA", inter_key, ca=False, names=names)
    chain = CAChain(
        root=folder / "root.pem",
        fullchain=folder / "fullchain.pem",
        leaf=folder / "cert.pem",
        key=folder / "privkey.pem",
    )
    chain.root.write_bytes(_pem(root))
    chain.fullchain.write_bytes(_pem(leaf) + _pem(inter))
    chain.leaf.write_bytes(_pem(leaf))
    chain.key.write_bytes(_key_pem(leaf_key))
    return chain
