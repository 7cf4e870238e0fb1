"""
The server's TLS certificate: the configured PEM files, or a self-signed
certificate generated once in the data folder.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.logger import Logger

from mailsrv.atomic import make_dirs, write_atomic
from mailsrv.config import Config

log = Logger()


def self_signed_paths(config: Config) -> tuple[Path, Path]:
    d = config.server.data_dir / "tls"
    return d / "cert.pem", d / "key.pem"


def generate_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    """Write a new self-signed certificate for C{hostname} (key file mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    make_dirs(cert_path.parent)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(key_path, key_bytes, 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o600)


def server_options(config: Config) -> ssl.CertificateOptions:
    """The server-side TLS options for every listener (STARTTLS and implicit TLS)."""
    cert_path, key_path = config.tls.certificate, config.tls.key
    if cert_path is None or key_path is None:
        cert_path, key_path = self_signed_paths(config)
        if not (cert_path.exists() and key_path.exists()):
            log.info(
                "generating a self-signed certificate for {host} in {path}",
                host=config.server.hostname,
                path=str(cert_path.parent),
            )
            generate_self_signed(config.server.hostname, cert_path, key_path)
    pem = cert_path.read_bytes() + b"\n" + key_path.read_bytes()
    cert = ssl.PrivateCertificate.loadPEM(pem)
    return cert.options()
