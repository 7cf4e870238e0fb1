"""
Training from IMAP moves against the real filters: the IMAP server on
loopback (mbox store on disk) driven by imaplib, and

  - SpamAssassin's spamd started by the test with C{--allow-tell} and its
    Bayes database in a temporary folder: after a MOVE into Junk,
    C{sa-learn --dump magic} counts one more spam; after a MOVE out of
    Junk into INBOX, one ham;
  - rspamd's controller worker started by the test with its Bayes
    classifier on a redis-server the test starts on a loopback port (rspamd
    3's Bayes keeps its statistics in redis only): after a MOVE into Junk,
    the controller's C{/stat} counts one more learnt message;
  - the rspamd trainer's request as a recording HTTP server sees it, and a
    learn command (a shell script).

Each daemon test skips with a reason where the daemon is not installed
(CI installs spamassassin, spamd, rspamd and redis-server).
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from mailsrv.filter.learn import HAM, SPAM, TrainingQueue
from mailsrv.filter.trainers import CommandTrainer, RspamdTrainer, SpamdTrainer
from mailsrv.spool import BytesSource

from .conftest import MISSING_PEER
from .imap_loopback_support import LoopbackIMAPCase
from .test_filter_daemons import CLEAN, START_TIMEOUT, free_port, wait_for_port
from .test_imap_harness import PASSWORD, USER

# Enough words for a Bayes learner (rspamd wants 11 tokens at least).
SPAMMY = (
    "From: Lottery Office <win@lottery.test>\r\n"
    f"To: <{USER}>\r\n"
    "Subject: You won the international lottery, claim your prize\r\n"
    "Date: Sun, 6 Dec 2026 16:00:00 +0000\r\n"
    "Message-ID: <won.1@lottery.test>\r\n"
    "\r\n"
    "Congratulations dear winner, you have won one million dollars in our international\r\n"
    "lottery. Please send your bank details and a copy of your passport to claim the prize\r\n"
    "today, before the offer expires.\r\n"
)
HAMMY = CLEAN.replace("Message-ID: <lunch.1@remote.test>", "Message-ID: <lunch.2@remote.test>")


def imap_move(port: int, source: str, target: str) -> str:
    """Log in with imaplib, MOVE every message of C{source} into C{target}; the answer."""
    c = imaplib.IMAP4("127.0.0.1", port)
    try:
        c.login(USER, PASSWORD.decode())
        c.select(source)
        typ, data = c.uid("MOVE", "1:*", target)
        return f"{typ} {data!r}"
    finally:
        c.logout()


def program(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        raise unittest.SkipTest(f"{name} {MISSING_PEER}")
    return path


class _LearnOverIMAP(LoopbackIMAPCase):
    """The IMAP server on loopback with a L{TrainingQueue} around C{self.trainer()}."""

    def trainer(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        super().setUp()
        pool = self.pool

        def run(f, *a):
            return threads.deferToThreadPool(self.reactor, pool, f, *a)

        self.queue = TrainingQueue(self.trainer(), self.store, run, self.reactor, 30)
        self.factory.training = self.queue

    @defer.inlineCallbacks
    def deliver(self, text: str, folder: str = "INBOX") -> Any:
        source = BytesSource(text.replace("\r\n", "\n").encode())
        yield self.store.deliver(USER, source, "sender@remote.test", folder)

    @defer.inlineCallbacks
    def move(self, source: str, target: str) -> Any:
        """MOVE over real IMAP; fires with the learning's log lines once it has ended."""
        lines: list[str] = []

        def observe(event: dict) -> None:
            text = formatEvent(event)
            if text.startswith("learn "):
                lines.append(text)

        globalLogPublisher.addObserver(observe)
        try:
            answer = yield self.in_thread(imap_move, self.port_number, source, target)
            self.assertTrue(answer.startswith("OK"), answer)
            yield self.queue.idle()
        finally:
            globalLogPublisher.removeObserver(observe)
        return lines


class SpamdLearnTests(_LearnOverIMAP):
    """spamd with --allow-tell, its Bayes database in the test's folder."""

    proc: subprocess.Popen | None = None

    @classmethod
    def setUpClass(cls) -> None:
        spamd = program("spamd")
        cls.sa_learn = program("sa-learn")
        cls.dir = Path(tempfile.mkdtemp(prefix="spamd-learn-"))
        bayes = cls.dir / "bayes"
        bayes.mkdir()
        # Run as root, spamd learns as nobody: the folder must be its to write.
        os.chmod(cls.dir, 0o777)
        os.chmod(bayes, 0o777)
        cls.spamd_port = free_port()
        cls.proc = subprocess.Popen(
            [
                spamd,
                "--listen",
                f"127.0.0.1:{cls.spamd_port}",
                "--pidfile",
                str(cls.dir / "pid"),
                "-x",
                "-L",
                "--allow-tell",
                "--max-children=1",
                "--syslog=stderr",
                f"--cf=bayes_path {bayes}/bayes",
                "--cf=bayes_file_mode 0777",
                f"--helper-home-dir={cls.dir}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(cls.dir / "log", "wb"),
        )
        try:
            wait_for_port(cls.spamd_port, cls.proc, START_TIMEOUT)
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

    def trainer(self) -> SpamdTrainer:
        return SpamdTrainer(self.reactor, "127.0.0.1", self.spamd_port)

    def counts(self) -> dict[str, int]:
        """nspam and nham of spamd's Bayes database (sa-learn --dump magic)."""
        out = subprocess.run(
            [self.sa_learn, "--dbpath", str(self.dir / "bayes"), "--dump", "magic"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        found = {
            n: int(c) for c, n in re.findall(r"(\d+)\s+\d+\s+non-token data: (nspam|nham)", out)
        }
        return {name: found.get(name, 0) for name in ("nspam", "nham")}

    @defer.inlineCallbacks
    def test_a_move_into_junk_is_learnt_as_spam_and_out_of_it_as_ham(self):
        yield self.deliver(SPAMMY)
        before = yield threads.deferToThread(self.counts)
        lines = yield self.move("INBOX", "Junk")
        self.assertEqual(lines, [f"learn spam {USER} Junk uid 1: learnt"])
        after = yield threads.deferToThread(self.counts)
        self.assertEqual(after["nspam"], before["nspam"] + 1, (before, after))
        yield self.deliver(HAMMY, "Junk")
        yield self.move("Junk", "INBOX")  # both: the spam is relearnt as ham too
        last = yield threads.deferToThread(self.counts)
        self.assertEqual(last["nham"], after["nham"] + 2, (after, last))
        self.assertEqual(last["nspam"], before["nspam"], (after, last))


RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"
options {
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    disable_hyperscan = true;
    dns { nameserver = ["127.0.0.1:9"]; }
}
logging {
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "warning";
}
worker "controller" {
    bind_socket = "127.0.0.1:%(port)d";
    count = 1;
    password = "%(password)s";
}
"""
BAYES_CONF = """\
backend = "redis";
servers = "127.0.0.1:%(port)d";
"""
RSPAMD_PASSWORD = "learn-test"


class RspamdLearnTests(_LearnOverIMAP):
    """rspamd's controller worker, its Bayes statistics on a redis-server on loopback."""

    procs: list[subprocess.Popen] = []

    @classmethod
    def setUpClass(cls) -> None:
        rspamd = program("rspamd")
        redis = program("redis-server")
        if not os.path.isdir("/etc/rspamd"):
            raise unittest.SkipTest(f"rspamd's /etc/rspamd {MISSING_PEER}")
        cls.dir = Path(tempfile.mkdtemp(prefix="rspamd-learn-"))
        cls.procs = []
        redis_port = free_port()
        redis_proc = subprocess.Popen(
            [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(cls.dir)],
            stdout=open(cls.dir / "redis.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        cls.procs.append(redis_proc)
        cls.rspamd_port = free_port()
        conf = cls.dir / "rspamd.conf"
        conf.write_text(RSPAMD_CONF % {"port": cls.rspamd_port, "password": RSPAMD_PASSWORD})
        (cls.dir / "local" / "local.d").mkdir(parents=True)
        (cls.dir / "local" / "local.d" / "classifier-bayes.conf").write_text(
            BAYES_CONF % {"port": redis_port}
        )
        user = ["-u", "root", "-g", "root"] if os.getuid() == 0 else []
        try:
            wait_for_port(redis_port, redis_proc, START_TIMEOUT)
            rspamd_proc = subprocess.Popen(
                [rspamd, "-f", "-c", str(conf), *user]
                + [f"--var={v}={cls.dir}" for v in ("RUNDIR", "DBDIR", "LOGDIR")]
                + ["--var=CONFDIR=/etc/rspamd", f"--var=LOCAL_CONFDIR={cls.dir / 'local'}"],
                stdout=subprocess.DEVNULL,
                stderr=open(cls.dir / "err", "wb"),
            )
            cls.procs.append(rspamd_proc)
            wait_for_port(cls.rspamd_port, rspamd_proc, START_TIMEOUT)
        except RuntimeError:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        for proc in reversed(cls.procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        cls.procs = []
        shutil.rmtree(cls.dir, ignore_errors=True)

    def trainer(self) -> RspamdTrainer:
        return RspamdTrainer(self.reactor, f"http://127.0.0.1:{self.rspamd_port}", RSPAMD_PASSWORD)

    @defer.inlineCallbacks
    def learned(self) -> Any:
        """How many messages the controller has learnt (its /stat)."""
        headers = Headers({b"Password": [RSPAMD_PASSWORD.encode()]})
        url = f"http://127.0.0.1:{self.rspamd_port}/stat".encode()
        response = yield Agent(self.reactor).request(b"GET", url, headers)
        body = yield readBody(response)
        return json.loads(body)["learned"]

    @defer.inlineCallbacks
    def test_a_move_into_junk_is_learnt(self):
        yield self.deliver(SPAMMY)
        before = yield self.learned()
        yield self.move("INBOX", "Junk")
        self.assertEqual((yield self.learned()), before + 1)
        yield self.deliver(HAMMY, "Junk")
        self.queue.trainer = RspamdTrainer(
            self.reactor, f"http://127.0.0.1:{self.rspamd_port}", "wrong password"
        )
        yield self.move("Junk", "Archive")  # answered OK; the learning failed, logged
        self.assertEqual((yield self.learned()), before + 1)


class RspamdTrainerWireTests(unittest.TestCase):
    """The rspamd trainer's request on a real loopback socket, to a recording HTTP server."""

    def setUp(self) -> None:
        from twisted.web import resource, server

        self.requests: list[tuple[bytes, Any, bytes]] = []
        self.code = 200
        test = self

        class Controller(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                test.requests.append((request.path, request.requestHeaders, request.content.read()))
                request.setResponseCode(test.code)
                if test.code == 208:
                    return b'{"error": "<x> has been already learned as spam, ignore it"}'
                return b'{"success": true}' if test.code == 200 else b'{"error": "Unauthorized"}'

        self.port = reactor.listenTCP(0, server.Site(Controller()), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.trainer = RspamdTrainer(
            reactor, f"http://127.0.0.1:{self.port.getHost().port}/", "secret"
        )

    @defer.inlineCallbacks
    def test_the_learn_requests(self):
        message = SPAMMY.encode()
        self.assertEqual((yield self.trainer.learn(message, SPAM, USER)), "learnt")
        self.assertEqual((yield self.trainer.learn(message, HAM, USER)), "learnt")
        [(path1, headers, body), (path2, _, _)] = self.requests
        self.assertEqual((path1, path2, body), (b"/learnspam", b"/learnham", message))
        self.assertEqual(headers.getRawHeaders(b"Password"), [b"secret"])
        self.code = 208
        self.assertEqual((yield self.trainer.learn(message, SPAM, USER)), "already learnt")
        self.code = 401
        with self.assertRaisesRegex(Exception, "HTTP 401 Unauthorized"):
            yield self.trainer.learn(message, SPAM, USER)


class CommandTrainerTests(unittest.TestCase):
    """A learn command: the message on stdin, the class in its argument and environment."""

    @defer.inlineCallbacks
    def test_the_command_gets_the_message_and_its_class(self):
        folder = Path(tempfile.mkdtemp(prefix="learn-cmd-"))
        self.addCleanup(shutil.rmtree, folder)
        script = folder / "learn"
        script.write_text(
            "#!/bin/sh\n"
            f'cat > "{folder}/seen"\n'
            f'echo "$1 $MESSAGE_CLASS $USER_NAME" > "{folder}/args"\n'
            '[ "$1" = "--ham" ] && { echo "cannot learn ham" >&2; exit 3; }\n'
            "exit 0\n"
        )
        script.chmod(0o755)
        trainer = CommandTrainer(reactor, (str(script), "--{class}"))
        self.assertEqual((yield trainer.learn(SPAMMY.encode(), SPAM, USER)), "learnt")
        self.assertEqual((folder / "seen").read_bytes(), SPAMMY.encode())
        self.assertEqual((folder / "args").read_text(), f"--spam spam {USER}\n")
        with self.assertRaisesRegex(Exception, "learn command exited 3: cannot learn ham"):
            yield trainer.learn(SPAMMY.encode(), HAM, USER)
