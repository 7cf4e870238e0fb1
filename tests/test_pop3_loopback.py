"""
POP3 over real loopback sockets: Python's poplib (in a thread) against the
server on the real reactor, in clear text, after STLS and over implicit TLS.
"""

from __future__ import annotations

import poplib
import shutil
import socket
import ssl
import tempfile
import time
from functools import partial
from pathlib import Path

from twisted.internet import defer, threads
from twisted.mail.interfaces import IMailboxPOP3
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv import tls
from mailsrv.pop3 import POP3Factory, POP3Server, open_maildrop
from mailsrv.store.mbox import MboxMailStore

from .test_pop3_support import ALICE, PASSWORD, deliver, make_ctx


class _Watched(POP3Server):
    def connectionMade(self):
        super().connectionMade()
        tcp = getattr(self.transport, "transport", None) or self.transport  # under TLS
        sock = tcp.getHandle()
        self.factory.nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.factory.lost.append(self)
        waiting, self.factory.waiting = self.factory.waiting, []
        for d in waiting:
            d.callback(None)


class _Server(unittest.TestCase):
    """A POP3 server on 127.0.0.1 (plain and implicit TLS) and a thread for poplib."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ctx = make_ctx(self.tmp, cleartext="never")
        self.ctx.reactor = reactor
        self.pool = ThreadPool(1, 4, name="test-pop3-disk")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.ctx.threadpool = self.pool
        self.ctx.passwords._reactor = reactor
        self.ctx.passwords._pool = self.pool
        self.ctx.portal.checkers[next(iter(self.ctx.portal.checkers))]._clock = reactor
        self.ctx.tls = tls.server_options(self.ctx.config)
        self.clients = ThreadPool(1, 2, name="test-pop3-client")
        self.clients.start()
        self.addCleanup(self.clients.stop)
        from mailsrv.pop3 import pop3_factory

        base = pop3_factory(self.ctx)
        self.factory = POP3Factory(self.ctx, base.locks)
        self.factory.protocol = _Watched
        self.factory.buildProtocol = self._build
        self.factory.lost, self.factory.waiting, self.built = [], [], 0
        self.factory.nodelay = []
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        tls_factory = TLSMemoryBIOFactory(self.ctx.tls, False, self.factory)
        self.tls_port = reactor.listenTCP(0, tls_factory, interface="127.0.0.1")
        self.addCleanup(self.tls_port.stopListening)
        self.client_tls = ssl.create_default_context()
        self.client_tls.check_hostname = False
        self.client_tls.verify_mode = ssl.CERT_NONE

    def _build(self, addr):
        p = _Watched(self.ctx, self.factory.locks)
        p.factory = self.factory
        self.built += 1
        return p

    def in_client(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.clients, f, *args)

    @defer.inlineCallbacks
    def all_closed(self):
        while len(self.factory.lost) < self.built:
            d = defer.Deferred()
            self.factory.waiting.append(d)
            yield d


class POP3LoopbackTests(_Server):
    """On the in-memory store."""

    def test_retr_many_and_quit_deletes(self):
        return self.retr_many_and_quit_deletes(use_tls=True)

    def test_retr_many_in_clear_text(self):
        # Loopback may log in without TLS; replies then go straight to the socket.
        self.ctx.config = make_ctx(self.tmp / "clear", cleartext="loopback").config
        return self.retr_many_and_quit_deletes(use_tls=False)

    @defer.inlineCallbacks
    def retr_many_and_quit_deletes(self, use_tls):
        n = 500
        for i in range(n):
            deliver(self.ctx, b"Subject: %d\n\n%s.leading dot\n" % (i, (b"x" * 76 + b"\n") * 50))
        port = self.port.getHost().port

        def client():
            p = poplib.POP3("127.0.0.1", port, timeout=30)
            if use_tls:
                p.stls(self.client_tls)  # cleartext = never: TLS first
            p.user(ALICE)
            p.pass_(PASSWORD)
            count, size = p.stat()
            got = []
            start = time.perf_counter()
            for i in range(1, count + 1):
                _, lines, octets = p.retr(i)
                got.append((lines, octets))
            elapsed = time.perf_counter() - start
            for i in range(1, count + 1, 2):
                p.dele(i)
            p.quit()
            return count, size, got, elapsed

        count, size, got, elapsed = yield self.in_client(client)
        self.assertEqual(count, n)
        # A loose floor that a loaded machine still meets (about 0.1 s when idle);
        # replies held back by Nagle's algorithm would cost ~40 ms each (20 s).
        self.assertLess(elapsed, 8.0)
        self.assertTrue(self.factory.nodelay and all(self.factory.nodelay))
        for i, (lines, octets) in enumerate(got):
            self.assertEqual(lines[0], b"Subject: %d" % i)
            self.assertEqual(lines[-1], b".leading dot")  # poplib un-stuffs
            self.assertEqual(len(lines), 53)
            self.assertEqual(octets, sum(len(x) + 2 for x in lines))  # poplib counts unstuffed
        self.assertEqual(sum(len(b"\r\n".join(lines)) + 2 for lines, _ in got), size)
        left = self.ctx.store._folders[(ALICE, "INBOX")].messages
        self.assertEqual(len(left), n // 2)
        self.assertTrue(left[0].data.startswith(b"Subject: 1\n"))
        yield self.all_closed()

    @defer.inlineCallbacks
    def test_cleartext_refused_then_implicit_tls(self):
        deliver(self.ctx, b"Subject: hi\n\nhello\n")
        port, tls_port = self.port.getHost().port, self.tls_port.getHost().port

        def client():
            p = poplib.POP3("127.0.0.1", port, timeout=30)
            caps = p.capa()
            try:
                p.user(ALICE)
            except poplib.error_proto as e:
                refused = e.args[0]
            p.quit()
            s = poplib.POP3_SSL("127.0.0.1", tls_port, context=self.client_tls, timeout=30)
            s.user(ALICE)
            s.pass_(PASSWORD)
            stat = s.stat()
            msg = s.retr(1)[1]
            s.quit()
            return caps, refused, stat, msg

        caps, refused, stat, msg = yield self.in_client(client)
        self.assertIn("STLS", caps)
        self.assertNotIn("USER", caps)
        self.assertTrue(refused.startswith(b"-ERR [AUTH] Plaintext authentication disallowed"))
        self.assertEqual(stat[0], 1)
        self.assertEqual(msg, [b"Subject: hi", b"", b"hello"])
        self.assertEqual(len(self.factory.nodelay), 2)
        self.assertTrue(all(self.factory.nodelay))  # pop3s too, under the TLS layer
        yield self.all_closed()


class MboxServer(_Server):
    """The same server on the real mbox store."""

    def setUp(self):
        super().setUp()
        self.ctx.store = MboxMailStore(
            self.tmp / "mail", self.tmp / "index", self.reactor, self.pool
        )
        self.ctx.config = make_ctx(self.tmp / "clear", cleartext="loopback").config
        # The realm's POP3 factory was bound to the old store: register again.
        self.ctx.portal.realm.register(
            IMailboxPOP3, partial(open_maildrop, self.ctx.store, self.factory.locks)
        )


class POP3MboxTests(MboxServer):
    """What QUIT leaves on disk."""

    @defer.inlineCallbacks
    def test_delivery_during_session_survives_quit(self):
        import mailbox

        from mailsrv.spool import BytesSource

        store = self.ctx.store
        for i in range(20):
            yield store.deliver(
                ALICE, BytesSource(b"Subject: %d\n\nbody %d\n>From x\n" % (i, i)), "s@remote.test"
            )
        port = self.port.getHost().port
        reactor = self.reactor

        def client():
            p = poplib.POP3("127.0.0.1", port, timeout=30)
            p.user(ALICE)
            p.pass_(PASSWORD)
            count = p.stat()[0]
            uidls = p.uidl()[1]
            bodies = [p.retr(i)[1] for i in range(1, count + 1)]
            for i in range(1, count + 1, 2):
                p.dele(i)
            # Mail arrives while the session is open.
            threads.blockingCallFromThread(
                reactor, store.deliver, ALICE, BytesSource(b"Subject: late\n\nlate\n"), "s@x.test"
            )
            count_after = p.stat()[0]
            p.quit()
            return count, uidls, bodies, count_after

        count, uidls, bodies, count_after = yield self.in_client(client)
        self.assertEqual(count, 20)
        self.assertEqual(count_after, 10)  # the snapshot: 20 - 10 marked, none added
        self.assertEqual(bodies[3][-1], b">From x")  # mboxrd unquoted once
        self.assertEqual(len(set(uidls)), 20)
        yield self.all_closed()
        box = mailbox.mbox(str(self.tmp / "mail" / "example.test" / "alice" / "INBOX"))
        subjects = [m["Subject"] for m in box]
        box.close()
        self.assertEqual(subjects, [str(i) for i in range(1, 20, 2)] + ["late"])

        def again():
            p = poplib.POP3("127.0.0.1", port, timeout=30)
            p.user(ALICE)
            p.pass_(PASSWORD)
            u = p.uidl()[1]
            p.quit()
            return u

        after = yield self.in_client(again)
        # The survivors keep their UIDLs.
        kept = {line.split()[1] for line in uidls[1::2]}
        self.assertEqual({line.split()[1] for line in after[:-1]}, kept)
        yield self.all_closed()
