"""The server certificate: generated once when none is configured, else loaded."""

import stat

from cryptography import x509

from mailsrv import tls
from mailsrv.config import parse


def test_self_signed_generated_once(tmp_path):
    c = parse('[server]\nhostname = "mx.example.test"\n', base_dir=tmp_path)
    opts = tls.server_options(c)
    cert_path, key_path = tls.self_signed_paths(c)
    assert cert_path.exists() and key_path.exists()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mx.example.test"]
    first = cert_path.read_bytes()
    tls.server_options(c)
    assert cert_path.read_bytes() == first  # not regenerated
    assert opts.getContext() is not None


def test_configured_files_used(tmp_path):
    tls.generate_self_signed("given.example.test", tmp_path / "c.pem", tmp_path / "k.pem")
    c = parse('[tls]\ncertificate = "c.pem"\nkey = "k.pem"\n', base_dir=tmp_path)
    tls.server_options(c)
    assert not (tmp_path / "data" / "tls").exists()
