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
    after = signal.getsignal(signal.SIGHUP)
    if before in (signal.SIG_DFL, None):
        # Stopped: a SIGHUP while the process ends does not end it (the default would).
        assert callable(after)
        os.kill(os.getpid(), signal.SIGHUP)
        assert reactor.calls == [svc.reload]
    else:
        assert after == before


def _dns_names(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _logged(events):
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


def test_self_signed_regenerated_when_the_hostname_changes(tmp_path):
    from twisted.logger import globalLogPublisher

    tls.server_options(parse('[server]\nhostname = "old.example.test"\n', base_dir=tmp_path))
    c = parse('[server]\nhostname = "new.example.test"\n', base_dir=tmp_path)
    cert_path, _ = tls.self_signed_paths(c)
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        tls.server_options(c)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert _dns_names(cert_path).get_values_for_type(x509.DNSName) == ["new.example.test"]
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=new.example.test"
    assert "old.example.test" in _logged(events) and "new.example.test" in _logged(events)
    again = cert_path.read_bytes()
    tls.server_options(c)
    assert cert_path.read_bytes() == again  # the name matches now: kept


def test_certificates_mailsrv_did_not_make_are_never_replaced(tmp_path):
    from twisted.logger import globalLogPublisher

    from tests.certs import make_chain

    chain = make_chain(tmp_path / "pki", names=("other.example.test",))
    # An administrator's certificate, configured: left alone.
    c = parse(
        f'[server]\nhostname = "mx.example.test"\n'
        f'[tls]\ncertificate = "{chain.fullchain}"\nkey = "{chain.key}"\n',
        base_dir=tmp_path,
    )
    before = chain.fullchain.read_bytes()
    tls.server_options(c)
    assert chain.fullchain.read_bytes() == before
    # One put in data_dir/tls by hand (not self-signed): kept, with a warning.
    c = parse('[server]\nhostname = "mx.example.test"\n', base_dir=tmp_path)
    cert_path, key_path = tls.self_signed_paths(c)
    cert_path.parent.mkdir(parents=True)
    cert_path.write_bytes(before)
    key_path.write_bytes(chain.key.read_bytes())
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        tls.server_options(c)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert cert_path.read_bytes() == before
    assert "mx.example.test" in _logged(events) and str(cert_path) in _logged(events)
