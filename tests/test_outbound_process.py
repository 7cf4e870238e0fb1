"""
The relayer in a process of its own (L{mailsrv.outbound.process} and
L{mailsrv.outbound.worker}): a real ``twistd -n mailsrv`` spawns it, its log
lines land in the server's log, kill -9 of it is survived, SIGTERM stops both,
and it waits for the queue's relay lock; plus the server's end of the AMP
pipes (local deliveries and log events) over an in-memory connection.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import smtplib
import ssl as stdlib_ssl
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, error, task, threads
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from mailsrv.outbound import ipc
from mailsrv.outbound.process import RESTART_MIN, STOP_TIMEOUT, RelayProcessService, ServerSide
from mailsrv.store.memory import MemoryMailStore
from tests.e2e import PASSWORD, MailServer
from tests.test_outbound_support import (
    Receiver,
    daemon_relay_config,
    listen_all,
    start_dns,
    temp_dir,
)

A, MX = dns.Record_A, dns.Record_MX

WORKER = "mailsrv.outbound.worker"
# twistd stops in order on SIGTERM, then ends itself with that signal again.
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)


def message(rcpt: str, subject: str) -> str:
    return (
        "From: Alice <alice@example.test>\r\n"
        f"To: {rcpt}\r\n"
        f"Subject: {subject}\r\n"
        "\r\n"
        "Hello from the submission port.\r\n"
    )


# --- processes, as /proc shows them ------------------------------------------


def _alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def relay_pids(server_pid: int) -> list[int]:
    """The live relay processes the server started (its children running the worker)."""
    try:
        text = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split() if WORKER in _cmdline(int(p)) and _alive(int(p))]


# --- the test cases -------------------------------------------------------------


class RelayProcessEndToEnd(unittest.TestCase):
    """A real server with its relay process, a real DNS server and a real receiver."""

    timeout = 120

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tmp = temp_dir(self)
        self.accept = Receiver("accept")
        self.hostile = Receiver("hostile")
        self.relay_port, ports = listen_all(
            reactor, {"127.0.0.2": (self.accept, None), "127.0.0.3": (self.hostile, None)}
        )
        for p in ports:
            self.addCleanup(p.stopListening)
        dns_port = start_dns(
            reactor,
            [
                ("accept.test", MX(10, b"mx.accept.test")),
                ("mx.accept.test", A("127.0.0.2")),
                ("hostile.test", MX(10, b"mx.hostile.test")),
                ("mx.hostile.test", A("127.0.0.3")),
            ],
        )
        self.addCleanup(dns_port.stopListening)
        self.server = MailServer(self.tmp, extra=daemon_relay_config(dns_port, self.relay_port))
        self.queue_dir = self.server.data / "queue"
        self.seen_relay_pids: set[int] = set()

    # -- helpers -------------------------------------------------------------

    @defer.inlineCallbacks
    def start_server(self, relaying=True):
        """Start the server; with C{relaying}, wait until its relay process has scanned the queue."""
        yield threads.deferToThread(self.server.add_user, "alice@example.test")
        # Cleanups run last first: the server is stopped, then any relay process it left.
        self.addCleanup(self.kill_relay_processes)
        yield threads.deferToThread(self.server.start)
        self.addCleanup(threads.deferToThread, self.server.stop)
        if relaying:
            yield self.wait_for(
                lambda: "relayer started with" in self.log_text(), what="the relayer to start"
            )

    def kill_relay_processes(self) -> None:
        """A relay process seen in this test and still running once the server stopped is killed."""
        for pid in self.seen_relay_pids:
            if _alive(pid) and WORKER in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=30.0, what="condition"):
        deadline = self.reactor.seconds() + timeout
        while True:
            ok = yield threads.deferToThread(predicate)
            if ok:
                return ok
            if self.reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}\n{self.server.output()}")
            yield task.deferLater(self.reactor, 0.1, lambda: None)

    def log_text(self) -> str:
        path = self.server.base / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_count(self, needle: str) -> int:
        return self.log_text().count(needle)

    def submit(self, rcpt: str, subject: str = "relay test"):
        def send():
            with smtplib.SMTP("127.0.0.1", self.server.ports["submission"], timeout=30) as s:
                s.ehlo("client.test")
                s.starttls(context=stdlib_ssl._create_unverified_context())
                s.ehlo("client.test")
                s.login("alice@example.test", PASSWORD)
                return s.sendmail("alice@example.test", [rcpt], message(rcpt, subject))

        return threads.deferToThread(send)

    def the_relay_process(self) -> int | None:
        """The one live relay process, or None."""
        pids = relay_pids(self.server.proc.pid)
        self.seen_relay_pids.update(pids)
        return pids[0] if len(pids) == 1 else None

    def queue_empty(self) -> bool:
        return "Mail queue is empty" in self.server.cli("queue", "list").stdout

    def tmp_files(self) -> list[str]:
        tmp = self.queue_dir / "tmp"
        return sorted(os.listdir(tmp)) if tmp.exists() else []

    # -- the tests -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_log_on_standard_output_gets_the_relay_process_lines_too(self):
        # twistd -n logging to standard output (systemd's way): the relay
        # process shares the descriptor and writes its lines there itself.
        self.server.log_to_stdout = True
        self.log_text = lambda: self.server.log_path.read_text(errors="replace")
        yield self.start_server()
        refused = yield self.submit("ok@accept.test")
        self.assertEqual(refused, {})
        yield self.wait_for(lambda: "removed" in self.log_text(), what="the removal line")
        lines = self.log_text().splitlines()
        (sent,) = [x for x in lines if "status=sent" in x]
        (accepted,) = [x for x in lines if " accepted " in x]
        # Both processes' lines in twistd's format: time stamp, [namespace#level], text.
        self.assertRegex(
            sent, r"^\d{4}-\d\d-\d\dT\S+ \[mailsrv\.outbound\.relayer\.Relayer#info\] "
        )
        self.assertRegex(accepted, r"^\d{4}-\d\d-\d\dT\S+ \[mailsrv\.smtp\.")
        self.assertIn("to=<ok@accept.test>", sent)
        self.assertEqual(self.accept.delivered("ok@accept.test"), 1)
        self.assertFalse((self.server.base / "server.log").exists())

    @defer.inlineCallbacks
    def test_relay_process_log_lines_reach_the_server_log(self):
        yield self.start_server()
        pid = yield self.wait_for(self.the_relay_process, what="the relay process")
        self.assertIn(WORKER, _cmdline(pid))
        refused = yield self.submit("ok@accept.test")
        self.assertEqual(refused, {})
        yield self.wait_for(
            lambda: self.accept.delivered("ok@accept.test") == 1, what="the relayed message"
        )
        yield self.wait_for(lambda: "status=sent" in self.log_text(), what="the delivery line")
        yield self.wait_for(self.queue_empty, what="an empty queue")
        (line,) = [x for x in self.log_text().splitlines() if "status=sent" in x]
        # Written by the server under the relayer's own namespace, not to its stderr.
        self.assertIn("[mailsrv.outbound.relayer.Relayer#info]", line)
        self.assertIn("to=<ok@accept.test>", line)
        self.assertIn("relayer started with 0 queued message(s)", self.log_text())
        self.assertEqual(len(self.accept.messages), 1)
        (m,) = self.accept.messages
        self.assertEqual(m.sender, "alice@example.test")
        self.assertIn(b"Subject: relay test\n", m.data)
        # The same process relayed it: nothing restarted.
        self.assertEqual(relay_pids(self.server.proc.pid), [pid])
        self.assertNotIn("relay process ended", self.log_text())

    @defer.inlineCallbacks
    def test_a_remote_reply_with_line_breaks_is_one_escaped_line_in_the_server_log(self):
        yield self.start_server()
        refused = yield self.submit("x@hostile.test")
        self.assertEqual(refused, {})
        yield self.wait_for(lambda: "status=bounced" in self.log_text(), what="the bounce line")
        yield self.wait_for(self.queue_empty, what="an empty queue")
        text = self.log_text()
        self.assertEqual(self.hostile.rcpt_counts["x@hostile.test"], 1)
        # Forwarded by the relay process, written by the server: one line, the
        # control character escaped, no line of the remote server's making.
        self.assertNotIn("\x1b", text)
        self.assertFalse([x for x in text.splitlines() if x.startswith("2026-01-01T00:00:00")])
        (line,) = [x for x in text.splitlines() if "status=bounced" in x]
        self.assertIn("[mailsrv.outbound.relayer.Relayer#info]", line)
        self.assertIn(
            "(550 5.1.1 no such user 2026-01-01T00:00:00 [forged#info] \\x1b[2Jhello)", line
        )
        self.assertEqual(text.count("[2Jhello"), 1)

    @defer.inlineCallbacks
    def test_kill_9_of_the_relay_process_starts_a_new_one_and_nothing_is_lost(self):
        yield self.start_server()
        first = yield self.wait_for(self.the_relay_process, what="the relay process")
        yield self.submit("before@accept.test", "before")
        yield self.wait_for(
            lambda: self.accept.delivered("before@accept.test") == 1, what="the first message"
        )
        # Delivery is at least once (as Postfix's): a kill between the remote's
        # 250 and the removal of the queue file sends it again. Kill only after.
        yield self.wait_for(self.queue_empty, what="the first message out of the queue")

        os.kill(first, signal.SIGKILL)
        yield self.wait_for(
            lambda: "relay process ended" in self.log_text(), what="the server noticing"
        )
        self.assertIn("starting it again in 1s", self.log_text())
        second = yield self.wait_for(
            lambda: (p := self.the_relay_process()) not in (None, first) and p,
            what="a new relay process",
        )
        self.assertIn(WORKER, _cmdline(second))
        yield self.wait_for(
            lambda: self.log_count("relayer started with") == 2, what="the new relayer"
        )

        # Killed again it is started after a longer pause (back-off): a message
        # submitted then is queued while no relay process runs.
        os.kill(second, signal.SIGKILL)
        yield self.wait_for(
            lambda: "starting it again in 2s" in self.log_text(), what="the second restart"
        )
        yield self.submit("down@accept.test", "while down")
        self.assertEqual(
            relay_pids(self.server.proc.pid),
            [],
            "the relay process came back before the message was queued: the test proves nothing",
        )
        third = yield self.wait_for(
            lambda: (p := self.the_relay_process()) not in (None, first, second) and p,
            what="a third relay process",
        )
        yield self.wait_for(
            lambda: self.accept.delivered("down@accept.test") == 1,
            what="the message queued while it was down",
        )
        self.assertIn("relayer started with 1 queued message(s)", self.log_text())

        yield self.submit("after@accept.test", "after")
        yield self.wait_for(
            lambda: self.accept.delivered("after@accept.test") == 1, what="a message after"
        )
        yield self.wait_for(self.queue_empty, what="an empty queue")
        self.assertEqual(relay_pids(self.server.proc.pid), [third])
        self.assertFalse(_alive(first) or _alive(second))
        for rcpt in ("before", "down", "after"):
            self.assertEqual(self.accept.delivered(f"{rcpt}@accept.test"), 1, rcpt)
        self.assertEqual(len(self.accept.messages), 3)
        self.assertEqual(self.log_count("status=sent"), 3)

    @defer.inlineCallbacks
    def test_sigterm_stops_the_server_and_its_relay_process(self):
        yield self.start_server()
        pid = yield self.wait_for(self.the_relay_process, what="the relay process")
        yield self.submit("ok@accept.test")
        yield self.wait_for(
            lambda: self.accept.delivered("ok@accept.test") == 1, what="the relayed message"
        )
        yield self.wait_for(self.queue_empty, what="an empty queue")

        code = yield threads.deferToThread(self.server.stop, 20.0)
        self.assertIn(code, STOPPED_BY_SIGTERM, self.server.output())
        yield self.wait_for(lambda: not _alive(pid), timeout=10, what="the relay process to exit")
        log = self.log_text()
        self.assertNotIn("relay process ended", log)
        self.assertNotIn("killing it", log)
        self.assertEqual(self.tmp_files(), [])
        # Nobody holds the relay lock any more.
        fd = os.open(self.queue_dir / "relay.lock", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        self.assertEqual(self.accept.delivered("ok@accept.test"), 1)

    @defer.inlineCallbacks
    def test_sigterm_with_mail_queued_leaves_it_for_the_next_run(self):
        self.queue_dir.mkdir(parents=True)
        lock = self.hold_relay_lock()
        yield self.start_server(relaying=False)
        pid = yield self.wait_for(self.the_relay_process, what="the relay process")
        yield self.wait_for(
            lambda: "waiting for the relay process of an earlier run" in self.log_text(),
            what="the relay process waiting",
        )
        yield self.submit("ok@accept.test")

        code = yield threads.deferToThread(self.server.stop, 20.0)
        self.assertIn(code, STOPPED_BY_SIGTERM, self.server.output())
        yield self.wait_for(lambda: not _alive(pid), timeout=10, what="the relay process to exit")
        self.assertEqual(self.tmp_files(), [])
        self.assertEqual(self.accept.messages, [])
        lock.release()

        yield threads.deferToThread(self.server.start)
        yield self.wait_for(
            lambda: self.accept.delivered("ok@accept.test") == 1, what="delivery on the next run"
        )
        yield self.wait_for(self.queue_empty, what="an empty queue")
        self.assertEqual(len(self.accept.messages), 1)

    def hold_relay_lock(self) -> RelayLock:
        lock = RelayLock(self.queue_dir)
        self.addCleanup(lock.release)
        return lock

    @defer.inlineCallbacks
    def test_relay_process_waits_for_the_relay_lock(self):
        self.queue_dir.mkdir(parents=True)
        lock = self.hold_relay_lock()
        yield self.start_server(relaying=False)
        yield self.wait_for(self.the_relay_process, what="the relay process")
        yield self.wait_for(
            lambda: "waiting for the relay process of an earlier run" in self.log_text(),
            what="the relay process waiting",
        )
        refused = yield self.submit("ok@accept.test")
        self.assertEqual(refused, {})
        # Well past the relay's lock retry (0.5s): still nothing sent.
        yield task.deferLater(self.reactor, 2.0, lambda: None)
        self.assertEqual(self.accept.connections, 0)
        self.assertEqual(self.accept.messages, [])
        self.assertNotIn("status=", self.log_text())
        self.assertNotIn("relayer started", self.log_text())
        self.assertEqual(self.log_count("waiting for the relay process of an earlier run"), 1)
        self.assertFalse(self.queue_empty())

        lock.release()
        yield self.wait_for(
            lambda: self.accept.delivered("ok@accept.test") == 1, what="delivery after the lock"
        )
        yield self.wait_for(self.queue_empty, what="an empty queue")
        self.assertEqual(len(self.accept.messages), 1)
        self.assertEqual(self.log_count("status=sent"), 1)


class RelayLock:
    """The queue's relay lock held by the test process, as a relay process of an earlier run would."""

    def __init__(self, queue_dir: Path) -> None:
        self.fd: int | None = os.open(
            queue_dir / "relay.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- the server's end of the pipes, in memory ----------------------------------


class _Client(amp.AMP):
    pass


class ServerSideTests(unittest.TestCase):
    """ServerSide driven by an AMP peer over iosim, storing into the in-memory store."""

    def setUp(self):
        self.tmp = temp_dir(self)
        self.queue_dir = self.tmp / "queue"
        (self.queue_dir / "tmp").mkdir(parents=True)
        self.store = MemoryMailStore(clock=lambda: 1_700_000_000.0)
        self.server = ServerSide(self.store, self.queue_dir)
        self.client, _, self.pump = iosim.connectedServerAndClient(
            lambda: self.server, _Client, greet=False
        )

    def call(self, command, **kw):
        """
        Send a command and deliver the bytes both ways. AMP hands an error
        nobody handles yet to unhandledError (and drops the connection), so
        the result is taken into a Deferred of our own before the answer comes.
        """
        result: defer.Deferred = defer.Deferred()
        self.client.callRemote(command, **kw).chainDeferred(result)
        self.pump.flush()
        return result

    def inbox(self, user: str) -> list[bytes]:
        folder = self.successResultOf(self.store.open_folder(user, "INBOX"))
        return [folder.open_message(i.uid).read() for i in folder.messages()]

    def deliver(self, **kw):
        args = {"recipient": "bob@example.test", "sender": "alice@example.test"}
        args.update(kw)
        return self.call(ipc.DeliverLocal, **args)

    def test_deliver_with_data_stores_the_message(self):
        data = b"Subject: hi\n\nbody\n"
        self.assertEqual(self.successResultOf(self.deliver(size=len(data), data=data)), {})
        self.assertEqual(
            self.inbox("bob@example.test"),
            [b"Return-Path: <alice@example.test>\r\nSubject: hi\r\n\r\nbody\r\n"],
        )

    def test_deliver_from_a_file_in_the_queue_folder(self):
        for folder in (self.queue_dir, self.queue_dir / "tmp"):
            path = folder / "m1.msg"
            path.write_bytes(b"Subject: from disk\n\nbody\n")
            self.successResultOf(self.deliver(size=path.stat().st_size, path=str(path)))
        self.assertEqual(
            self.inbox("bob@example.test"),
            [b"Return-Path: <alice@example.test>\r\nSubject: from disk\r\n\r\nbody\r\n"] * 2,
        )

    def test_deliver_refuses_a_path_outside_the_queue_folder(self):
        outside = self.tmp / "secret"
        outside.write_bytes(b"Subject: secret\n\nnot for bob\n")
        sneaky = self.queue_dir / "tmp" / ".." / ".." / "secret"
        nested = self.queue_dir / "tmp" / "sub"
        nested.mkdir()
        (nested / "m").write_bytes(b"x\n")
        for path in (
            outside,
            sneaky,
            nested / "m",
            Path("queue") / "tmp" / "m",
            Path("/etc/hosts"),
        ):
            f = self.failureResultOf(self.deliver(size=10, path=str(path)))
            f.trap(ipc.LocalDeliveryFailed)
            self.assertIn("not a queue file", str(f.value))
        f = self.failureResultOf(self.deliver(size=0))
        f.trap(ipc.LocalDeliveryFailed)
        self.assertEqual(self.inbox("bob@example.test"), [])

    def test_deliver_without_a_store_fails(self):
        self.server.store = None
        f = self.failureResultOf(self.deliver(size=3, data=b"x\n"))
        f.trap(ipc.LocalDeliveryFailed)
        self.assertIn("no local mailboxes", str(f.value))

    def test_a_store_failure_comes_back_as_local_delivery_failed(self):
        class Broken:
            def deliver(self, user, source, sender):
                return defer.fail(OSError(28, "No space left on device"))

        self.server.store = Broken()
        f = self.failureResultOf(self.deliver(size=3, data=b"x\n"))
        f.trap(ipc.LocalDeliveryFailed)
        self.assertIn("No space left on device", str(f.value))

    def send_log(self, *entries: tuple[str, str, str]) -> None:
        """
        Send (namespace, level, text) log events as the relay process does: one
        Log command per event, or, where Log carries a JSON list of items, one
        command for all of them (both shapes have existed; the test checks what
        the server writes, not the wire format).
        """
        names = [name for name, _ in ipc.Log.arguments]
        if names == [b"items"]:
            items = json.dumps([list(e) for e in entries]).encode("utf-8")
            self.assertIsNone(self.client.callRemote(ipc.Log, items=items))
        else:
            for namespace, level, text in entries:
                self.assertIsNone(
                    self.client.callRemote(ipc.Log, namespace=namespace, level=level, text=text)
                )
        self.pump.flush()

    def test_log_events_are_written_into_the_servers_log(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        text = "Q1: to=<x@y.test>, status=sent (250 ok {not a field})"
        self.send_log(
            ("mailsrv.outbound.relayer.Relayer", "warn", text),
            ("x.y", "nonsense", "odd level"),
        )
        mine = [
            e
            for e in events
            if e.get("log_namespace") in ("mailsrv.outbound.relayer.Relayer", "x.y")
        ]
        self.assertEqual(len(mine), 2)
        first, second = mine
        self.assertEqual(first["log_level"], LogLevel.warn)
        self.assertEqual(formatEvent(first), text)
        self.assertEqual(second["log_level"], LogLevel.info)
        self.assertEqual(formatEvent(second), "odd level")
        self.assertEqual(self.client.transport.disconnecting, False)


# --- the service that runs the relay process, on a fake reactor ---------------


class _FakeProcess:
    """What RelayProcessService sees of a spawned process."""

    def __init__(self, proto, argv, child_fds) -> None:
        self.proto = proto
        self.argv = argv
        self.child_fds = child_fds
        self.written: list[tuple[int, bytes]] = []
        self.closed: list[int] = []
        self.signals: list[str] = []
        self.pid = 4242

    def closeStdin(self) -> None:
        self.closed.append(0)

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append((fd, data))

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)

    def answer(self, tag: bytes) -> None:
        """The relay process answers the server's command number C{tag}."""
        self.proto.childDataReceived(ipc.CHILD_OUT, amp.AmpBox(_answer=tag).serialize())

    def end(self, reason: Exception) -> None:
        """The process is gone: its pipe closes, then it is reaped."""
        self.proto.childConnectionLost(ipc.CHILD_OUT)
        self.proto.processEnded(Failure(reason))


class _ProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[_FakeProcess] = []
        self.from_threads: list = []  # results of the disk pool's work, never delivered

    def callFromThread(self, f, *args, **kw) -> None:
        self.from_threads.append((f, args, kw))  # list.append: safe from any thread

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None, **kw):
        process = _FakeProcess(proto, args, childFDs)
        self.spawned.append(process)
        proto.makeConnection(process)
        return process


class _FakeQueue:
    def __init__(self) -> None:
        self.listeners: list = []

    def add_listener(self, f) -> None:
        self.listeners.append(f)

    def remove_listener(self, f) -> None:
        self.listeners.remove(f)

    def take_recent(self, queue_id):
        return None


class RelayProcessServiceTests(unittest.TestCase):
    """Spawning, restarting and stopping the relay process, with a fake reactor."""

    def setUp(self):
        tmp = temp_dir(self)
        self.reactor = _ProcessReactor()
        config = SimpleNamespace(
            queue_dir=tmp / "queue", source="", path=str(tmp / "mailsrv.toml"), base_dir=tmp
        )
        ctx = SimpleNamespace(config=config, reactor=self.reactor, store=MemoryMailStore())
        self.queue = _FakeQueue()
        self.service = RelayProcessService(ctx, self.queue)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self) -> _FakeProcess:
        """Start the service; its relay process answers Start (AMP's first tag)."""
        self.service.startService()
        (p,) = self.reactor.spawned
        p.answer(b"1")
        return p

    def logged(self, needle: str) -> list[str]:
        texts = [formatEvent(e) for e in self.events]
        return [t for t in texts if needle in t]

    def test_start_spawns_the_worker_with_the_amp_pipes(self):
        self.service.startService()
        (p,) = self.reactor.spawned
        self.assertEqual(p.argv[1:], ["-m", WORKER])
        self.assertEqual(p.child_fds[ipc.CHILD_IN], "w")
        self.assertEqual(p.child_fds[ipc.CHILD_OUT], "r")
        self.assertIn(0, p.closed)  # nothing on its standard input
        self.assertTrue(p.written)
        self.assertTrue(all(fd == ipc.CHILD_IN for fd, _ in p.written))
        self.assertIn(b"Start", b"".join(d for _, d in p.written))
        self.assertEqual(self.queue.listeners, [self.service.queued])

    def test_a_relay_process_that_dies_is_started_again_after_a_pause(self):
        first = self.start()
        first.end(error.ProcessTerminated(signal=9))
        self.assertEqual(len(self.logged("relay process ended")), 1)
        self.assertIsNone(self.service.proto)
        self.reactor.advance(RESTART_MIN - 0.01)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(0.02)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertIs(self.service.proto, self.reactor.spawned[1].proto)

    def test_stop_asks_the_relay_process_and_waits_for_it_to_end(self):
        p = self.start()
        before = len(p.written)
        d = self.service.stopService()
        self.assertIn(b"Stop", b"".join(data for _, data in p.written[before:]))
        self.assertNoResult(d)
        self.assertEqual(self.queue.listeners, [])
        p.end(error.ProcessDone(0))
        self.successResultOf(d)
        self.assertEqual(p.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # no kill timer, no restart
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_stop_kills_a_relay_process_that_does_not_end(self):
        p = self.start()
        d = self.service.stopService()
        self.reactor.advance(STOP_TIMEOUT - 0.01)
        self.assertEqual(p.signals, [])
        self.reactor.advance(0.02)
        self.assertEqual(p.signals, ["KILL"])
        self.assertNoResult(d)
        p.end(error.ProcessTerminated(signal=9))
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 1)
