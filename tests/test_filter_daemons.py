"""
The spam filter step against real filters on loopback: a filter command
(a shell script), SpamAssassin's spamd and rspamd started by the tests
(skipped with a reason where not installed; CI installs them), and the
rspamd client's request as a recording HTTP server sees it. GTUBE is
refused or filed into Junk, a clean message passes, a stopped daemon gives
the configured fallback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailsrv.filter.command import CommandFilter
from mailsrv.filter.rspamd import RspamdFilter
from mailsrv.filter.spamd import SpamdFilter
from mailsrv.filter.step import FilterStep
from mailsrv.filter.verdict import DEFER, JUNK, Envelope, Thresholds

from .test_filter import ALICE, GTUBE, read_folder
from .test_smtp_helpers import Session, _result, make_context, read_inbox

ENVELOPE = Envelope("Q1", "bob@remote.test", (ALICE,), "192.0.2.7")
CLEAN = (
    "Received: from mail.remote.test (mail.remote.test [192.0.2.7])\r\n"
    "\tby mx.example.test with ESMTP id Q1; Sun, 6 Dec 2026 16:00:00 +0000\r\n"
    "From: Bob Example <bob@remote.test>\r\n"
    f"To: Alice <{ALICE}>\r\n"
    "Subject: Lunch on Thursday\r\n"
    "Date: Sun, 6 Dec 2026 16:00:00 +0000\r\n"
    "Message-ID: <lunch.1@remote.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=us-ascii\r\n"
    "\r\n"
    "Hi Alice,\r\n\r\nshall we meet for lunch on Thursday at noon, at the usual place?\r\n"
    "\r\nBob\r\n"
)
SPAM = CLEAN.replace("Subject: Lunch on Thursday", "Subject: test").replace("Hi Alice,", GTUBE)
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until C{port} takes connections; raises if C{proc} dies or time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return time.monotonic() - start
        except OSError:
            time.sleep(0.1)  # a real daemon starting: no clock to advance
    raise RuntimeError(f"the daemon did not listen within {timeout}s")


@defer.inlineCallbacks
def smtp_send(s: Session, body: str) -> Any:
    """Send a message over the session; the final reply, once the filter has answered."""
    assert s.codes("MAIL FROM:<bob@remote.test>\r\n") == ["250 2.1.0"]
    assert s.codes(f"RCPT TO:<{ALICE}>\r\n") == ["250 2.1.5"]
    assert s.cmd("DATA")[0].startswith("354")
    lines = s.send(body + ".\r\n")
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        yield task.deferLater(reactor, 0.02, lambda: None)
        lines = s.take()
    return lines


def session(client: Any, on_failure: str = "accept") -> Session:
    ctx = make_context()
    step = FilterStep(client, reactor, 20, on_failure)
    s = Session(dataclasses.replace(ctx, filter=step))
    assert s.cmd("EHLO mail.remote.test")[-1].startswith("250 ")
    return s


class CommandFilterTests(unittest.TestCase):
    """A shell script as the filter: the message on stdin, the verdict in its exit code."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="filter-cmd-"))
        self.addCleanup(shutil.rmtree, self.dir)
        self.script = self.dir / "filter"
        self.script.write_text(
            "#!/bin/sh\n"
            f'cat > "{self.dir}/seen"\n'
            f'if grep -q GTUBE "{self.dir}/seen"; then\n'
            "  echo 'X-Spam-Flag: YES'; echo \"spam from $SENDER\" >&2; exit ${SPAM_EXIT:-2}\n"
            "fi\n"
            "echo 'X-Spam-Status: No'\n"
        )
        self.script.chmod(0o755)

    @defer.inlineCallbacks
    def test_gtube_refused_clean_passes(self):
        s = session(CommandFilter(reactor, (str(self.script),)))
        reply = yield smtp_send(s, SPAM)
        self.assertEqual(reply, ["550 5.7.1 spam from bob@remote.test"])
        self.assertIn(b"GTUBE", (self.dir / "seen").read_bytes())  # the message on stdin
        reply = yield smtp_send(s, CLEAN)
        self.assertTrue(reply[0].startswith("250 "), reply)
        [stored] = read_inbox(s.ctx, ALICE)
        self.assertIn(b"X-Spam-Status: No\n", stored)
        self.assertIn(b"shall we meet", (self.dir / "seen").read_bytes())

    @defer.inlineCallbacks
    def test_a_hung_command_is_killed_at_the_timeout(self):
        hung = self.dir / "hung"
        hung.write_text("#!/bin/sh\nexec sleep 30\n")
        hung.chmod(0o755)
        step = FilterStep(CommandFilter(reactor, (str(hung),)), reactor, 0.3, "defer")
        started = time.monotonic()
        verdict = yield step.check(_source(CLEAN), ENVELOPE)
        self.assertEqual(verdict.action, DEFER)
        self.assertLess(time.monotonic() - started, 5)

    @defer.inlineCallbacks
    def test_a_missing_command_follows_on_failure(self):
        step = FilterStep(CommandFilter(reactor, (str(self.dir / "nope"),)), reactor, 5, "defer")
        verdict = yield step.check(_source(CLEAN), ENVELOPE)
        self.assertEqual(verdict.action, DEFER)


def _source(text: str) -> Any:
    from mailsrv.spool import BytesSource

    return BytesSource(text.replace("\r\n", "\n").encode())


class SpamdTests(unittest.TestCase):
    """SpamAssassin's spamd, started on a loopback port with local tests only (-L)."""

    proc: subprocess.Popen | None = None

    @classmethod
    def setUpClass(cls) -> None:
        spamd = shutil.which("spamd") or (
            "/usr/sbin/spamd" if os.path.exists("/usr/sbin/spamd") else None
        )
        if spamd is None:
            raise unittest.SkipTest("spamd is not installed (Debian package spamassassin)")
        cls.dir = Path(tempfile.mkdtemp(prefix="spamd-"))
        cls.port = free_port()
        cls.proc = subprocess.Popen(
            [
                spamd,
                "--listen",
                f"127.0.0.1:{cls.port}",
                "--pidfile",
                str(cls.dir / "pid"),
                "-x",
                "-L",
                "--max-children=2",
                "--syslog=stderr",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(cls.dir / "log", "wb"),
        )
        try:
            cls.startup = wait_for_port(cls.port, cls.proc, START_TIMEOUT)
        except RuntimeError:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.proc is not None:
            cls.proc.send_signal(signal.SIGTERM)
            cls.proc.wait(30)
            cls.proc = None
        shutil.rmtree(cls.dir, ignore_errors=True)

    def client(self, **thresholds: float) -> SpamdFilter:
        return SpamdFilter(reactor, "127.0.0.1", self.port, Thresholds(**thresholds))

    @defer.inlineCallbacks
    def test_gtube_is_refused_with_a_reject_score(self):
        s = session(self.client(reject=20))
        reply = yield smtp_send(s, SPAM)
        self.assertEqual(reply, ["550 5.7.1 Message rejected as spam"])
        self.assertEqual(read_inbox(s.ctx, ALICE), [])

    @defer.inlineCallbacks
    def test_gtube_is_filed_into_junk_by_spamds_own_verdict(self):
        s = session(self.client())
        _result(s.ctx.store.create_folder(ALICE, "Junk"))
        reply = yield smtp_send(s, SPAM)
        self.assertTrue(reply[0].startswith("250 "), reply)
        self.assertEqual(read_inbox(s.ctx, ALICE), [])
        [stored] = read_folder(s.ctx, ALICE, "Junk")
        self.assertIn(b"X-Spam-Flag: YES\n", stored)
        self.assertIn(b",GTUBE,", stored)

    @defer.inlineCallbacks
    def test_a_clean_message_passes(self):
        s = session(self.client(reject=20))
        reply = yield smtp_send(s, CLEAN)
        self.assertTrue(reply[0].startswith("250 "), reply)
        [stored] = read_inbox(s.ctx, ALICE)
        self.assertIn(b"X-Spam-Status: No, score=", stored)
        self.assertNotIn(b"X-Spam-Flag", stored)

    @defer.inlineCallbacks
    def test_a_stopped_daemon_gives_the_fallback(self):
        stopped = SpamdFilter(reactor, "127.0.0.1", free_port(), Thresholds())
        s = session(stopped, on_failure="defer")
        reply = yield smtp_send(s, CLEAN)
        self.assertEqual([line[:9] for line in reply], ["451 4.7.1"])
        s = session(stopped, on_failure="accept")
        reply = yield smtp_send(s, CLEAN)
        self.assertTrue(reply[0].startswith("250 "), reply)
        [stored] = read_inbox(s.ctx, ALICE)
        self.assertNotIn(b"X-Spam", stored)

    def test_startup_time(self):
        """How long spamd took to listen (printed with -s)."""
        print(f"spamd listened after {self.startup:.1f}s")
        self.assertLess(self.startup, START_TIMEOUT)


RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"
options {
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    disable_hyperscan = true;  # compiling its rule cache takes longer than the tests
    dns { nameserver = ["127.0.0.1:9"]; }  # no Internet DNS in the tests
}
logging {
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "warning";
}
worker "normal" {
    bind_socket = "127.0.0.1:%(port)d";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}
"""


class RspamdTests(unittest.TestCase):
    """rspamd's normal worker alone, started on a loopback port from a config in a temp folder."""

    proc: subprocess.Popen | None = None

    @classmethod
    def setUpClass(cls) -> None:
        rspamd = shutil.which("rspamd")
        if rspamd is None or not os.path.isdir("/etc/rspamd"):
            raise unittest.SkipTest("rspamd is not installed (Debian package rspamd)")
        cls.dir = Path(tempfile.mkdtemp(prefix="rspamd-"))
        cls.port = free_port()
        conf = cls.dir / "rspamd.conf"
        conf.write_text(RSPAMD_CONF % {"port": cls.port})
        (cls.dir / "local").mkdir()
        user = ["-u", "root", "-g", "root"] if os.getuid() == 0 else []
        cls.proc = subprocess.Popen(
            [rspamd, "-f", "-c", str(conf), *user]
            + [f"--var={v}={cls.dir}" for v in ("RUNDIR", "DBDIR", "LOGDIR")]
            + ["--var=CONFDIR=/etc/rspamd", f"--var=LOCAL_CONFDIR={cls.dir / 'local'}"],
            stdout=subprocess.DEVNULL,
            stderr=open(cls.dir / "err", "wb"),
        )
        try:
            cls.startup = wait_for_port(cls.port, cls.proc, START_TIMEOUT)
        except RuntimeError:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.proc is not None:
            cls.proc.send_signal(signal.SIGTERM)
            cls.proc.wait(30)
            cls.proc = None
        shutil.rmtree(cls.dir, ignore_errors=True)

    def client(self, **thresholds: float) -> RspamdFilter:
        return RspamdFilter(reactor, f"http://127.0.0.1:{self.port}", Thresholds(**thresholds))

    @defer.inlineCallbacks
    def test_gtube_is_refused_by_rspamds_own_action(self):
        s = session(self.client())
        reply = yield smtp_send(s, SPAM)
        self.assertEqual(reply, ["550 5.7.1 Gtube pattern"])
        self.assertEqual(read_inbox(s.ctx, ALICE), [])

    @defer.inlineCallbacks
    def test_gtube_is_filed_into_junk_with_a_higher_reject_score(self):
        s = session(self.client(reject=1000))
        _result(s.ctx.store.create_folder(ALICE, "Junk"))
        reply = yield smtp_send(s, SPAM)
        self.assertTrue(reply[0].startswith("250 "), reply)
        [stored] = read_folder(s.ctx, ALICE, "Junk")
        self.assertIn(b"X-Rspamd-Action: reject\n", stored)
        self.assertIn(b"X-Spam-Flag: YES\n", stored)

    @defer.inlineCallbacks
    def test_a_clean_message_passes(self):
        # Without DNS rspamd adds a few points (RDNS_NONE...): junk from 10 on.
        s = session(self.client(junk=10))
        reply = yield smtp_send(s, CLEAN)
        self.assertTrue(reply[0].startswith("250 "), reply)
        [stored] = read_inbox(s.ctx, ALICE)
        self.assertIn(b"X-Spam-Status: No, score=", stored)
        self.assertIn(b"X-Rspamd-Action: ", stored)

    @defer.inlineCallbacks
    def test_a_stopped_daemon_gives_the_fallback(self):
        stopped = RspamdFilter(reactor, f"http://127.0.0.1:{free_port()}", Thresholds())
        reply = yield smtp_send(session(stopped, on_failure="defer"), CLEAN)
        self.assertEqual([line[:9] for line in reply], ["451 4.7.1"])
        reply = yield smtp_send(session(stopped, on_failure="accept"), CLEAN)
        self.assertTrue(reply[0].startswith("250 "), reply)

    def test_startup_time(self):
        """How long rspamd took to listen (printed with -s)."""
        print(f"rspamd listened after {self.startup:.1f}s")
        self.assertLess(self.startup, START_TIMEOUT)


class RspamdWireTests(unittest.TestCase):
    """The rspamd client's request on a real loopback socket, to a recording HTTP server."""

    def setUp(self) -> None:
        from twisted.web import resource, server

        self.requests: list[tuple[bytes, bytes, Any, bytes]] = []
        self.code = 200
        test = self

        class CheckV2(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                body = request.content.read()
                test.requests.append((request.method, request.path, request.requestHeaders, body))
                request.setResponseCode(test.code)
                return json.dumps({"action": "add header", "score": 7.5}).encode()

        self.port = reactor.listenTCP(0, server.Site(CheckV2()), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client = RspamdFilter(
            reactor, f"http://127.0.0.1:{self.port.getHost().port}/", Thresholds()
        )

    @defer.inlineCallbacks
    def test_the_message_is_posted_with_the_envelope(self):
        message = CLEAN.replace("\r\n", "\n").encode()
        env = Envelope("Q7", "bob@remote.test", (ALICE,), "192.0.2.7", user="carol")
        verdict = yield self.client.check(_source(CLEAN), env)
        [(method, path, headers, body)] = self.requests
        self.assertEqual((method, path, body), (b"POST", b"/checkv2", message))
        self.assertEqual(headers.getRawHeaders(b"IP"), [b"192.0.2.7"])
        self.assertEqual(headers.getRawHeaders(b"From"), [b"bob@remote.test"])
        self.assertEqual(headers.getRawHeaders(b"Rcpt"), [ALICE.encode()])
        self.assertEqual(headers.getRawHeaders(b"User"), [b"carol"])
        self.assertEqual(headers.getRawHeaders(b"Queue-Id"), [b"Q7"])
        self.assertEqual((verdict.action, verdict.score), (JUNK, 7.5))

    @defer.inlineCallbacks
    def test_an_http_error_is_a_failure(self):
        self.code = 500
        step = FilterStep(self.client, reactor, 5, "defer")
        verdict = yield step.check(_source(CLEAN), ENVELOPE)
        self.assertEqual(verdict.action, DEFER)
