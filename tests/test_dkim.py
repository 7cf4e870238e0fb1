"""
DKIM signing (L{mailsrv.dkim}): ``mailsrv dkim keygen`` writes the key and
prints its TXT record; mail an authenticated user submits, and our own
DSNs, are queued signed by the From: domain's key, and the signature
verifies with dkimpy (and opendkim reads our keys); relayed and forwarded
mail is queued as it came.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dkim
import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from mailsrv.cli import main
from mailsrv.config import ConfigError, load, parse
from mailsrv.dkim.keys import SigningKey, load_key
from mailsrv.dkim.signer import DkimSigner, load_signer, signature
from mailsrv.localdelivery import LocalDelivery
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.service import build_context
from mailsrv.spool import BytesSource
from mailsrv.startup import StartupError
from mailsrv.store.memory import MemoryMailStore
from tests.conftest import MISSING_PEER

from .test_addresses_smtp import ALICE, Server, send
from .test_smtp_helpers import PASSWORD, Passwords, _result

KEY_TYPES = ("ed25519", "rsa")


def keygen(config: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--config", str(config), "dkim", "keygen", *args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def config_file(tmp_path: Path, dkim: str = "") -> Path:
    p = tmp_path / "etc" / "mailsrv.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f'[server]\ndomains = ["example.test"]\ndata_dir = "../data"\n{dkim}')
    return p


def published(output: str) -> tuple[str, str]:
    """The (name, TXT record) keygen printed."""
    name = re.search(r"publish this TXT record at (\S+):", output)
    assert name is not None, output
    return name.group(1), output.strip().splitlines()[-1]


def dnsfunc(name: str, record: str):
    """A TXT lookup answering C{record} at C{name} only."""

    def lookup(qname: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if qname.decode().rstrip(".") == name else None

    return lookup


# --- keygen ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_keygen_writes_a_private_key_and_prints_its_txt_record(tmp_path, kind):
    cfg = config_file(tmp_path)
    code, out, err = keygen(cfg, "example.test", "--type", kind)
    assert (code, err) == (0, "")
    path = (tmp_path / "data" / "dkim" / "example.test.mail.key").resolve()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert f'keys = {{ "example.test" = "{path}" }}' in out  # what to add to the config
    name, record = published(out)
    assert name == "mail._domainkey.example.test"
    assert re.fullmatch(rf"v=DKIM1; k={kind}; p=[A-Za-z0-9+/]+=*", record)
    # The key read back is the one published.
    assert load_key(path, "example.test", "mail").txt_record() == record
    # The zone file line: the same record in strings a zone file takes.
    zone = re.search(r"^mail\._domainkey\.example\.test\. IN TXT \( (.*) \)$", out, re.M)
    assert zone is not None, out
    strings = re.findall(r'"([^"]*)"', zone.group(1))
    assert "".join(strings) == record
    assert all(len(s) <= 255 for s in strings)
    assert len(strings) == (2 if kind == "rsa" else 1)


def test_keygen_writes_where_the_config_names_the_key_and_never_overwrites(tmp_path):
    cfg = config_file(tmp_path, '[dkim]\nkeys = { "example.test" = "keys/ex.key" }\n')
    code, out, _ = keygen(cfg, "example.test", "--selector", "s2026", "--type", "rsa")
    path = cfg.parent / "keys" / "ex.key"
    assert code == 0 and path.exists() and "keys = " not in out
    assert 'selector = "s2026"' in out  # the config's selector must match
    assert published(out)[0] == "s2026._domainkey.example.test"
    first = path.read_bytes()
    code, _, err = keygen(cfg, "example.test")
    assert code == 1 and "exists" in err and "--force" in err
    assert path.read_bytes() == first
    assert keygen(cfg, "example.test", "--force")[0] == 0
    assert path.read_bytes() != first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_keygen_refuses_a_domain_that_is_not_local(tmp_path):
    cfg = config_file(tmp_path)
    code, _, err = keygen(cfg, "elsewhere.test")
    assert code == 1 and "not a local domain" in err
    assert not (tmp_path / "data" / "dkim").exists()


def test_an_unusable_key_stops_the_start_naming_the_key(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    config = parse(f'[dkim]\nkeys = {{ "example.test" = "{bad}" }}\n', "<test>", tmp_path)
    with pytest.raises(StartupError) as e:
        load_signer(config, defer.maybeDeferred)
    assert 'dkim.keys."example.test"' in str(e.value)


def test_the_server_context_signs_with_the_configured_keys(tmp_path):
    cfg = config_file(tmp_path, '[dkim]\nkeys = { "example.test" = "dkim/example.test.key" }\n')
    assert keygen(cfg, "example.test")[0] == 0
    ctx = build_context(load(cfg), MemoryReactorClock())
    assert isinstance(ctx.dkim, DkimSigner)
    assert list(ctx.dkim.keys) == ["example.test"]
    assert ctx.dkim.keys["example.test"].kind == "rsa"  # the default type


# --- signing submitted mail -----------------------------------------------------------


def signing_server(tmp_path: Path, kind: str) -> tuple[Server, str]:
    """The address-rules server with a key for example.test; the TXT record."""
    cfg = config_file(tmp_path)
    code, out, _ = keygen(cfg, "example.test", "--type", kind)
    assert code == 0
    srv = Server(tmp_path)
    path = tmp_path / "data" / "dkim" / "example.test.mail.key"
    signer = DkimSigner({"example.test": load_key(path, "example.test", "mail")}, inline)
    srv.ctx = dataclasses.replace(srv.ctx, dkim=signer)
    return srv, published(out)[1]


def inline(f: Any) -> defer.Deferred:
    return defer.maybeDeferred(f)


SUBMITTED = (
    "From: Alice <alice@example.test>\nTo: dave@remote.test\nSubject: hello\n"
    "Date: Sun, 06 Dec 2026 16:00:00 +0000\nMessage-ID: <1@example.test>\n\n"
    "Hello Dave,  \n\nsee you.\n"
)


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_submitted_mail_is_queued_with_a_signature_that_verifies(tmp_path, kind):
    srv, record = signing_server(tmp_path, kind)
    replies = send(srv.submission(), ALICE, ["dave@remote.test"], SUBMITTED)
    assert replies[-1].startswith("250 2.0.0 ")
    [(_, data)] = srv.queued()
    assert data.startswith(
        b"DKIM-Signature: v=1; a=" + (b"ed25519" if kind == "ed25519" else b"rsa")
    )
    wire = data.replace(b"\n", b"\r\n")  # as the relayer sends it
    lookup = dnsfunc("mail._domainkey.example.test", record)
    assert dkim.verify(wire, dnsfunc=lookup)
    d = dkim.DKIM(wire)
    assert d.verify(dnsfunc=lookup)
    sig = dict(d.signature_fields)
    assert sig[b"d"] == b"example.test" and sig[b"s"] == b"mail"
    assert sig[b"c"] == b"relaxed/relaxed"
    signed = [h.strip() for h in sig[b"h"].split(b":")]
    assert signed.count(b"from") == 2  # oversigned: no From: can be added
    assert {b"to", b"subject", b"date", b"message-id"} <= set(signed)
    # A changed body no longer verifies.
    assert not dkim.verify(wire.replace(b"see you", b"see yov"), dnsfunc=lookup)
    # Nor an added From: field.
    assert not dkim.verify(b"From: mallory@evil.test\r\n" + wire, dnsfunc=lookup)


def test_local_copies_are_not_signed(tmp_path):
    srv, _ = signing_server(tmp_path, "ed25519")
    send(srv.submission(), ALICE, ["bob@example.test", "dave@remote.test"], SUBMITTED)
    [stored] = srv.inbox("bob@example.test")
    assert b"DKIM-Signature" not in stored
    [(_, queued)] = srv.queued()
    assert queued.startswith(b"DKIM-Signature: ")


def test_mail_from_a_domain_without_a_key_is_queued_unsigned(tmp_path):
    srv, _ = signing_server(tmp_path, "ed25519")
    signer = srv.ctx.dkim
    assert signer is not None
    other = SUBMITTED.replace("alice@example.test", "alice@other.test").encode()
    assert signature(other, signer.keys) is None
    two_froms = b"From: alice@example.test\n" + SUBMITTED.encode()
    assert signature(two_froms, signer.keys) is None  # RFC 5322 3.6: one From: only
    assert signature(SUBMITTED.encode(), signer.keys) is not None


def test_mail_relayed_through_an_alias_is_not_signed_again(tmp_path):
    srv, record = signing_server(tmp_path, "ed25519")
    # Mail from outside claiming our domain, and mail signed elsewhere: the
    # MX forwards both as they came.
    send(srv.mx(), "carol@origin.test", ["outside@example.test"], SUBMITTED)
    key = _other_key(tmp_path)
    theirs = signature(_ORIGIN.encode(), {"origin.test": key})
    assert theirs is not None
    send(srv.mx(), "carol@origin.test", ["outside@example.test"], theirs.decode() + _ORIGIN)
    first, second = sorted(srv.queued(), key=lambda q: q[0].created)[:2]
    assert b"DKIM-Signature" not in first[1].split(b"\n\n")[0]
    head = second[1].split(b"\n\n")[0]
    assert head.count(b"DKIM-Signature") == 1 and b"d=origin.test" in head
    # The original signature still verifies after forwarding.
    lookup = dnsfunc("mail._domainkey.origin.test", key.txt_record())
    assert dkim.verify(second[1].replace(b"\n", b"\r\n"), dnsfunc=lookup)


_ORIGIN = "From: carol@origin.test\nTo: outside@example.test\nSubject: hi\n\nbody\n"


def _other_key(tmp_path: Path) -> SigningKey:
    cfg = config_file(tmp_path / "origin")
    cfg.write_text(cfg.read_text().replace("example.test", "origin.test"))
    assert keygen(cfg, "origin.test")[0] == 0
    return load_key(
        tmp_path / "origin" / "data" / "dkim" / "origin.test.mail.key", "origin.test", "mail"
    )


def test_a_large_message_is_signed_too(tmp_path):
    srv, record = signing_server(tmp_path, "rsa")
    body = "".join(f"line {i} of a long message\n" for i in range(20_000))  # > SMALL
    send(srv.submission(), ALICE, ["dave@remote.test"], SUBMITTED + body)
    [(_, data)] = srv.queued()
    lookup = dnsfunc("mail._domainkey.example.test", record)
    assert dkim.verify(data.replace(b"\n", b"\r\n"), dnsfunc=lookup)


# --- DSNs -----------------------------------------------------------------------------


def test_a_dsn_from_a_local_domain_with_a_key_is_signed(tmp_path):
    cfg = config_file(tmp_path)
    code, out, _ = keygen(cfg, "example.test")
    assert code == 0
    key = tmp_path / "data" / "dkim" / "example.test.mail.key"
    clock = MemoryReactorClock()
    clock.advance(1_780_100_000.0)
    config = parse(f"""
[server]
hostname = "mx.example.test"
domains = ["example.test", "other.test"]
data_dir = "{tmp_path / "data"}"
[dkim]
keys = {{ "example.test" = "{key}" }}
""")
    queue = OutboundQueue(config.queue_dir, clock, None)
    relayer = build_relayer(
        config,
        queue=queue,
        reactor=clock,
        threadpool=None,
        resolver=_GoneDomain(),
        mailboxes=LocalDelivery(MemoryMailStore(clock=clock.seconds)),
        passwords=Passwords({ALICE: PASSWORD}),
    )
    first = _result(
        queue.enqueue("carol@origin.test", ["dave@gone.test"], BytesSource(b"Subject: x\n\nbody\n"))
    )
    _result(relayer.start())
    qs = QueueStore(config.queue_dir)
    [dsn] = [qs.load_envelope(q) for q in qs.ids() if q != first]
    data = qs.read_message(dsn)
    # From: MAILER-DAEMON@mx.example.test, signed by its domain's key.
    assert data.startswith(b"DKIM-Signature: ") and b"d=example.test;" in data
    lookup = dnsfunc("mail._domainkey.example.test", published(out)[1])
    assert dkim.verify(data.replace(b"\n", b"\r\n"), dnsfunc=lookup)
    _result(relayer.stop())


class _GoneDomain:
    """gone.test does not exist; other lookups time out (the DSN stays queued)."""

    def resolve(self, domain: str) -> defer.Deferred:
        if domain == "gone.test":
            return defer.fail(DeliveryError(True, "5.1.2", f"no such domain {domain}"))
        return defer.fail(DeliveryError(False, "4.4.3", f"MX lookup for {domain} timed out"))


# --- opendkim -------------------------------------------------------------------------


def test_opendkim_signs_with_our_key_file_what_our_txt_record_verifies(tmp_path):
    # opendkim-testmsg verifies through live DNS only (no loopback name
    # server can be given to it); it signs with a key file: our key files
    # are the ones opendkim reads, and the TXT record printed matches them.
    # (Debian's opendkim-testmsg 2.11 signs with RSA only.)
    program = shutil.which("opendkim-testmsg")
    if program is None:
        pytest.skip(f"opendkim-testmsg (opendkim-tools) {MISSING_PEER}")
    cfg = config_file(tmp_path)
    code, out, _ = keygen(cfg, "example.test", "--type", "rsa")
    key = tmp_path / "data" / "dkim" / "example.test.mail.key"
    message = SUBMITTED.replace("\n", "\r\n").encode()
    run = subprocess.run(
        [program, "-d", "example.test", "-s", "mail", "-k", str(key), "-C", "-t", str(tmp_path)],
        input=message,
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    signed = run.stdout
    assert signed.startswith(b"DKIM-Signature:")
    lookup = dnsfunc("mail._domainkey.example.test", published(out)[1])
    assert dkim.verify(signed, dnsfunc=lookup)


def test_a_message_that_cannot_be_signed_is_queued_unsigned_and_logged(tmp_path):
    srv, _ = signing_server(tmp_path, "ed25519")
    signer = srv.ctx.dkim
    assert signer is not None
    broken = dataclasses.replace(signer.keys["example.test"], private=b"not a key")
    srv.ctx = dataclasses.replace(srv.ctx, dkim=DkimSigner({"example.test": broken}, inline))
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        replies = send(srv.submission(), ALICE, ["dave@remote.test"], SUBMITTED)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert replies[-1].startswith("250 2.0.0 ")
    [(_, data)] = srv.queued()
    assert data.startswith(b"Received: ") and b"DKIM-Signature" not in data
    assert any("DKIM signing failed" in formatEvent(e) for e in seen)


def test_the_dkim_section_is_checked_and_key_paths_are_relative_to_the_config(tmp_path):
    config = parse('[dkim]\nkeys = { "Example.TEST" = "dkim/ex.key" }\n', "<test>", tmp_path)
    assert config.dkim.keys == {"example.test": tmp_path / "dkim" / "ex.key"}
    assert config.dkim.selector == "mail"
    with pytest.raises(ConfigError) as e:
        parse('[dkim]\nkeys = "dkim/ex.key"\nselector = "a_b"\n', "<test>", tmp_path)
    assert len(e.value.errors) == 2
    assert any(err.startswith("dkim.keys:") for err in e.value.errors)
    assert any(err.startswith("dkim.selector:") for err in e.value.errors)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_keygen_run_as_root_gives_the_key_to_the_data_folders_owner():
    # Run as root, the command becomes the data folder's owner (mailsrv.adminaccount):
    # in a process of its own, in a folder that user can enter.
    tmp_path = Path(tempfile.mkdtemp(prefix="mailsrv-dkim-"))
    try:
        tmp_path.chmod(0o755)
        _keygen_as_the_owner(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _keygen_as_the_owner(tmp_path: Path) -> None:
    cfg = config_file(tmp_path)
    (tmp_path / "data").mkdir()
    os.chown(tmp_path / "data", 4321, 4321)  # the server's user
    r = subprocess.run(
        [sys.executable, "-m", "mailsrv", "--config", str(cfg), "dkim", "keygen", "example.test"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "data" / "dkim"
    key = folder / "example.test.mail.key"
    assert (os.stat(folder).st_uid, os.stat(key).st_uid) == (4321, 4321)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
