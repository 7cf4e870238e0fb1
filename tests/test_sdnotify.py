"""
sd_notify(3) for systemd's C{Type=notify}: a real C{twistd -n mailsrv} with
C{$NOTIFY_SOCKET} naming a unix datagram socket says C{READY=1} once every
listener accepts, C{RELOADING=1} then C{READY=1} around a SIGHUP, and
C{STOPPING=1} on SIGTERM; without C{$NOTIFY_SOCKET} it sends nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailsrv.hangup import HangupService
from mailsrv.sdnotify import EXTEND_BY, EXTEND_EVERY, Notifier, NotifyService
from mailsrv.startup import StartGate
from tests.e2e import MailServer


def datagram_socket(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(0.0)
    return s


def received(s: socket.socket) -> list[dict[str, str]]:
    """The datagrams waiting on C{s}, each as its C{KEY=value} lines."""
    out = []
    while True:
        try:
            data = s.recv(4096)
        except BlockingIOError:
            return out
        out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


class Datagrams:
    """What arrives on a socket, in order, read on demand."""

    def __init__(self, s: socket.socket) -> None:
        self.socket = s
        self.seen: list[dict[str, str]] = []
        self.cursor = 0

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        """The next datagram (after the last one returned) that has C{key}."""
        deadline = time.monotonic() + timeout
        while True:
            self.seen.extend(received(self.socket))
            while self.cursor < len(self.seen):
                message = self.seen[self.cursor]
                self.cursor += 1
                if key in message:
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key} after {timeout}s; got {self.seen}")
            time.sleep(0.02)


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        return c.recv(512)


def test_nothing_is_sent_without_notify_socket():
    assert Notifier(None).ready("up") is False
    assert Notifier("").stopping() is False


def test_abstract_socket_and_ready_waits_for_the_gate():
    name = f"@mailsrv-test-{os.getpid()}-{time.monotonic_ns()}"
    with datagram_socket("\0" + name[1:]) as s:
        notifier = Notifier(name)
        gate = StartGate()
        svc = NotifyService(notifier, gate, reactor=Clock())
        svc.privilegedStartService()
        svc.startService()
        assert [m.get("READY") for m in received(s)] == [None]  # STATUS=starting only
        gate.open()
        (ready,) = received(s)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(os.getpid())
        svc.stopService()
        assert received(s) == [{"STOPPING": "1", "STATUS": "stopping"}]
        notifier.close()


def test_more_time_is_asked_while_the_recovery_holds_the_listeners():
    name = f"@mailsrv-test-{os.getpid()}-{time.monotonic_ns()}"
    with datagram_socket("\0" + name[1:]) as s:
        notifier = Notifier(name)
        gate = StartGate()
        clock = Clock()
        svc = NotifyService(notifier, gate, reactor=clock)
        svc.privilegedStartService()
        svc.startService()
        assert received(s) == [{"STATUS": "starting"}]
        extended = []
        for _ in range(3):  # a recovery that outlasts TimeoutStartSec
            clock.advance(EXTEND_EVERY)
            (message,) = received(s)
            extended.append(int(message["EXTEND_TIMEOUT_USEC"]))
        assert extended == [int(EXTEND_BY * 1_000_000)] * 3
        assert EXTEND_BY > EXTEND_EVERY  # each ask reaches past the next one
        gate.open()
        assert [m.get("READY") for m in received(s)] == ["1"]
        clock.advance(EXTEND_EVERY * 3)
        assert received(s) == []  # no more asks once ready
        svc.stopService()
        notifier.close()


class FakeTLS:
    """A ServerTLS whose files are always read again fine."""

    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> Path:
        self.reloads += 1
        return Path("/etc/ssl/cert.pem")


def test_sighup_during_the_start_up_waits_for_the_listeners():
    """READY=1 is never sent before the start-up gate opens, SIGHUP or not."""
    name = f"@mailsrv-test-{os.getpid()}-{time.monotonic_ns()}"
    with datagram_socket("\0" + name[1:]) as s:
        notifier = Notifier(name)
        gate = StartGate()
        clock = Clock()
        tls = FakeTLS()
        ready = NotifyService(notifier, gate, reactor=clock)
        hangup = HangupService(tls, clock, notifier, gate)  # type: ignore[arg-type]
        hangup.startService()
        assert hangup.reload() is None  # before the listeners are even started
        ready.startService()
        try:
            assert hangup.reload() is None  # twice: one reload after the start-up
            assert received(s) == []
            assert tls.reloads == 0
            gate.open()
            clock.advance(0)
            keys = [[k for k in m if k not in ("STATUS", "MAINPID")] for m in received(s)]
            assert keys == [["READY"], ["RELOADING", "MONOTONIC_USEC"], ["READY"]]
            assert tls.reloads == 1
        finally:
            hangup.stopService()
            notifier.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_twistd_notifies_ready_reloading_and_stopping(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    if len(str(path)) >= 100:  # sun_path is 108 bytes
        pytest.skip("tmp_path too long for a unix socket name")
    with datagram_socket(str(path)) as s:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        srv = MailServer(tmp_path)
        got = Datagrams(s)
        with srv:
            assert srv.proc is not None
            ready = got.wait_for("READY")
            # Every port accepts, and the sessions have started, when READY=1 arrives.
            assert greeting(srv.ports["smtp"]).startswith(b"220 ")
            assert greeting(srv.ports["pop3"]).startswith(b"+OK")
            assert greeting(srv.ports["imap"]).startswith(b"* OK")
            assert ready["MAINPID"] == str(srv.proc.pid)
            assert got.seen[0] == {"STATUS": "starting"}

            srv.proc.send_signal(signal.SIGHUP)
            reloading = got.wait_for("RELOADING")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            assert got.wait_for("READY")["READY"] == "1"
            assert srv.proc.poll() is None

            srv.stop()
            assert got.wait_for("STOPPING", timeout=5)["STOPPING"] == "1"
        keys = [next(iter(k for k in m if k != "STATUS"), "STATUS") for m in got.seen]
        assert keys == ["STATUS", "READY", "RELOADING", "READY", "STOPPING"]
