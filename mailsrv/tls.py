"""
The server's TLS certificate: the configured PEM files, or a self-signed
certificate generated once in the data folder; read again on demand
(SIGHUP), since ACME clients renew the files in place.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.atomic import make_dirs, write_atomic
from mailsrv.config import Config
from mailsrv.startup import StartupError, os_reason

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


def server_options(config: Config) -> ServerTLS:
    """The server-side TLS settings for every listener (STARTTLS and implicit TLS)."""
    return ServerTLS(config)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """
    The server side of TLS, shared by every listener: the certificate and key
    read at start, and read again by L{reload}; connections made after a
    reload use the new ones, connections already open keep theirs.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.certificate_path, self.options = _load(config)

    def reload(self) -> Path:
        """Read the files again; return the certificate file. On error the old ones stay."""
        self.certificate_path, self.options = _load(self.config)
        return self.certificate_path

    def getContext(self) -> Any:
        return self.options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self.options.serverConnectionForTLS(tlsProtocol)


def _stale_self_signed(cert_path: Path, hostname: str) -> bool:
    """
    Whether the certificate in data_dir/tls is one mailsrv made (self-signed)
    for another hostname, to be made again. One that is not self-signed was
    put there by someone else: it is kept, with a warning if the name differs.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False  # reported when loaded, naming the file
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if hostname.lower() in names:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        log.warn(
            "the certificate {path} is for {names}, not server.hostname {host}; "
            "mailsrv did not make it and leaves it as it is",
            path=str(cert_path),
            names=", ".join(names) or cert.subject.rfc4514_string(),
            host=hostname,
        )
        return False
    log.info(
        "the self-signed certificate {path} is for {names}, not server.hostname {host}",
        path=str(cert_path),
        names=", ".join(names) or cert.subject.rfc4514_string(),
        host=hostname,
    )
    return True


def _load(config: Config) -> tuple[Path, ssl.CertificateOptions]:
    cert_path, key_path = config.tls.certificate, config.tls.key
    if cert_path is None or key_path is None:
        cert_path, key_path = self_signed_paths(config)
        if not (cert_path.exists() and key_path.exists()) or _stale_self_signed(
            cert_path, config.server.hostname
        ):
            log.info(
                "generating a self-signed certificate for {host} in {path}",
                host=config.server.hostname,
                path=str(cert_path.parent),
            )
            try:
                generate_self_signed(config.server.hostname, cert_path, key_path)
            except OSError as e:
                raise StartupError(
                    config.path, "server.data_dir", config.server.data_dir, os_reason(e)
                )
        keys = ("server.data_dir (self-signed certificate)",) * 2
    else:
        keys = ("tls.certificate", "tls.key")
    return cert_path, load_options(cert_path, key_path, config.path, keys)


def load_options(
    cert_path: Path,
    key_path: Path,
    source: str = "<config>",
    keys: tuple[str, str] = ("tls.certificate", "tls.key"),
) -> ssl.CertificateOptions:
    """
    Options that send every certificate in C{cert_path}: the server's, then
    the intermediates, as in the C{fullchain.pem} an ACME client writes
    (RFC 8446 4.4.2: the sender's certificate first, then the ones that
    certify it). Clients that trust only the root need the intermediates.

    A file that cannot be used raises L{StartupError} naming its key in the
    config file C{source}.
    """
    cert_key, key_key = keys
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except OSError as e:
        raise StartupError(source, cert_key, cert_path, os_reason(e, cert_path))
    except ValueError:
        raise StartupError(source, cert_key, cert_path, "no PEM certificate in it")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise StartupError(source, key_key, key_path, os_reason(e, key_path))
    except (ValueError, TypeError):
        raise StartupError(source, key_key, key_path, "no unencrypted PEM private key in it")
    try:
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(certs[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in certs[1:]],
        )
        options.getContext()  # a key that does not match the certificate fails here
    except (SSL.Error, TypeError, ValueError) as e:
        reason = f"does not go with the certificate {cert_path} ({e})"
        raise StartupError(source, key_key, key_path, reason)
    return options
