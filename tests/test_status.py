"""``mailsrv status`` without a daemon answering: a stale socket, the figures on disk."""

from __future__ import annotations

import io
import json
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

from mailsrv.config import parse
from mailsrv.status import SOCKET_NAME, age, clear_stale_socket, format_status, handle


def test_a_stale_socket_of_a_dead_daemon_means_not_running(tmp_path: Path) -> None:
    config = parse('[server]\ndata_dir = "data"\n', base_dir=tmp_path)
    config.queue_dir.mkdir(parents=True)
    # The socket a daemon killed with SIGKILL leaves: nobody listens on it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(config.server.data_dir / SOCKET_NAME))
    out = io.StringIO()
    assert handle(SimpleNamespace(json=False), config, out) == 1
    assert out.getvalue().splitlines() == [
        f"mailsrv is not running (nothing answers on {config.server.data_dir / SOCKET_NAME})",
        "queue: empty (on disk)",
    ]
    out = io.StringIO()
    assert handle(SimpleNamespace(json=True), config, out) == 1
    assert json.loads(out.getvalue()) == {
        "running": False,
        "queue": {"messages": 0, "oldest_age": 0.0},
    }


def test_format_status() -> None:
    doc = {
        "pid": 7,
        "uptime": 3725.0,
        "listeners": [{"name": "smtp", "endpoint": "tcp:25", "address": "0.0.0.0:25"}],
        "queue": {"messages": 2, "oldest_age": 90000.0},
        "connections": {"smtp": 3, "imap": 0},
        "counters": {"mailsrv_messages_received_total": 5.0},
    }
    text = format_status(doc)
    assert text.splitlines()[:5] == [
        "mailsrv is running (pid 7, up 1h 2m)",
        "listeners:",
        "  smtp         0.0.0.0:25               tcp:25",
        "queue: 2 messages, oldest 1d 1h",
        "open connections: smtp 3",
    ]
    assert "  received        5" in text.splitlines()
    assert [age(s) for s in (5, 125, 7300)] == ["5s", "2m", "2h 1m"]


def test_only_a_socket_nobody_answers_on_is_removed(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    assert clear_stale_socket(path) is None  # nothing there
    path.write_text("not mine")
    assert clear_stale_socket(path) == "it is not a socket"
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        assert clear_stale_socket(path) == "another mailsrv answers there"
    assert path.exists()  # closed now, its file left behind
    assert clear_stale_socket(path) is None
    assert not path.exists()


def test_a_daemon_too_busy_to_take_the_check_keeps_its_socket(tmp_path: Path) -> None:
    # Its backlog full, a live daemon's socket takes no connection: the start
    # of a second daemon must neither wait for it for ever nor remove it.
    path = tmp_path / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(0)
        waiting = []
        while True:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            waiting.append(c)
            try:
                c.connect(str(path))
            except BlockingIOError:
                break
        answer: list[str | None] = []
        check = threading.Thread(
            target=lambda: answer.append(clear_stale_socket(path, timeout=0.2)), daemon=True
        )
        check.start()
        check.join(5)
        for c in waiting:
            c.close()
        assert answer == ["another mailsrv listens there (it does not answer)"]
        assert path.exists()
