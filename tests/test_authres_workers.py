"""
The verifier processes (mailsrv.authres.workers) on real processes: a job's
round trip (its DNS asked of a real DNS server on loopback, its results
pickled back), a worker killed in the middle of a job (temperror, and the
next job works), the step's timeout, and shutdown leaving no process, of a
pool and of a real ``twistd -n mailsrv``. The pool's processes are
spawned by the reactor and read by it: the pool tests run on trial's
reactor, a pool of their own each.
"""

from __future__ import annotations

import os
import pickle
import signal
import smtplib
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailsrv import config as configmod
from mailsrv.authres.spf import SpfResult
from mailsrv.authres.step import TIMEOUT, SenderAuthentication, build_authentication
from mailsrv.authres.worker_main import frame
from mailsrv.authres.workers import RESPAWN_FIRST, STOP_WAIT, VerifierPool, WorkerDied
from mailsrv.filter.verdict import ACCEPT, REJECT, Envelope
from mailsrv.spool import BytesSource

from .authres_support import message
from .e2e import MailServer, _alive, _children

ALICE = "alice@example.test"
ENVELOPE = Envelope("Q1", "bob@good.test", ("alice@example.test",), "192.0.2.7", helo="c.test")
SOFTFAIL = SpfResult("softfail", "mailfrom", "bob@good.test", "good.test")
SLOW = SpfResult("softfail", "mailfrom", "bob@slow.test", "slow.test")


class Zone:
    """
    A DNS server on loopback (dnspython, in a thread): _dmarc.good.test has
    p=reject, names under slow.test get no answer until L{answer_slow},
    the rest NXDOMAIN. C{asked_slow} is set when a slow name is asked.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.asked_slow = threading.Event()
        self._held: list[tuple[Any, Any]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text().rstrip(".")
            if name.endswith("slow.test"):
                self._held.append((query, peer))
                self.asked_slow.set()
                continue
            self._answer(query, peer)

    def _answer(self, query: Any, peer: Any) -> None:
        reply = dns.message.make_response(query)
        name = query.question[0].name
        if name.to_text() == "_dmarc.good.test." and query.question[0].rdtype == dns.rdatatype.TXT:
            reply.answer.append(dns.rrset.from_text(name, 60, "IN", "TXT", '"v=DMARC1; p=reject"'))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        self.sock.sendto(reply.to_wire(), peer)

    def answer_slow(self) -> None:
        """Answer (NXDOMAIN) what was held, and whatever is asked from now on."""
        held, self._held = self._held, []
        for query, peer in held:
            self._answer(query, peer)

    def close(self) -> None:
        self.sock.close()


def workers_of(pid: int) -> set[int]:
    """The live verifier processes started by C{pid}."""
    return {p for p, cmd in _children(pid).items() if b"mailsrv.authres.worker_main" in cmd}


def started_workers(server: MailServer) -> set[int]:
    """The verifier processes of a server, started by a message it takes."""
    assert server.proc is not None
    assert workers_of(server.proc.pid) == set()  # none before the first message
    server.add_user(ALICE)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=60) as s:
        s.ehlo("client.test")
        s.mail("bob@good.test")
        s.rcpt(ALICE)
        code, text = s.data(message("bob@good.test", "first"))
    # Verified in a process of its own, asking the zone: good.test has p=reject.
    assert (code, text) == (550, b"5.7.1 Email rejected per DMARC policy for good.test")
    return workers_of(server.proc.pid)


@pytest.fixture(scope="module")
def zone() -> Iterator[Zone]:
    z = Zone()
    yield z
    z.close()


def read(data: bytes) -> Any:
    return lambda: defer.succeed(data)


def until(reactor: Any, ready: Callable[[], bool], timeout: float = 30) -> defer.Deferred:
    """A Deferred that fires once C{ready()} is true, the reactor running meanwhile."""

    @defer.inlineCallbacks
    def poll() -> Any:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready within {timeout} s")
            yield task.deferLater(reactor, 0.02, lambda: None)

    return poll()


class PoolTests(unittest.TestCase):
    """A pool of real verifier processes on the real reactor, asking a DNS server on loopback."""

    timeout = 120

    def setUp(self) -> None:
        self.zone = Zone()
        self.addCleanup(self.zone.close)
        self.before = workers_of(os.getpid())
        self.pool = VerifierPool(reactor, 1, (("127.0.0.1", self.zone.port),))
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def auth(self, clock: Any = None) -> SenderAuthentication:
        return SenderAuthentication(
            resolver=None,  # type: ignore[arg-type]  # the workers have their own
            in_pool=lambda f: defer.succeed(f()),
            clock=clock or task.Clock(),
            authserv_id="mx.example.test",
            workers=self.pool,
        )

    @defer.inlineCallbacks
    def test_a_job_is_verified_in_another_process(self):
        data = message("bob@good.test", "x")
        dkims, arc, dmarc = yield self.pool.verify(read(data), SOFTFAIL, 10_000)
        assert [r.result for r in dkims] == ["none"]
        assert arc[0] == "none"
        # The worker asked the configured DNS server: good.test's p=reject.
        assert (dmarc.result, dmarc.from_domain, dmarc.disposition) == (
            "fail",
            "good.test",
            "reject",
        )
        assert workers_of(os.getpid()) - self.before  # a process of its own
        assert os.getpid() not in workers_of(os.getpid())

    @defer.inlineCallbacks
    def test_a_worker_killed_mid_job_gives_temperror_and_the_next_job_works(self):
        auth = self.auth()
        auth.spf(ENVELOPE.client_ip, ENVELOPE.helo or "", ENVELOPE.sender)._done(SLOW)
        d = auth.check(BytesSource(message("bob@slow.test", "x")), ENVELOPE)
        yield until(reactor, self.zone.asked_slow.is_set)  # the job is running in the worker
        [worker] = workers_of(os.getpid()) - self.before
        os.kill(worker, signal.SIGKILL)
        verdict = yield d
        assert verdict.action == ACCEPT
        assert b"dkim=temperror" in verdict.headers and b"dmarc=temperror" in verdict.headers
        assert worker not in workers_of(os.getpid())
        # A new process takes the next message.
        good = ENVELOPE
        auth.spf(good.client_ip, good.helo or "", good.sender)._done(SOFTFAIL)
        verdict = yield auth.check(BytesSource(message("bob@good.test", "y")), good)
        assert verdict.action == REJECT and b"dmarc=fail" in verdict.headers
        assert len(workers_of(os.getpid()) - self.before) == 1

    @defer.inlineCallbacks
    def test_a_job_that_does_not_finish_in_time_gives_temperror(self):
        clock = task.Clock()
        auth = self.auth(clock)
        auth.spf(ENVELOPE.client_ip, ENVELOPE.helo or "", ENVELOPE.sender)._done(SLOW)
        out: list[Any] = []
        auth.check(BytesSource(message("bob@slow.test", "late")), ENVELOPE).addBoth(out.append)
        yield until(reactor, self.zone.asked_slow.is_set)
        assert out == []
        clock.advance(TIMEOUT)
        [verdict] = out
        assert verdict.action == ACCEPT
        assert b"dkim=temperror" in verdict.headers and b"dmarc=temperror" in verdict.headers
        # The late job ends in its worker (its DNS answered), and the pool goes on.
        self.zone.answer_slow()
        again = yield self.pool.verify(read(message("bob@good.test", "z")), SOFTFAIL, 10_000)
        assert again[2].result == "fail"

    @defer.inlineCallbacks
    def test_stopping_the_pool_leaves_no_process(self):
        p = VerifierPool(reactor, 2, (("127.0.0.1", self.zone.port),))
        before = workers_of(os.getpid())
        p.start()
        result = yield p.verify(read(message("bob@good.test", "x")), SOFTFAIL, 10_000)
        assert result[2].result == "fail"
        started = workers_of(os.getpid()) - before
        assert len(started) == 2
        assert (yield p.stop()) is None
        assert not any(_alive(pid) for pid in started)
        # A job after the stop is not verified: the caller gives temperror.
        with pytest.raises(WorkerDied):
            yield p.verify(read(b"x"), SOFTFAIL, 10_000)


def test_twistd_leaves_no_verifier_process_when_it_stops(zone):
    config = f'[dns]\nnameservers = ["127.0.0.1:{zone.port}"]\n[policy]\nreverse_dns = false\n'
    with tempfile.TemporaryDirectory(prefix="verifier-e2e-") as tmp:
        server = MailServer(Path(tmp), extra=config)
        try:
            server.start()
            started = started_workers(server)
            assert len(started) == max(1, (os.cpu_count() or 1) - 1)
            assert server.stop() is not None  # it ended by itself on SIGTERM
            assert not any(_alive(pid) for pid in started)
        finally:
            server.close()


def test_verifier_processes_end_when_twistd_is_killed(zone):
    config = f'[dns]\nnameservers = ["127.0.0.1:{zone.port}"]\n[policy]\nreverse_dns = false\n'
    with tempfile.TemporaryDirectory(prefix="verifier-e2e-") as tmp:
        server = MailServer(Path(tmp), extra=config)
        try:
            server.start()
            started = started_workers(server)
            assert started
            server.kill()  # SIGKILL: no stopService
            deadline = time.monotonic() + 10
            while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
                time.sleep(0.05)  # each ends at the end of its input (the server's pipe)
            assert not any(_alive(pid) for pid in started)
        finally:
            server.close()


def test_the_processes_are_built_unless_zero(tmp_path):
    base = '[server]\nhostname = "mx.example.test"\ndomains = ["example.test"]\n'
    built = build_authentication(configmod.parse(base, "<test>", tmp_path), task.Clock(), None)
    assert built is not None and built.workers is not None
    assert built.workers.workers == max(1, (os.cpu_count() or 1) - 1)
    zero = base + "[policy]\nauthentication_workers = 0\n"
    threads = build_authentication(configmod.parse(zero, "<test>", tmp_path), task.Clock(), None)
    assert threads is not None and threads.workers is None


class FakeProcess:
    """A spawned process's transport: what was written to it, its stdin closed, signals sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written = b""
        self.stdin_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessClock(task.Clock):
    """A clock whose C{spawnProcess} records the process protocols it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeProcess, list[str]]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], **kw: Any) -> FakeProcess:
        transport = FakeProcess(1000 + len(self.spawned))
        proto.makeConnection(transport)
        self.spawned.append((proto, transport, args))
        return transport


def ended(signal_number: int | None = signal.SIGKILL) -> Failure:
    return Failure(ProcessTerminated(signal=signal_number))


def test_a_dead_process_is_replaced_after_a_back_off_that_doubles_until_one_answers():
    clock = ProcessClock()
    pool = VerifierPool(clock, 1, (("127.0.0.1", 5353),))
    out: list[Any] = []
    pool.verify(read(b"message"), SOFTFAIL, 10_000).addBoth(out.append)
    [(proto, process, args)] = clock.spawned  # started by the first job
    assert args[1:] == ["-m", "mailsrv.authres.worker_main", "127.0.0.1", "5353"]
    assert process.written  # the job, framed
    proto.processEnded(ended())
    [failure] = out
    assert failure.check(WorkerDied)
    # Replaced after 0.1 s, then 0.2 s after a second death in a row.
    assert len(clock.spawned) == 1
    clock.advance(RESPAWN_FIRST)
    assert len(clock.spawned) == 2
    clock.spawned[1][0].processEnded(ended())
    clock.advance(RESPAWN_FIRST)
    assert len(clock.spawned) == 2
    clock.advance(RESPAWN_FIRST)
    assert len(clock.spawned) == 3
    # A process that answers resets the back-off.
    proto, process, _ = clock.spawned[2]
    out.clear()
    pool.verify(read(b"message"), SOFTFAIL, 10_000).addBoth(out.append)
    [job_id] = [pickle.loads(process.written[4:])[0]]
    results = ([], ("none", ""), None)
    proto.outReceived(frame(pickle.dumps((job_id, True, results))))
    assert out == [results]
    proto.processEnded(ended())
    clock.advance(RESPAWN_FIRST)
    assert len(clock.spawned) == 4


def test_a_job_waits_for_a_process_with_room_and_the_stop_kills_a_process_that_lingers():
    clock = ProcessClock()
    pool = VerifierPool(clock, 2, max_jobs=10)
    pool.start()
    (a, pa, _), (b, pb, _) = clock.spawned
    for _ in range(5):
        pool.verify(read(b"message"), SOFTFAIL, 10_000)
    # Two in flight in each process; the fifth waits for room.
    assert (len(a.jobs), len(b.jobs)) == (2, 2)
    job_id = next(iter(a.jobs))
    a.outReceived(frame(pickle.dumps((job_id, True, ([], ("none", ""), None)))))
    assert (len(a.jobs), len(b.jobs)) == (2, 2)
    stopped: list[Any] = []
    pool.stop().addBoth(stopped.append)
    assert pa.stdin_closed and pb.stdin_closed
    a.processEnded(ended(None))
    assert stopped == [] and pb.signals == []
    clock.advance(STOP_WAIT)
    assert pb.signals == ["KILL"]
    b.processEnded(ended())
    assert stopped == [None]
    assert pa.signals == []
