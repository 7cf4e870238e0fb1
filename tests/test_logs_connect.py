"""
Postfix smtpd's per-connection lines over a real loopback SMTP session with
STARTTLS (and implicit TLS with AUTH): C{connect from}, C{Anonymous TLS
connection established from}, C{disconnect from ... commands=N}, and the
C{to=... relay=local} line for a mailbox stored during the session.
"""

from __future__ import annotations

import re
import tempfile
from io import BytesIO
from pathlib import Path

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.logger import formatEvent, globalLogPublisher
from twisted.mail import smtp
from twisted.trial import unittest

from . import test_smtp_loopback as loopback
from .test_smtp_helpers import PASSWORD, make_context, read_inbox
from .test_smtp_loopback import ALICE, BOB, _client_tls


class ConnectLogTests(unittest.TestCase):
    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="smtp-log-"))
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    listen = loopback.SMTPLoopbackTests.listen

    def lines(self, namespace: str) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace", "") == namespace]

    @defer.inlineCallbacks
    def test_connect_tls_delivery_disconnect(self):
        ctx = make_context(self.tmp, reactor=self.reactor)
        factory, port = self.listen(ctx)
        result: defer.Deferred = defer.Deferred()
        sender = smtp.ESMTPSenderFactory(
            None,
            None,
            "x@remote.test",
            [ALICE, "nobody@example.test", BOB],
            BytesIO(b"Subject: hi\n\nhello\n"),
            result,
            retries=0,
            contextFactory=_client_tls(),
            requireAuthentication=False,
            requireTransportSecurity=True,
        )
        sender.domain = b"client.test"
        self.reactor.connectTCP("127.0.0.1", port, sender)
        n, _ = yield result
        self.assertEqual(n, 2)
        yield factory.all_closed()
        self.assertEqual(len(read_inbox(ctx, ALICE)), 1)

        session = self.lines("mailsrv.smtp.sessionlog.SessionLog")
        self.assertEqual(session[0], "connect from unknown[127.0.0.1]")
        self.assertRegex(
            session[1],
            r"^Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: "
            r"TLSv1\.[23] with cipher \S+ \((\d+)/\1 bits\)$",
        )
        # Twisted's client: EHLO, STARTTLS, EHLO again, the transaction, RSET, QUIT.
        self.assertEqual(
            session[2],
            "disconnect from unknown[127.0.0.1] ehlo=2 starttls=1 mail=1 rcpt=2/3 data=1"
            " rset=1 quit=1 commands=9/10",
        )
        self.assertEqual(len(session), 3)
        [tls_event] = [e for e in self.events if e.get("log_format", "").startswith("Anonymous")]
        self.assertEqual((tls_event["client_name"], tls_event["client"]), ("unknown", "127.0.0.1"))

        sent = [
            line for line in self.lines("mailsrv.smtp.message.IncomingMessage") if ": to=<" in line
        ]
        self.assertEqual(len(sent), 2, sent)
        for line, rcpt in zip(sorted(sent), sorted([ALICE, BOB]), strict=True):
            self.assertRegex(
                line,
                r"^\S+: to=<" + re.escape(rcpt) + r">, relay=local, delay=\d+\.\d\d, "
                r"dsn=2\.0\.0, status=sent \(delivered to mailbox\)$",
            )
        [event] = [e for e in self.events if e.get("rcpt") == ALICE and e.get("relay") == "local"]
        self.assertEqual((event["result"], event["status"]), ("sent", "2.0.0"))

    @defer.inlineCallbacks
    def test_implicit_tls_and_auth(self):
        ctx = make_context(self.tmp, reactor=self.reactor)
        factory, port = self.listen(ctx, submission=True, implicit_tls=True)
        result: defer.Deferred = defer.Deferred()
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
        yield factory.all_closed()
        session = self.lines("mailsrv.smtp.sessionlog.SessionLog")
        self.assertEqual(session[0], "connect from unknown[127.0.0.1]")
        self.assertTrue(
            session[1].startswith(
                "Anonymous TLS connection established from unknown[127.0.0.1]: TLSv1."
            ),
            session,
        )
        self.assertEqual(
            session[2],
            "disconnect from unknown[127.0.0.1] ehlo=1 auth=1 mail=1 rcpt=1 data=1 rset=1"
            " quit=1 commands=7",
        )
