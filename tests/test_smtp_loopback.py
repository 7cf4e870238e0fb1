"""
SMTP over real loopback sockets: Twisted's own SMTP clients against the
server on the real reactor — the MX in clear text, submission with
STARTTLS and AUTH, implicit TLS, and many parallel clients into one mailbox.
"""

from __future__ import annotations

import mailbox
import tempfile
from io import BytesIO
from pathlib import Path

from twisted.internet import defer, protocol, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.mail import smtp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.smtp.server import SMTPFactory, SMTPServer

from .test_smtp_helpers import PASSWORD, cert_paths, make_context, read_inbox

ALICE = "alice@example.test"
BOB = "bob@example.test"


class _Watched(SMTPServer):
    def connectionMade(self):
        super().connectionMade()
        self.nodelay = self.transport.getTcpNoDelay()
        self.factory.sessions.append(self)

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.factory.closed += 1
        waiting, self.factory.waiting = self.factory.waiting, []
        for d in waiting:
            d.callback(None)


class _WatchedFactory(SMTPFactory):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sessions: list[SMTPServer] = []
        self.closed = 0
        self.waiting: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        p = _Watched(self.context, self.submission, self.implicit_tls)
        p.factory = self
        return p

    @defer.inlineCallbacks
    def all_closed(self):
        while self.closed < len(self.sessions):
            d = defer.Deferred()
            self.waiting.append(d)
            yield d


def _client_tls() -> ssl.IOpenSSLClientConnectionCreator:
    cert, _ = cert_paths()
    root = ssl.Certificate.loadPEM(cert.read_bytes())
    return ssl.optionsForClientTLS("localhost", trustRoot=root)


class _LineClient(protocol.Protocol):
    """Sends bytes, collects everything, fires when the server closes."""

    def __init__(self, to_send: bytes) -> None:
        self.to_send = to_send
        self.received = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.to_send)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


class SMTPLoopbackTests(unittest.TestCase):
    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="smtp-loop-"))

    def listen(self, ctx, submission=False, implicit_tls=False) -> tuple[_WatchedFactory, int]:
        factory = _WatchedFactory(ctx, submission, implicit_tls)
        if submission:
            from mailsrv.smtp.server import register_avatars

            register_avatars(ctx)
        wrapped = TLSMemoryBIOFactory(ctx.tls, False, factory) if implicit_tls else factory
        port = self.reactor.listenTCP(0, wrapped, interface="127.0.0.1")
        self.addCleanup(factory.all_closed)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    def send(self, port, sender, rcpts, data) -> defer.Deferred:
        """Send like an MX client: STARTTLS when offered, no AUTH."""
        result: defer.Deferred = defer.Deferred()
        factory = smtp.ESMTPSenderFactory(
            None,
            None,
            sender,
            rcpts,
            BytesIO(data),
            result,
            retries=0,
            contextFactory=_client_tls(),
            requireAuthentication=False,
            requireTransportSecurity=False,
        )
        factory.domain = b"client.test"
        self.reactor.connectTCP("127.0.0.1", port, factory)
        return result

    @defer.inlineCallbacks
    def test_mx_delivers_to_local_users(self):
        ctx = make_context(self.tmp, reactor=self.reactor)
        factory, port = self.listen(ctx)
        body = b"Subject: loop\n\n.a line with a dot\nFrom here\n\xe9 8-bit\n"
        n, results = yield self.send(port, "x@remote.test", [ALICE, BOB], body)
        self.assertEqual(n, 2)
        for user in (ALICE, BOB):
            [msg] = read_inbox(ctx, user)
            self.assertTrue(
                msg.startswith(b"Return-Path: <x@remote.test>\nReceived: from client.test")
            )
            self.assertTrue(msg.endswith(b"\n\n" + body.split(b"\n\n", 1)[1]))
        # TCP_NODELAY on the accepted connection
        self.assertTrue(factory.sessions[0].nodelay)

    @defer.inlineCallbacks
    def test_mx_refuses_relay_and_unknown_users(self):
        ctx = make_context(self.tmp, reactor=self.reactor)
        factory, port = self.listen(ctx)
        n, results = yield self.send(
            port,
            "x@remote.test",
            [ALICE, "nobody@example.test", "y@remote.test"],
            b"Subject: x\n\nb\n",
        )
        self.assertEqual(n, 1)
        codes = {addr: code for addr, code, _ in results}
        self.assertEqual(
            codes, {b"alice@example.test": 250, b"nobody@example.test": 550, b"y@remote.test": 554}
        )
        self.assertEqual(ctx.queue.queued, [])
        d = self.send(port, "x@remote.test", ["y@remote.test"], b"x\n")
        yield self.assertFailure(d, smtp.SMTPDeliveryError)

    @defer.inlineCallbacks
    def test_submission_starttls_then_auth(self):
        ctx = make_context(self.tmp, reactor=self.reactor)
        from dataclasses import replace

        ctx = replace(
            ctx, config=replace(ctx.config, auth=replace(ctx.config.auth, cleartext="never"))
        )
        factory, port = self.listen(ctx, submission=True)
        result = defer.Deferred()
        sender = smtp.ESMTPSenderFactory(
            ALICE.encode(),
            PASSWORD.encode(),
            ALICE,
            [BOB, "carol@remote.test"],
            BytesIO(b"Subject: over TLS\n\nsecret\n"),
            result,
            contextFactory=_client_tls(),
            requireAuthentication=True,
            requireTransportSecurity=True,
        )
        self.reactor.connectTCP("127.0.0.1", port, sender)
        n, _ = yield result
        self.assertEqual(n, 2)
        [msg] = read_inbox(ctx, BOB)
        head = msg.split(b"\n\n")[0]
        self.assertIn(b" with ESMTPSA id ", head)
        self.assertIn(b"\t(using TLSv1.", head)
        self.assertIn(b"\nDate: ", head)
        self.assertIn(b"\nMessage-ID: <", head)
        [(s, rcpts, data)] = ctx.queue.queued
        self.assertEqual((s, rcpts), (ALICE, ["carol@remote.test"]))
        self.assertTrue(data.endswith(b"\n\nsecret\n"))

    @defer.inlineCallbacks
    def test_submission_refuses_a_foreign_sender(self):
        ctx = make_context(self.tmp, reactor=self.reactor)
        factory, port = self.listen(ctx, submission=True)
        result = defer.Deferred()
        sender = smtp.ESMTPSenderFactory(
            ALICE.encode(),
            PASSWORD.encode(),
            BOB,
            [BOB],
            BytesIO(b"x\n"),
            result,
            contextFactory=_client_tls(),
            requireTransportSecurity=True,
            retries=0,
        )
        self.reactor.connectTCP("127.0.0.1", port, sender)
        err = yield self.assertFailure(result, smtp.SMTPDeliveryError)
        self.assertEqual(err.code, 553)
        self.assertEqual(read_inbox(ctx, BOB), [])

    @defer.inlineCallbacks
    def test_submissions_implicit_tls(self):
        ctx = make_context(self.tmp, reactor=self.reactor)
        factory, port = self.listen(ctx, submission=True, implicit_tls=True)
        result = defer.Deferred()
        sender = smtp.ESMTPSenderFactory(
            ALICE.encode(),
            PASSWORD.encode(),
            ALICE,
            [BOB],
            BytesIO(b"Subject: 465\n\nhi\n"),
            result,
            requireAuthentication=True,
            requireTransportSecurity=False,
        )
        endpoint = wrapClientTLS(_client_tls(), TCP4ClientEndpoint(self.reactor, "127.0.0.1", port))
        yield endpoint.connect(sender)
        n, _ = yield result
        self.assertEqual(n, 1)
        [msg] = read_inbox(ctx, BOB)
        self.assertIn(b" with ESMTPSA id ", msg)
        self.assertIn(b"\t(using TLSv1.", msg)

    @defer.inlineCallbacks
    def test_garbage_and_long_lines_over_a_socket(self):
        ctx = make_context(self.tmp, reactor=self.reactor, max_errors=3)
        factory, port = self.listen(ctx)
        client = _LineClient(
            b"EHLO c\r\nNOOP " + b"x" * 5000 + b"\r\nNOOP\r\nfoo\r\nbar\r\nbaz\r\nNOOP\r\n"
        )
        yield protocol.ClientCreator(self.reactor, lambda: client).connectTCP("127.0.0.1", port)
        received = yield client.done
        codes = [line[:9] for line in received.split(b"\r\n") if line[3:4] == b" "]
        self.assertEqual(
            codes,
            [
                b"220 mx.ex",
                b"250 START",
                b"500 5.5.6",
                b"250 2.0.0",
                b"500 5.5.2",
                b"500 5.5.2",
                b"421 4.7.0",
            ],
        )

    @defer.inlineCallbacks
    def test_many_parallel_clients_into_one_mbox(self):
        """Every message stored exactly once, with fsync, through the real mbox store."""
        from mailsrv.store.mbox import MboxMailStore

        pool = ThreadPool(minthreads=1, maxthreads=8, name="smtp-test-disk")
        pool.start()
        self.addCleanup(pool.stop)
        data_dir = self.tmp
        (data_dir / "mail").mkdir()
        (data_dir / "index").mkdir()
        store = MboxMailStore(data_dir / "mail", data_dir / "index", self.reactor, pool)
        ctx = make_context(data_dir, reactor=self.reactor, store=store, threadpool=pool)
        factory, port = self.listen(ctx)
        count = 40
        sends = [
            self.send(
                port, f"s{i}@remote.test", [ALICE], f"Subject: n{i}\n\nmessage {i}\n".encode()
            )
            for i in range(count)
        ]
        results = yield defer.gatherResults(sends)
        self.assertEqual([n for n, _ in results], [1] * count)
        box = mailbox.mbox(
            str(data_dir / "mail" / "example.test" / "alice" / "INBOX"), create=False
        )
        subjects = sorted(m["Subject"] for m in box)
        box.close()
        self.assertEqual(subjects, sorted(f"n{i}" for i in range(count)))

    @defer.inlineCallbacks
    def test_large_message_spills_to_the_spool_and_arrives_whole(self):
        from mailsrv.store.mbox import MboxMailStore

        pool = ThreadPool(minthreads=1, maxthreads=4, name="smtp-test-disk")
        pool.start()
        self.addCleanup(pool.stop)
        (self.tmp / "mail").mkdir()
        (self.tmp / "index").mkdir()
        store = MboxMailStore(self.tmp / "mail", self.tmp / "index", self.reactor, pool)
        ctx = make_context(self.tmp, reactor=self.reactor, store=store, threadpool=pool)
        factory, port = self.listen(ctx)
        body = b"".join(b"%07d " % i + b"x" * 90 + b"\n" for i in range(20000))  # ~2 MB
        body += b"From the middle\n.dot\n\xff\xfe binary-ish\n"
        n, _ = yield self.send(port, "big@remote.test", [ALICE, BOB], b"Subject: big\n\n" + body)
        self.assertEqual(n, 2)
        for user in (ALICE, BOB):
            folder = yield store.open_folder(user, "INBOX")
            [info] = folder.messages()
            with folder.open_message(info.uid) as f:
                data = f.read().replace(b"\r\n", b"\n")
            folder.close()
            self.assertTrue(data.endswith(b"\nSubject: big\n\n" + body))
        self.assertEqual(list((self.tmp / "tmp").glob("*")), [])

    @defer.inlineCallbacks
    def test_a_client_that_does_not_read_is_not_buffered_without_bound(self):
        from twisted.internet import task

        ctx = make_context(self.tmp, reactor=self.reactor)
        factory, port = self.listen(ctx)
        count = 200_000  # 1.2 MB of commands, 3.4 MB of replies

        class Flooder(protocol.Protocol):
            received = b""

            def connectionMade(self):
                self.transport.pauseProducing()  # read nothing for now
                self.transport.write(b"NOOP\r\n" * count + b"QUIT\r\n")

            def dataReceived(self, data):
                self.received += data

            def connectionLost(self, reason):
                self.done.callback(None)

        client = Flooder()
        client.done = defer.Deferred()
        yield protocol.ClientCreator(self.reactor, lambda: client).connectTCP("127.0.0.1", port)
        for _ in range(200):
            if factory.sessions and factory.sessions[0]._paused_transport:
                break
            yield task.deferLater(self.reactor, 0.02, lambda: None)
        session = factory.sessions[0]
        self.assertTrue(session._paused_transport)
        self.assertTrue(session._write_blocked)
        server_out = session.transport
        buffered = len(server_out.dataBuffer) + server_out._tempDataLen
        self.assertLess(buffered, 1_000_000)
        client.transport.resumeProducing()
        yield client.done
        self.assertEqual(client.received.count(b"250 2.0.0 OK\r\n"), count)
        self.assertTrue(client.received.endswith(b"221 2.0.0 Bye\r\n"))

    @defer.inlineCallbacks
    def test_bare_cr_or_lf_in_data_is_refused(self):
        """
        RFC 5321 2.3.8: a bare CR or LF in DATA (here hiding a second message
        behind "\\r.\\r\\n", which a lenient next hop would take as the end) is
        refused with 550 5.6.0 on submission and on the MX; the session goes on.
        """
        import base64

        for submission, rcpt, body in (
            (True, b"carol@remote.test", b"part 3\r.\r\nMAIL FROM:<alice@example.test>\r\n"),
            (False, ALICE.encode(), b"a bare\nLF\r\n"),
        ):
            ctx = make_context(self.tmp, reactor=self.reactor)
            factory, port = self.listen(ctx, submission=submission)
            login = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
            client = _LineClient(
                b"EHLO c\r\n"
                + (b"AUTH PLAIN " + login + b"\r\n" if submission else b"")
                + b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<"
                + rcpt
                + b">\r\nDATA\r\nSubject: x\r\n\r\npart 1\r\n"
                + body
                + b"RCPT TO:<victim@remote.test>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\nQUIT\r\n"
            )
            yield protocol.ClientCreator(self.reactor, lambda c=client: c).connectTCP(
                "127.0.0.1", port
            )
            received = yield client.done
            codes = [line[:9] for line in received.split(b"\r\n") if line[3:4] == b" "]
            self.assertEqual(
                codes[-4:], [b"354 End d", b"550 5.6.0", b"250 2.0.0", b"221 2.0.0"], received
            )
            self.assertIn(b"bare CR or LF", received)
            self.assertEqual(ctx.queue.queued, [])
            self.assertEqual(read_inbox(ctx, ALICE), [])
