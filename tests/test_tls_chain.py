"""
The certificate chain: with ``certificate`` a fullchain file (server
certificate, then the intermediate), a real ``twistd -n mailsrv`` sends the
whole chain, so a client that trusts only the root verifies it, on every
implicit-TLS port and after every STARTTLS.
"""

from __future__ import annotations

import imaplib
import poplib
import shutil
import smtplib
import ssl
import subprocess

import pytest

from tests.certs import make_chain
from tests.e2e import MailServer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("chain")
    chain = make_chain(base / "pki")
    srv = MailServer(
        base,
        extra=f'[tls]\ncertificate = "{chain.fullchain}"\nkey = "{chain.key}"\n',
    )
    with srv:
        yield srv, chain


def client_context(chain) -> ssl.SSLContext:
    """Trusts the root alone; checks the name (127.0.0.1 is in the certificate)."""
    return ssl.create_default_context(cafile=str(chain.root))


def test_implicit_tls_verifies_against_the_root(served):
    srv, chain = served
    with smtplib.SMTP_SSL(
        "127.0.0.1", srv.ports["submissions"], context=client_context(chain), timeout=30
    ) as s:
        assert s.ehlo()[0] == 250
    p = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=client_context(chain), timeout=30)
    assert p.getwelcome().startswith(b"+OK")
    p.quit()
    m = imaplib.IMAP4_SSL(
        "127.0.0.1", srv.ports["imaps"], ssl_context=client_context(chain), timeout=30
    )
    assert m.capability()[0] == "OK"
    m.logout()


def test_starttls_verifies_against_the_root(served):
    srv, chain = served
    for name in ("smtp", "submission"):
        with smtplib.SMTP("127.0.0.1", srv.ports[name], timeout=30) as s:
            s.ehlo("client.test")
            assert s.starttls(context=client_context(chain))[0] == 220
            assert s.ehlo("client.test")[0] == 250
    p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
    assert p.stls(context=client_context(chain)).startswith(b"+OK")
    assert p.capa()
    p.quit()
    m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
    assert m.starttls(ssl_context=client_context(chain))[0] == "OK"
    assert m.capability()[0] == "OK"
    m.logout()


def s_client(srv, chain, port_name: str, starttls: str | None) -> subprocess.CompletedProcess:
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{srv.ports[port_name]}",
        "-servername",
        "mx.example.test",
        "-verify_return_error",
        "-CAfile",
        str(chain.root),
    ]
    if starttls:
        cmd += ["-starttls", starttls]
    return subprocess.run(cmd, input="", capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize(
    "port_name, starttls",
    [
        ("submissions", None),
        ("pop3s", None),
        ("imaps", None),
        ("smtp", "smtp"),
        ("submission", "smtp"),
        ("pop3", "pop3"),
        ("imap", "imap"),
    ],
)
def test_openssl_s_client_verifies_the_chain(served, port_name, starttls):
    srv, chain = served
    r = s_client(srv, chain, port_name, starttls)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Verify return code: 0 (ok)" in r.stdout
    assert "Test Intermediate CA" in r.stdout  # the chain as sent: depth 1 is the intermediate
