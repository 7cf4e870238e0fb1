"""
The relayer stopping (SIGTERM of the relay process) while it sends a message
to a real SMTP peer on loopback that is slow to answer the final dot: the
reply is still read and recorded, so the message is not sent again after a
restart; a peer that does not answer within the grace is cut, and the
message stays queued (nothing lost). Both in the relayer alone, and through
the real daemon's relay process on SIGTERM.
"""

from __future__ import annotations

import signal
import smtplib
import ssl as stdlib_ssl

from twisted.internet import defer, protocol, task, threads
from twisted.names import client
from twisted.protocols.basic import LineReceiver
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.config import parse
from mailsrv.outbound import relayer as relayer_module
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.outbound.service import outbound_service
from mailsrv.service import ServerContext
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from tests.e2e import PASSWORD, MailServer
from tests.test_outbound_support import temp_dir

MESSAGE = b"From: alice@example.test\nSubject: slow\n\nbody\n"


class SlowPeer(LineReceiver):
    """An SMTP server that answers the final dot of a message only after C{factory.delay}."""

    delimiter = b"\r\n"
    factory: SlowPeerFactory

    def connectionMade(self) -> None:
        self.lines: list[bytes] | None = None
        self.sendLine(b"220 peer.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.lines is not None:
            if line != b".":
                self.lines.append(line)
                return
            self.factory.messages.append(b"\n".join(self.lines))
            self.lines = None
            self.factory.dots += 1
            if self.factory.delay is not None:
                self.factory.reply = self.factory.reactor.callLater(
                    self.factory.delay, self._queued
                )
            return
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            self.sendLine(b"250 peer.test")
        elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"DATA":
            self.lines = []
            self.sendLine(b"354 go on")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 no")

    def _queued(self) -> None:
        if self.transport.connected:
            self.sendLine(b"250 2.0.0 queued")


class SlowPeerFactory(protocol.ServerFactory):
    protocol = SlowPeer

    def __init__(self, reactor, delay: float | None) -> None:
        self.reactor = reactor
        self.delay = delay  # None: never answers the final dot
        self.messages: list[bytes] = []
        self.dots = 0
        self.reply = None


class RelayerStopTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = temp_dir(self)
        self.pool = ThreadPool(1, 4, name="test-relay-stop")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def listen(self, delay):
        peer = SlowPeerFactory(self.reactor, delay)
        port = self.reactor.listenTCP(0, peer, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def no_reply_left():
            if peer.reply is not None and peer.reply.active():
                peer.reply.cancel()

        self.addCleanup(no_reply_left)
        return peer, port.getHost().port

    def service(self, port):
        config = parse(f"""
[server]
hostname = "mail.example.test"
data_dir = "{self.tmp / "data"}"
[relay]
smarthost = "127.0.0.1:{port}"
retry_min = 1
retry_max = 1
""")
        ctx = ServerContext(
            config=config,
            reactor=self.reactor,
            threadpool=self.pool,
            store=MemoryMailStore(),
            passwords=None,
            portal=None,
            tls=None,
            queue=OutboundQueue(config.queue_dir, self.reactor, self.pool),
        )
        # No DNS: the smarthost is an address (a resolver that nobody asks).
        resolver = client.Resolver(servers=[("127.0.0.1", 9)], reactor=self.reactor)
        svc = outbound_service(ctx, resolver=resolver, scan_interval=0.1)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        return ctx, svc

    @defer.inlineCallbacks
    def wait_for(self, condition, timeout=20.0):
        deadline = self.reactor.seconds() + timeout
        while not condition():
            self.assertLess(self.reactor.seconds(), deadline)
            yield task.deferLater(self.reactor, 0.02, lambda: None)

    def queued(self):
        return QueueStore(self.tmp / "data" / "queue").ids()

    @defer.inlineCallbacks
    def test_a_reply_to_the_final_dot_that_comes_during_stop_is_recorded(self):
        peer, port = self.listen(delay=1.0)
        ctx, svc = self.service(port)
        yield ctx.queue.enqueue("alice@example.test", ["bob@remote.test"], BytesSource(MESSAGE))
        yield self.wait_for(lambda: peer.dots == 1)
        yield svc.stopService()  # while the peer takes its time over the reply
        self.assertEqual(self.queued(), [])  # delivered, recorded
        # Started again: nothing is sent twice.
        _, again = self.service(port)
        yield task.deferLater(self.reactor, 0.5, lambda: None)
        yield again.stopService()
        self.assertEqual(len(peer.messages), 1)

    @defer.inlineCallbacks
    def test_a_peer_that_does_not_answer_within_the_grace_is_cut_and_the_message_kept(self):
        self.patch(relayer_module, "SENDING_GRACE", 0.5)
        self.patch(relayer_module, "STOP_GRACE", 2.5)
        peer, port = self.listen(delay=None)
        ctx, svc = self.service(port)
        yield ctx.queue.enqueue("alice@example.test", ["bob@remote.test"], BytesSource(MESSAGE))
        yield self.wait_for(lambda: peer.dots == 1)
        started = self.reactor.seconds()
        yield svc.stopService()
        self.assertLess(self.reactor.seconds() - started, 2.0)  # cut after the grace
        self.assertEqual(len(self.queued()), 1)  # still queued: sent again later


class DaemonRelayStopTests(unittest.TestCase):
    """The real daemon: SIGTERM while its relay process waits for the peer's reply."""

    timeout = 120

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = temp_dir(self)
        self.peer = SlowPeerFactory(reactor, delay=1.0)
        port = reactor.listenTCP(0, self.peer, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(
            lambda: self.peer.reply and self.peer.reply.active() and self.peer.reply.cancel()
        )
        relay = f'[relay]\nsmarthost = "127.0.0.1:{port.getHost().port}"\nretry_min = 1\n'
        self.server = MailServer(self.tmp, extra=relay)

    @defer.inlineCallbacks
    def wait_for(self, condition, timeout=30.0):
        deadline = self.reactor.seconds() + timeout
        while not condition():
            if self.reactor.seconds() > deadline:
                self.fail(f"timed out\n{self.server.output()}")
            yield task.deferLater(self.reactor, 0.05, lambda: None)

    def submit(self):
        def send():
            with smtplib.SMTP("127.0.0.1", self.server.ports["submission"], timeout=30) as s:
                s.ehlo("client.test")
                s.starttls(context=stdlib_ssl._create_unverified_context())
                s.ehlo("client.test")
                s.login("alice@example.test", PASSWORD)
                s.sendmail(
                    "alice@example.test", ["bob@remote.test"], MESSAGE.replace(b"\n", b"\r\n")
                )

        return threads.deferToThread(send)

    @defer.inlineCallbacks
    def test_sigterm_while_the_peer_is_slow_to_answer_the_final_dot(self):
        yield threads.deferToThread(self.server.start)
        self.addCleanup(threads.deferToThread, self.server.close)
        yield threads.deferToThread(self.server.add_user, "alice@example.test")
        yield self.submit()
        yield self.wait_for(lambda: self.peer.dots == 1)
        status = yield threads.deferToThread(self.server.stop, 30.0)
        self.assertIn(status, (0, -signal.SIGTERM))
        yield threads.deferToThread(self.server.reap)  # the relay process has ended too
        self.assertEqual(QueueStore(self.tmp / "data" / "queue").ids(), [])
        self.assertNotIn("killing it", self.server.output())
        # Started again: nothing left to send, nothing sent twice.
        yield threads.deferToThread(self.server.start)
        yield task.deferLater(self.reactor, 2.0, lambda: None)
        self.assertEqual(len(self.peer.messages), 1)
