"""
Deadlines a client cannot stretch: a TLS handshake (implicit TLS, or after
STARTTLS/STLS) must finish in time, an SMTP command line and an IMAP
literal must arrive in time however slowly they trickle in. Unit tests on a
task.Clock, and one run of the real daemon with a short timeout.
"""

from __future__ import annotations

import concurrent.futures
import select
import socket
import ssl
import time

from twisted.internet.interfaces import IHandshakeListener, ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailsrv.deadline import HANDSHAKE_TIMEOUT, handshake_timeout
from tests.e2e import MailServer
from tests.test_smtp_helpers import Session, make_context

# --- SMTP: a command line has a total deadline ------------------------------------------


def test_smtp_command_line_trickled_byte_by_byte_times_out():
    ctx = make_context()  # limits.timeout: 300 s
    s = Session(ctx)
    s.send("EHLO c\r\n")
    clock = ctx.reactor
    sent = 0
    for byte in b"NOOP" * 200:  # one byte a second, never a line end
        if s.transport.disconnecting:
            break
        s.proto.dataReceived(bytes([byte]))
        clock.advance(1)
        sent += 1
    assert s.transport.disconnecting
    assert b"421 4.4.2" in s.transport.value()
    assert sent <= 301


def test_smtp_whole_lines_keep_the_session_alive():
    ctx = make_context()
    s = Session(ctx)
    for _ in range(10):
        ctx.reactor.advance(200)
        s.send("NOOP\r\n")
    assert not s.transport.disconnecting


# --- the handshake deadline, on every protocol -------------------------------------------


@implementer(ITLSTransport)
class _TLSTransport(StringTransport):
    """Records startTLS and abortConnection."""

    tls = None
    aborted = False

    def startTLS(self, ctx, normal=True):
        self.tls = ctx

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


def _smtp(implicit_tls: bool):
    from mailsrv.smtp.server import SMTPServer

    ctx = make_context()
    return SMTPServer(ctx, submission=True, implicit_tls=implicit_tls), ctx.reactor


def _pop3(implicit_tls: bool):
    from mailsrv.pop3 import pop3_factory

    ctx = make_context()
    factory = pop3_factory(ctx, implicit_tls=implicit_tls)
    return factory.buildProtocol(None), ctx.reactor


def _imap(implicit_tls: bool):
    from mailsrv.imap.server import IMAPServerFactory

    from .test_imap_harness import make_config

    ctx = make_context()
    factory = IMAPServerFactory(
        config=make_config(ctx.config.server.data_dir),
        store=ctx.store,
        portal=ctx.portal,
        reactor=ctx.reactor,
        run=None,
        tls=ctx.tls,
        implicit_tls=implicit_tls,
    )
    return factory.buildProtocol(None), ctx.reactor


STARTTLS = {_smtp: b"EHLO c\r\nSTARTTLS\r\n", _pop3: b"STLS\r\n", _imap: b"a STARTTLS\r\n"}


def test_every_protocol_provides_the_handshake_listener():
    for make in (_smtp, _pop3, _imap):
        proto, _ = make(False)
        assert IHandshakeListener.providedBy(proto), make


def test_implicit_tls_without_a_handshake_is_cut():
    for make in (_smtp, _pop3, _imap):
        proto, clock = make(True)
        t = _TLSTransport()
        proto.makeConnection(t)
        clock.advance(HANDSHAKE_TIMEOUT - 1)
        assert not t.aborted, make
        clock.advance(1)
        assert t.aborted, make


def test_implicit_tls_with_a_handshake_is_not_cut():
    for make in (_smtp, _pop3, _imap):
        proto, clock = make(True)
        t = _TLSTransport()
        proto.makeConnection(t)
        clock.advance(1)
        proto.handshakeCompleted()
        clock.advance(HANDSHAKE_TIMEOUT)
        assert not t.aborted, make


def test_starttls_without_a_handshake_is_cut():
    for make, command in STARTTLS.items():
        proto, clock = make(False)
        t = _TLSTransport()
        proto.makeConnection(t)
        proto.dataReceived(command)
        assert t.tls is not None, (make, t.value())
        clock.advance(HANDSHAKE_TIMEOUT)
        assert t.aborted, make
        proto.connectionLost(None)


def test_starttls_with_a_handshake_is_not_cut():
    for make, command in STARTTLS.items():
        proto, clock = make(False)
        t = _TLSTransport()
        proto.makeConnection(t)
        proto.dataReceived(command)
        proto.handshakeCompleted()
        clock.advance(HANDSHAKE_TIMEOUT)
        assert not t.aborted, make
        proto.connectionLost(None)


def test_the_deadline_is_at_most_the_idle_timeout():
    assert handshake_timeout(300) == HANDSHAKE_TIMEOUT
    assert handshake_timeout(2) == 2


# --- IMAP: a literal has to make progress ------------------------------------------------


def test_imap_literal_trickled_byte_by_byte_times_out(tmp_path):
    from .test_imap_harness import Harness

    h = Harness(tmp_path)
    c = h.connect()
    c.login()
    timeout = c.proto.POSTAUTH_TIMEOUT  # the idle timeout once logged in
    assert b"+ " in c.send(b"a APPEND INBOX {100000}\r\n")
    out = b""
    for _ in range(2 * timeout):
        if c.transport.disconnecting:
            break
        c.proto.dataReceived(b"x")
        h.clock.advance(1)
    out += c.read()
    assert c.transport.disconnecting
    assert b"BYE" in out


# --- the real daemon, with a short timeout -----------------------------------------------


def _closed_within(socks: dict, seconds: float, trickle: dict) -> dict:
    """
    Seconds until the server closed each socket of C{socks} (None: still open
    after C{seconds}), sending the bytes of C{trickle[name]} one every 0.3 s.
    """
    start = time.monotonic()
    took: dict = {name: None for name in socks}
    pending = dict(trickle)
    for sock in socks.values():
        sock.setblocking(False)
    while time.monotonic() - start < seconds and None in took.values():
        open_ = {s: n for n, s in socks.items() if took[n] is None}
        readable, _, _ = select.select(list(open_), [], [], 0.3)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                took[open_[sock]] = time.monotonic() - start
        for name, rest in pending.items():
            if rest and took[name] is None:
                try:
                    socks[name].send(rest[:1])
                except OSError:
                    took[name] = time.monotonic() - start
                pending[name] = rest[1:]
    return took


def _talk(sock: socket.socket, data: bytes, expect: bytes) -> None:
    sock.settimeout(5)
    if data:
        sock.sendall(data)
    got = b""
    while expect not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk


def test_daemon_cuts_silent_tls_clients_and_trickled_lines(tmp_path):
    srv = MailServer(tmp_path, extra='[limits]\ntimeout = "2s"\n')
    srv.start()
    try:
        ports = srv.ports
        socks = {}
        for name in ("submissions", "pop3s", "imaps", "submission", "pop3", "imap", "smtp"):
            socks[name] = socket.create_connection(("127.0.0.1", ports[name]), timeout=5)
        _talk(socks["submission"], b"EHLO c\r\nSTARTTLS\r\n", b"220 2.0.0")
        _talk(socks["pop3"], b"STLS\r\n", b"+OK Begin")
        _talk(socks["imap"], b"a STARTTLS\r\n", b"a OK")
        _talk(socks["smtp"], b"", b"220 ")
        took = _closed_within(socks, 12, {"smtp": b"NOOP" * 20})
        for sock in socks.values():
            sock.close()
        assert all(t is not None and t < 8 for t in took.values()), (took, srv.output())
    finally:
        srv.stop()


def _tls_session_lasts(
    port: int, starttls: bytes, ready: bytes, noop: bytes, seconds: float
) -> bool:
    """A client that completes its handshake, then sends C{noop} every second for C{seconds}."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    if starttls:
        _talk(raw, b"", b"\r\n")  # the greeting
        _talk(raw, starttls, ready)
    with ctx.wrap_socket(raw) as s:
        s.settimeout(5)
        if not starttls:
            s.recv(4096)  # the greeting
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            s.sendall(noop)
            if not s.recv(4096):
                return False
            time.sleep(1)
    return True


def test_daemon_keeps_tls_sessions_whose_handshake_is_done(tmp_path):
    srv = MailServer(tmp_path, extra='[limits]\ntimeout = "2s"\n')
    srv.start()
    try:
        p = srv.ports
        cases = {
            "submissions": (p["submissions"], b"", b"", b"NOOP\r\n"),
            "pop3s": (p["pop3s"], b"", b"", b"NOOP\r\n"),
            "imaps": (p["imaps"], b"", b"", b"a NOOP\r\n"),
            "submission": (
                p["submission"],
                b"EHLO c\r\nSTARTTLS\r\n",
                b"220 2.0.0 Ready to start TLS\r\n",
                b"NOOP\r\n",
            ),
            "pop3": (p["pop3"], b"STLS\r\n", b"negotiation now.\r\n", b"NOOP\r\n"),
            "imap": (p["imap"], b"a STARTTLS\r\n", b"negotiation now\r\n", b"a NOOP\r\n"),
        }
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            futures = {
                name: pool.submit(_tls_session_lasts, *args, 4.5) for name, args in cases.items()
            }
            lasted = {name: f.result() for name, f in futures.items()}
        assert all(lasted.values()), (lasted, srv.output())
    finally:
        srv.stop()
