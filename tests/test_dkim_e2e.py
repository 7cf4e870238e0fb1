"""
End to end: DKIM signing in a real ``twistd -n mailsrv`` and its relay
process, with the other domains' servers on loopback (L{tests.remote_world}):
the key made by ``mailsrv dkim keygen``, a message submitted over SMTP and a
DSN to a sender at another server both arrive there with a signature that
verifies against the TXT record keygen printed; a message the MX forwards
through an alias arrives as it came.
"""

from __future__ import annotations

import smtplib
import ssl

import dkim
import pytest

from tests.e2e import PASSWORD, MailServer
from tests.remote_world import RemoteWorld, Transaction, wait_until

ALICE = "alice@example.test"
DOMAINS = {"remote1.test": "127.0.0.2", "sender.test": "127.0.0.3"}
WAIT = 30.0
CONFIG = (
    "[addresses]\n"
    'aliases = "aliases"\n'
    "[dkim]\n"
    'keys = { "example.test" = "dkim/example.test.key" }\n'
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with RemoteWorld(tmp_path_factory.mktemp("world"), DOMAINS) as w:
        yield w


@pytest.fixture(scope="module")
def server(tmp_path_factory, world):
    base = tmp_path_factory.mktemp("server")
    (base / "aliases").write_text(
        "fwd@example.test: carol@remote1.test\nfwd-gone@example.test: nosuchuser@remote1.test\n"
    )
    srv = MailServer(base, extra=world.relay_config() + CONFIG)
    try:
        srv.add_user(ALICE)
        out = srv.cli("dkim", "keygen", "example.test").stdout
        assert "publish this TXT record at mail._domainkey.example.test:" in out
        srv.record = out.strip().splitlines()[-1]  # type: ignore[attr-defined]
        srv.start()
        yield srv
    finally:
        srv.close()


def lookup(record: str):
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if name == b"mail._domainkey.example.test." else None

    return dnsfunc


def arrived(world: RemoteWorld, since: int, subject: str) -> Transaction:
    def find() -> Transaction | None:
        for t in world.transactions(since):
            if f"Subject: {subject}".encode() in t.data:
                return t
        return None

    found = wait_until(find, WAIT, f"the message {subject!r} at the receiver")
    assert isinstance(found, Transaction)
    return found


def test_submitted_mail_arrives_signed(server, world):
    mark = world.mark()
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.ehlo("client.test")
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo("client.test")
        s.login(ALICE, PASSWORD)
        s.sendmail(
            ALICE,
            ["dave@remote1.test"],
            f"From: Alice <{ALICE}>\r\nTo: dave@remote1.test\r\nSubject: signed e2e\r\n\r\nHi.\r\n",
        )
    t = arrived(world, mark, "signed e2e")
    wire = t.data.replace(b"\n", b"\r\n")
    # Under the receiver's own Received: field.
    assert b"\r\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;" in wire
    assert dkim.verify(wire, dnsfunc=lookup(server.record))
    assert not dkim.verify(wire.replace(b"Hi.", b"Hi!"), dnsfunc=lookup(server.record))


def test_forwarded_mail_is_not_signed_and_a_dsn_is(server, world):
    mark = world.mark()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        s.ehlo("client.sender.test")
        s.sendmail(
            "dave@sender.test",
            ["fwd@example.test", "fwd-gone@example.test"],
            f"From: {ALICE}\r\nTo: fwd@example.test\r\nSubject: forwarded e2e\r\n\r\nHi.\r\n",
        )
    forwarded = arrived(world, mark, "forwarded e2e")
    assert forwarded.recipients == ["carol@remote1.test"]
    assert b"DKIM-Signature" not in forwarded.data  # a From: of ours, but only relayed
    # remote1.test refuses nosuchuser@: the DSN goes back to dave@sender.test, signed.
    dsn = wait_until(
        lambda: [t for t in world.transactions(mark) if t.recipients == ["dave@sender.test"]],
        WAIT,
        "the DSN at sender.test",
    )[0]
    assert dsn.sender == ""
    assert b"d=example.test;" in dsn.data.split(b"\n\n")[0]
    assert dkim.verify(dsn.data.replace(b"\n", b"\r\n"), dnsfunc=lookup(server.record))
