"""
The whole server: a real ``twistd -n mailsrv`` takes mail on submission and
relays it to ESMTP receivers found through a real DNS server, all on
loopback; bounces land in the sender's mbox; kill -9 and a restart resume
the queue without sending twice; ``mailsrv queue`` manages it.
"""

from __future__ import annotations

import mailbox
import smtplib
import ssl as stdlib_ssl

from twisted.internet import defer, task, threads
from twisted.names import dns
from twisted.trial import unittest

from tests.e2e import PASSWORD, MailServer
from tests.test_outbound_support import (
    Receiver,
    daemon_relay_config,
    listen_all,
    start_dns,
    temp_dir,
)

A, MX = dns.Record_A, dns.Record_MX

MESSAGE = (
    "From: Alice <alice@example.test>\r\n"
    "To: ok@accept.test\r\n"
    "Subject: relay test\r\n"
    "\r\n"
    "Hello from the submission port.\r\n"
    ".a line with a leading dot\r\n"
)


class DaemonRelay(unittest.TestCase):
    timeout = 120

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = temp_dir(self)
        self.accept = Receiver("accept")
        self.tempfail = Receiver("tempfail")
        self.reject = Receiver("reject")
        self.relay_port, ports = listen_all(
            reactor,
            {
                "127.0.0.2": (self.accept, None),
                "127.0.0.3": (self.tempfail, None),
                "127.0.0.4": (self.reject, None),
            },
        )
        for p in ports:
            self.addCleanup(p.stopListening)
        dns_port = start_dns(
            reactor,
            [
                ("accept.test", MX(10, b"mx.accept.test")),
                ("mx.accept.test", A("127.0.0.2")),
                ("tempfail.test", MX(10, b"mx.tempfail.test")),
                ("mx.tempfail.test", A("127.0.0.3")),
                ("reject.test", MX(10, b"mx.reject.test")),
                ("mx.reject.test", A("127.0.0.4")),
            ],
        )
        self.addCleanup(dns_port.stopListening)
        self.server = MailServer(self.tmp, extra=daemon_relay_config(dns_port, self.relay_port))

    @defer.inlineCallbacks
    def start_server(self):
        yield threads.deferToThread(self.server.start)
        self.addCleanup(threads.deferToThread, self.server.stop)

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=30.0, what="condition"):
        deadline = self.reactor.seconds() + timeout
        while True:
            ok = yield threads.deferToThread(predicate)
            if ok:
                return
            if self.reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}\n{self.server.output()}")
            yield task.deferLater(self.reactor, 0.1, lambda: None)

    def submit(self, recipients):
        def send():
            with smtplib.SMTP("127.0.0.1", self.server.ports["submission"], timeout=30) as s:
                s.ehlo("client.test")
                s.starttls(context=stdlib_ssl._create_unverified_context())
                s.ehlo("client.test")
                s.login("alice@example.test", PASSWORD)
                return s.sendmail("alice@example.test", recipients, MESSAGE)

        return threads.deferToThread(send)

    def inbox(self):
        path = self.server.inbox("alice@example.test")
        if not path.exists():
            return []
        box = mailbox.mbox(str(path), create=False)
        try:
            return [box.get_message(k) for k in box.keys()]
        finally:
            box.close()

    @defer.inlineCallbacks
    def test_submission_relays_and_bounces_into_the_senders_mbox(self):
        yield threads.deferToThread(self.server.add_user, "alice@example.test")
        yield self.start_server()
        refused = yield self.submit(["ok@accept.test", "r@reject.test"])
        self.assertEqual(refused, {})
        yield self.wait_for(
            lambda: self.accept.delivered("ok@accept.test") == 1, what="relayed message"
        )
        yield self.wait_for(lambda: len(self.inbox()) == 1, what="the bounce")
        (m,) = self.accept.messages
        self.assertEqual(m.sender, "alice@example.test")
        self.assertIn(b"\n.a line with a leading dot\n", m.data)
        self.assertIn(b"Subject: relay test\n", m.data)
        (bounce,) = self.inbox()
        self.assertEqual(bounce.get_content_type(), "multipart/report")
        self.assertEqual(bounce.get_from().split()[0], "MAILER-DAEMON")  # mbox From_ of <>
        status = bounce.get_payload(1).get_payload()
        self.assertEqual(status[1]["Final-Recipient"], "rfc822; r@reject.test")
        self.assertEqual(status[1]["Status"], "5.1.1")
        self.assertEqual(status[1]["Remote-MTA"], "dns; mx.reject.test")
        yield self.wait_for(
            lambda: "Mail queue is empty" in self.server.cli("queue", "list").stdout,
            what="an empty queue",
        )

    @defer.inlineCallbacks
    def test_kill_9_and_restart_resume_without_resending(self):
        yield threads.deferToThread(self.server.add_user, "alice@example.test")
        yield self.start_server()
        yield self.submit(["ok@accept.test", "t@tempfail.test"])
        yield self.wait_for(
            lambda: (
                self.tempfail.rcpt_counts["t@tempfail.test"] == 1
                and self.accept.delivered("ok@accept.test") == 1
            ),
            what="the first attempt",
        )

        def deferred_in_queue():
            out = self.server.cli("queue", "list").stdout
            return "t@tempfail.test" in out and "451 4.3.0" in out

        yield self.wait_for(deferred_in_queue, what="the deferral on disk")
        listing = self.server.cli("queue", "list").stdout
        self.assertNotIn("ok@accept.test", listing)
        yield threads.deferToThread(self.server.kill)

        yield threads.deferToThread(self.server.start)
        result = yield threads.deferToThread(self.server.cli, "queue", "flush")
        self.assertEqual(result.returncode, 0)
        yield self.wait_for(
            lambda: self.tempfail.delivered("t@tempfail.test") == 1,
            what="delivery after the restart",
        )
        yield self.wait_for(
            lambda: "Mail queue is empty" in self.server.cli("queue", "list").stdout,
            what="an empty queue",
        )
        self.assertEqual(self.accept.delivered("ok@accept.test"), 1)
        self.assertEqual(self.tempfail.delivered("t@tempfail.test"), 1)
        self.assertEqual(self.inbox(), [])

    @defer.inlineCallbacks
    def test_queued_local_deliveries_get_one_return_path(self):
        """
        A bounce to a local sender arrives with Return-Path: <> first; a submitted
        copy whose local delivery is retried from the queue arrives with the
        sender's; neither ever has two (a client's own Return-Path is dropped).
        """
        yield threads.deferToThread(self.server.add_user, "alice@example.test")
        yield threads.deferToThread(self.server.add_user, "bob@example.test")
        bob = self.server.inbox("bob@example.test")
        (bob / "blocked").mkdir(parents=True)  # a folder where bob's mbox goes: delivery fails
        yield self.start_server()

        def send():
            with smtplib.SMTP("127.0.0.1", self.server.ports["submission"], timeout=30) as s:
                s.starttls(context=stdlib_ssl._create_unverified_context())
                s.login("alice@example.test", PASSWORD)
                return s.sendmail(
                    "alice@example.test",
                    ["alice@example.test", "bob@example.test", "r@reject.test"],
                    "Return-Path: <forged@elsewhere.test>\r\n" + MESSAGE,
                )

        refused = yield threads.deferToThread(send)
        self.assertEqual(refused, {})
        yield self.wait_for(lambda: len(self.inbox()) == 2, what="alice's copy and the bounce")

        def raw(path):
            box = mailbox.mbox(str(path), create=False)
            try:
                return [box.get_bytes(k) for k in box.keys()]
            finally:
                box.close()

        own, bounce = sorted(raw(self.server.inbox("alice@example.test")), key=len)
        self.assertTrue(bounce.startswith(b"Return-Path: <>\n"), bounce[:200])
        self.assertIn(b"multipart/report", bounce)
        self.assertTrue(own.startswith(b"Return-Path: <alice@example.test>\n"), own[:200])
        for message in (own, bounce):
            self.assertEqual(message.lower().count(b"\nreturn-path:"), 0, message[:300])

        (bob / "blocked").rmdir()
        bob.rmdir()
        yield threads.deferToThread(self.server.cli, "queue", "flush")
        yield self.wait_for(lambda: bob.exists() and len(raw(bob)) == 1, what="bob's copy")
        (copy,) = raw(bob)
        self.assertTrue(copy.startswith(b"Return-Path: <alice@example.test>\n"), copy[:200])
        self.assertEqual(copy.lower().count(b"return-path:"), 1, copy[:300])
        self.assertIn(b"Subject: relay test\n", copy)
