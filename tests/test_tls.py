"""The server certificate: generated once when none is configured, else loaded."""

import stat

import pytest
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


def test_reload_reads_renewed_files_and_keeps_the_old_ones_on_error(tmp_path):
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from zope.interface.verify import verifyObject

    from tests.certs import make_chain

    first = make_chain(tmp_path / "one")
    c = parse(f'[tls]\ncertificate = "{first.fullchain}"\nkey = "{first.key}"\n', base_dir=tmp_path)
    server = tls.server_options(c)
    verifyObject(IOpenSSLServerConnectionCreator, server)
    before = server.options
    second = make_chain(tmp_path / "two")
    first.fullchain.write_bytes(second.fullchain.read_bytes())
    first.key.write_bytes(second.key.read_bytes())
    assert server.reload() == first.fullchain
    assert server.options is not before
    renewed = server.options
    first.key.write_bytes(make_chain(tmp_path / "three").key.read_bytes())  # not this certificate's
    with pytest.raises(tls.StartupError):
        server.reload()
    assert server.options is renewed


def test_hangup_service_catches_sighup_while_running(tmp_path):
    import os
    import signal

    from mailsrv.hangup import HangupService

    class Reactor:
        def __init__(self):
            self.calls = []

        def callFromThread(self, f, *args):
            self.calls.append(f)

    reactor = Reactor()
    svc = HangupService(tls.server_options(parse("", base_dir=tmp_path)), reactor)
    before = signal.getsignal(signal.SIGHUP)
    svc.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert reactor.calls == [svc.reload]
    finally:
        svc.stopService()
    assert signal.getsignal(signal.SIGHUP) == before
