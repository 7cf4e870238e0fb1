"""
The end-to-end harness (L{tests.e2e.MailServer}) leaves nothing running:
leaving its C{with} block ends the server and the relay process it started,
even when the relay process cannot see the server go.
"""

from __future__ import annotations

import os
import re
import signal
import time

from tests.e2e import MailServer, _alive


def _relay_pid(srv: MailServer, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(r"relay process started \(pid (\d+)\)", srv.output())
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise AssertionError(f"no relay process started:\n{srv.output()}")


def test_leaving_the_block_ends_a_relay_process_that_missed_the_server_going(tmp_path):
    srv = MailServer(tmp_path)
    srv.child_grace = 1.0
    pid = None
    try:
        with srv:
            pid = _relay_pid(srv)
            os.kill(pid, signal.SIGSTOP)  # it cannot notice its pipe close
            srv.kill()
            assert _alive(pid)
        assert not _alive(pid)
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_failing_block_stops_the_server_and_its_relay_process(tmp_path):
    srv = MailServer(tmp_path)
    pids = []
    try:
        with srv:
            assert srv.proc is not None
            pids = [srv.proc.pid, _relay_pid(srv)]
            raise KeyError("set-up failed")
    except KeyError:
        pass
    finally:
        alive = [p for p in pids if _alive(p)]
        for p in alive:
            os.kill(p, signal.SIGKILL)
    assert pids and alive == []
