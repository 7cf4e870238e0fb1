"""send_now over real loopback TCP: every byte arrives, in order, whatever the socket takes."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailsrv.eager import send_now


class _Sender(protocol.Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)


class _Collector(protocol.Protocol):
    def connectionMade(self):
        self.data = bytearray()
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(bytes(self.data))


class SendNowTests(unittest.TestCase):
    @defer.inlineCallbacks
    def connect(self):
        factory = protocol.Factory.forProtocol(_Sender)
        factory.connected = defer.Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield protocol.ClientCreator(reactor, _Collector).connectTCP(
            "127.0.0.1", port.getHost().port
        )
        server = yield factory.connected
        return server, client

    @defer.inlineCallbacks
    def test_small_writes_go_out_at_once_and_in_order(self):
        server, client = yield self.connect()
        for i in range(100):
            send_now(server.transport, b"line %d\r\n" % i)
        # Nothing was left for the reactor to send.
        self.assertEqual(server.transport.dataBuffer, b"")
        self.assertFalse(server.transport._tempDataBuffer)
        server.transport.loseConnection()
        got = yield client.done
        self.assertEqual(got, b"".join(b"line %d\r\n" % i for i in range(100)))

    @defer.inlineCallbacks
    def test_what_the_socket_does_not_take_is_queued_behind(self):
        server, client = yield self.connect()
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than a socket buffer takes
        send_now(server.transport, big)
        queued = len(server.transport.dataBuffer) + server.transport._tempDataLen
        self.assertGreater(queued, 0)
        # Later small writes must not overtake the queued bytes.
        send_now(server.transport, b"tail\r\n")
        server.transport.loseConnection()
        got = yield client.done
        self.assertEqual(len(got), len(big) + 6)
        self.assertEqual(got, big + b"tail\r\n")

    def test_other_transports_get_an_ordinary_write(self):
        t = StringTransport()
        send_now(t, b"hello\r\n")
        self.assertEqual(t.value(), b"hello\r\n")
