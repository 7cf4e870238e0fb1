"""
``mailsrv queue hold``, ``release`` and ``requeue`` while a real ``twistd
-n mailsrv`` runs: its relay process follows them without a restart,
against real ESMTP receivers and a real DNS server on loopback.
"""

from __future__ import annotations

import re

from twisted.internet import defer, task, threads
from twisted.trial import unittest

from tests import test_outbound_daemon as daemon


class QueueMarksOnTheDaemon(unittest.TestCase):
    """The set-up and helpers of L{DaemonRelay}, without its tests (they run there)."""

    timeout = 120
    setUp = daemon.DaemonRelay.setUp
    start_server = daemon.DaemonRelay.start_server
    wait_for = daemon.DaemonRelay.wait_for
    submit = daemon.DaemonRelay.submit

    def deferred_message(self):
        """Submit to the receiver that defers the first RCPT; fire with the queue id."""
        return self._deferred_message()

    @defer.inlineCallbacks
    def _deferred_message(self):
        yield threads.deferToThread(self.server.add_user, "alice@example.test")
        yield self.start_server()
        yield self.submit(["t@tempfail.test"])

        def deferred_in_queue():
            return "451 4.3.0" in self.server.cli("queue", "list").stdout

        yield self.wait_for(deferred_in_queue, what="the deferral on disk")
        listing = self.server.cli("queue", "list").stdout
        (qid,) = re.findall(r"^([0-9A-F]{20})\b", listing, re.M)
        self.assertEqual(self.tempfail.rcpt_counts["t@tempfail.test"], 1)
        return qid

    @defer.inlineCallbacks
    def test_a_held_message_is_not_delivered_and_is_after_its_release(self):
        qid = yield self.deferred_message()
        result = self.server.cli("queue", "hold", qid)
        self.assertEqual(result.stdout, f"{qid}: on hold\n")
        self.assertIn(f"{qid}!", self.server.cli("queue", "list").stdout)
        self.server.cli("queue", "flush")
        yield self.wait_for(
            lambda: "queue flush requested" in self.server.output(), what="the flush"
        )
        self.assertIn(f"{qid}: on hold", self.server.output())
        yield task.deferLater(self.reactor, 1.0, lambda: None)  # an attempt would have begun
        self.assertEqual(self.tempfail.rcpt_counts["t@tempfail.test"], 1)
        self.assertEqual(self.tempfail.delivered("t@tempfail.test"), 0)
        self.assertIn(qid, self.server.cli("queue", "list").stdout)

        self.assertEqual(
            self.server.cli("queue", "release", qid).stdout.splitlines()[0], f"{qid}: released"
        )
        yield self.wait_for(
            lambda: f"{qid}: released from hold" in self.server.output(), what="the release"
        )
        self.server.cli("queue", "flush")  # its schedule said an hour on
        yield self.wait_for(
            lambda: self.tempfail.delivered("t@tempfail.test") == 1, what="the delivery"
        )
        yield self.wait_for(
            lambda: "Mail queue is empty" in self.server.cli("queue", "list").stdout,
            what="an empty queue",
        )
        self.assertEqual(self.tempfail.rcpt_counts["t@tempfail.test"], 2)

    @defer.inlineCallbacks
    def test_requeue_of_a_deferred_message_delivers_at_once(self):
        qid = yield self.deferred_message()  # the next attempt is an hour away
        result = self.server.cli("queue", "requeue", qid)
        self.assertEqual(result.stdout, f"{qid}: requeued\n")
        yield self.wait_for(
            lambda: self.tempfail.delivered("t@tempfail.test") == 1, what="the delivery"
        )
        self.assertIn(f"{qid}: requeued", self.server.output())
        yield self.wait_for(
            lambda: "Mail queue is empty" in self.server.cli("queue", "list").stdout,
            what="an empty queue",
        )
