"""
Greylisting over real sockets: the SMTP server on the real reactor on
loopback (the greylist on a task.Clock, so that the delay passes without a
wait), the real mbox store on disk; then the real C{twistd -n mailsrv} driven
by swaks, restarted in between: a triplet that passed stays passed.
"""

from __future__ import annotations

import dataclasses
import mailbox
import shutil
import subprocess
import tempfile
import time
from io import BytesIO
from pathlib import Path

import pytest
from twisted.internet import defer, protocol, task
from twisted.mail import smtp
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.policy.greylist import Greylist, GreylistSettings
from mailsrv.smtp.server import register_avatars
from mailsrv.store.mbox import MboxMailStore

from .e2e import MailServer
from .test_smtp_helpers import PASSWORD, make_context
from .test_smtp_loopback import _client_tls, _LineClient, _WatchedFactory

ALICE, BOB = "alice@example.test", "bob@example.test"
SENDER = "carol@origin.test"
DELAY = 300.0


def replies(data: bytes) -> list[str]:
    """The final line of each reply a client got (code, enhanced code and text)."""
    return [line for line in data.decode().split("\r\n") if line[3:4] == " "]


class GreylistLoopbackTests(unittest.TestCase):
    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="greylist-loop-"))
        pool = ThreadPool(minthreads=1, maxthreads=4, name="greylist-test-disk")
        pool.start()
        self.addCleanup(pool.stop)
        (self.tmp / "mail").mkdir()
        (self.tmp / "index").mkdir()
        store = MboxMailStore(self.tmp / "mail", self.tmp / "index", reactor, pool)
        self.clock = task.Clock()  # the greylist's time: moved by the test
        self.clock.advance(1_780_200_000.0)
        self.greylist = Greylist(self.clock, GreylistSettings(delay=DELAY))
        ctx = make_context(self.tmp, reactor=reactor, store=store, threadpool=pool)
        self.ctx = dataclasses.replace(ctx, greylist=self.greylist)

    def listen(self, submission: bool = False) -> int:
        if submission:
            register_avatars(self.ctx)
        factory = _WatchedFactory(self.ctx, submission, False)
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.all_closed)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def talk(self, port: int, script: bytes) -> defer.Deferred:
        """Send C{script} (pipelined commands, ending in QUIT); fire with every reply."""
        client = _LineClient(script)
        f = _ClientFactory(client)
        self.reactor.connectTCP("127.0.0.1", port, f)
        return client.done

    def send(self, port, sender, rcpts, data, user=None) -> defer.Deferred:
        result: defer.Deferred = defer.Deferred()
        factory = smtp.ESMTPSenderFactory(
            user.encode() if user else None,
            PASSWORD.encode() if user else None,
            sender,
            rcpts,
            BytesIO(data),
            result,
            retries=0,
            contextFactory=_client_tls(),
            requireAuthentication=bool(user),
            requireTransportSecurity=False,
        )
        factory.domain = b"client.origin.test"
        self.reactor.connectTCP("127.0.0.1", port, factory)
        return result

    def inbox(self, user: str) -> list[str]:
        path = self.tmp / "mail" / "example.test" / user.split("@")[0] / "INBOX"
        if not path.exists():
            return []
        box = mailbox.mbox(str(path), create=False)
        try:
            return [str(m["Subject"]) for m in box]
        finally:
            box.close()

    @defer.inlineCallbacks
    def test_first_rcpt_is_greylisted_then_the_retry_after_the_delay_is_delivered(self):
        port = self.listen()
        data = yield self.talk(
            port,
            b"EHLO client.origin.test\r\n"
            b"MAIL FROM:<Carol@Origin.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\n"
            b"QUIT\r\n",
        )
        self.assertEqual(
            replies(data)[3:],
            [
                "451 4.7.1 Greylisted, please try again in 300 seconds",
                "550 5.1.1 No such user here",  # an unknown user: refused first, no triplet
                "221 2.0.0 Bye",
            ],
        )
        self.assertEqual(list(self.greylist.pending), [("127.0.0.0/24", SENDER, ALICE)])
        # Too early: still greylisted, told how much longer.
        self.clock.advance(DELAY - 60)
        d = self.send(port, SENDER, [ALICE], b"Subject: too early\n\nbody\n")
        error = yield self.assertFailure(d, smtp.SMTPDeliveryError)
        self.assertEqual(error.code, 451)
        self.assertIn(b"451 4.7.1 Greylisted, please try again in 60 seconds", error.log)
        self.assertEqual(self.inbox(ALICE), [])
        # Past the delay the same triplet is taken and the message is in the mbox on disk.
        self.clock.advance(60)
        n, _ = yield self.send(port, SENDER, [ALICE], b"Subject: retried\n\nbody\n")
        self.assertEqual(n, 1)
        self.assertEqual(self.inbox(ALICE), ["retried"])
        self.assertEqual(list(self.greylist.passed), [("127.0.0.0/24", SENDER, ALICE)])

    @defer.inlineCallbacks
    def test_a_submission_client_is_never_greylisted(self):
        port = self.listen(submission=True)
        n, _ = yield self.send(port, BOB, [ALICE], b"Subject: submitted\n\nbody\n", user=BOB)
        self.assertEqual(n, 1)
        self.assertEqual(self.inbox(ALICE), ["submitted"])
        self.assertEqual((len(self.greylist.pending), len(self.greylist.passed)), (0, 0))


class _ClientFactory(protocol.ClientFactory):
    def __init__(self, client):
        self.client = client

    def buildProtocol(self, addr):
        return self.client


# --- the real daemon, restarted ---------------------------------------------------------------


def swaks(server: MailServer, sender: str, rcpt: str, subject: str) -> subprocess.CompletedProcess:
    program = shutil.which("swaks")
    if program is None:
        pytest.skip("swaks is not installed")
    return subprocess.run(
        [
            program,
            "--server",
            f"127.0.0.1:{server.ports['smtp']}",
            "--helo",
            "client.origin.test",
            "--from",
            sender,
            "--to",
            rcpt,
            "--header",
            f"Subject: {subject}",
            "--timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def delivered(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 and "<-  250" in result.stdout.split("~> DATA")[-1]


def test_a_passed_triplet_stays_passed_across_a_restart_of_the_daemon(tmp_path):
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    extra = '[policy]\ngreylist = true\ngreylist_delay = "1s"\n'
    with MailServer(tmp_path, extra=extra) as server:
        server.add_user(ALICE)
        first = swaks(server, SENDER, ALICE, "first try")
        assert not delivered(first)
        assert "<** 451 4.7.1 Greylisted, please try again in 1 second" in first.stdout
        # An honest client retries after the delay (a second here): it is taken.
        deadline = time.monotonic() + 20
        while True:
            time.sleep(0.5)
            retry = swaks(server, SENDER, ALICE, "retried")
            if delivered(retry) or time.monotonic() > deadline:
                break
        assert delivered(retry), retry.stdout
        server.stop()
        state = server.data / "greylist" / "state.json"
        assert b'"carol@origin.test","alice@example.test"' in state.read_bytes()
        server.start()
        # After the restart: the passed triplet is taken at once, a new one still waits.
        assert delivered(swaks(server, SENDER, ALICE, "after the restart"))
        other = swaks(server, "dan@origin.test", ALICE, "a new sender")
        assert "<** 451 4.7.1 Greylisted" in other.stdout
        assert server.inbox(ALICE).read_bytes().count(b"\nSubject: ") == 2
