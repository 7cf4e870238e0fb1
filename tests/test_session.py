"""The session mechanics the three protocols share (mailsrv.session), alone on a StringTransport."""

from __future__ import annotations

from twisted.internet import interfaces
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from mailsrv.session import BadCommands, OutputFlow, TLSGate

from .test_pop3_support import LOOPBACK, REMOTE, TLSStringTransport

OPTIONS = object()

# --- BadCommands --------------------------------------------------------------------


def test_bad_commands_drop_at_the_limit_and_after():
    counter = BadCommands(3)
    assert [counter.bad() for _ in range(5)] == [False, False, True, True, True]


def test_a_good_command_forgives():
    counter = BadCommands(2)
    for _ in range(5):
        assert counter.bad() is False
        counter.good()


# --- TLSGate --------------------------------------------------------------------------


def gate(transport, options=OPTIONS, cleartext="loopback", implicit=False) -> TLSGate:
    g = TLSGate(options, cleartext, implicit)
    g.connected(transport)
    return g


def test_starttls_on_a_remote_connection():
    transport = TLSStringTransport(peerAddress=REMOTE)
    g = gate(transport)
    assert not g.active() and g.can_start() and not g.password_allowed()
    g.start()
    assert transport.tls_started_with is OPTIONS
    assert g.active() and not g.can_start() and g.password_allowed()


def test_no_starttls_without_options_or_a_transport_that_can():
    assert not gate(TLSStringTransport(peerAddress=REMOTE), options=None).can_start()
    assert not gate(StringTransport(peerAddress=REMOTE)).can_start()


def test_implicit_tls_is_active_and_offers_no_starttls():
    g = gate(TLSStringTransport(peerAddress=REMOTE), implicit=True)
    assert g.options is None
    assert g.active() and not g.can_start() and g.password_allowed()


def test_cleartext_policies():
    for policy, loopback, remote in (
        ("always", True, True),
        ("loopback", True, False),
        ("never", False, False),
    ):
        assert gate(StringTransport(peerAddress=LOOPBACK), cleartext=policy).password_allowed() is (
            loopback
        )
        assert gate(StringTransport(peerAddress=REMOTE), cleartext=policy).password_allowed() is (
            remote
        )


# --- OutputFlow ----------------------------------------------------------------------------


def test_output_flow_waits_while_the_transport_is_full():
    flow = OutputFlow()
    assert verifyObject(interfaces.IPushProducer, flow)
    transport = StringTransport()
    transport.registerProducer(flow, True)
    fired = []
    flow.wait().addCallback(fired.append)
    assert fired == [None]  # not paused: at once
    flow.pauseProducing()
    flow.wait().addCallback(fired.append)
    flow.wait().addCallback(fired.append)
    assert fired == [None]
    flow.resumeProducing()
    assert fired == [None, None, None]


def test_output_flow_stopped_releases_the_waiters():
    flow = OutputFlow()
    flow.pauseProducing()
    fired = []
    flow.wait().addCallback(fired.append)
    flow.stopProducing()
    assert fired == [None] and flow.stopped
