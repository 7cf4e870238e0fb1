"""
Support for end-to-end tests: a real ``twistd -n mailsrv`` in a subprocess,
on loopback ports chosen free, with its config and data in a temporary folder.

The server is ready when its log says that every listener listens: nothing
probes its ports by connecting before then. (A probe to a port nobody
listens on yet can connect to itself, and the port it leaves in TIME_WAIT
is one the server then cannot bind.) A port chosen free can still be taken
by another process before the server binds it: the server then exits
("Address already in use"), and is started again on other free ports.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"
# The twistd script installed beside this Python (the venv's), as an administrator runs it.
TWISTD = str(Path(sys.executable).with_name("twistd"))
SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")
# Twisted's tcp.Port logs this once its socket listens.
LISTENING = re.compile(r" starting on (\d+)$", re.MULTILINE)
PORT_TAKEN = "Address already in use"
START_ATTEMPTS = 5
START_TIMEOUT = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """C{n} different ports that are free now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(host: str, port: int, timeout: float = 20.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                # No TIME_WAIT left behind that would keep the server from binding.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if s.getsockname() != s.getpeername():  # not connected to itself
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _listen(port: int) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> dict[int, bytes]:
    """The live child processes of C{pid} (the server's relay process), with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = _cmdline(int(entry.name))
    return found


def _read_from(path: Path, offset: int) -> str:
    """What C{path} holds from C{offset} on; all of it if it was rotated meanwhile."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size >= offset:
                f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


# The lookups a server makes of every client and message, which would go to
# this machine's own resolver: tests talk to loopback only, so they are off
# unless the test names its own DNS server on loopback ([dns] nameservers).
SYSTEM_DNS_LOOKUPS = {"reverse_dns": "false", "authentication_checks": "false"}


def loopback_dns_only(extra: str) -> str:
    """C{extra} (config lines) with the lookups of the system's resolver turned off."""
    if re.search(r"^nameservers\s*=", extra, re.M):
        return extra
    lines = "".join(
        f"{key} = {value}\n"
        for key, value in SYSTEM_DNS_LOOKUPS.items()
        if not re.search(rf"^{key}\s*=", extra, re.M)
    )
    if re.search(r"^\[policy\]\s*$", extra, re.M):
        return re.sub(r"^\[policy\]\s*$\n?", "[policy]\n" + lines, extra, count=1, flags=re.M)
    return f"{extra}\n[policy]\n{lines}"


class MailServer:
    """
    A mailsrv daemon for one test. Use it as a context manager, or call
    close() in a finally/addCleanup: that stops the server and whatever it
    started (its relay process), by pid. stop() and kill() stop the server
    alone, for tests that watch its relay process go by itself.
    """

    # How long close() lets the server's children (the relay process) end by
    # themselves once the server is gone, before it kills them.
    child_grace = 10.0

    def __init__(
        self,
        base: Path,
        domains=("example.test",),
        extra: str = "",
        log_to_stdout: bool = False,
        config_in_env: bool = False,
    ) -> None:
        """
        C{log_to_stdout}: twistd logs to its standard output (twistd.log), not server.log.
        C{config_in_env}: the config file is named by MAILSRV_CONFIG, not --config.
        """
        self.base = base
        self.log_to_stdout = log_to_stdout
        self.config_in_env = config_in_env
        self.data = base / "data"
        self.ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
        self.config_path = base / "mailsrv.toml"
        listen = "\n".join(f'{name} = ["{_listen(port)}"]' for name, port in self.ports.items())
        doms = ", ".join(f'"{d}"' for d in domains)
        self.config_path.write_text(
            "[server]\n"
            'hostname = "mx.example.test"\n'
            f"domains = [{doms}]\n"
            'data_dir = "data"\n'
            "[auth]\n"
            "failure_delay = 0.2\n"
            f"[listen]\n{listen}\n{loopback_dns_only(extra)}\n"
        )
        self.log_path = base / "twistd.log"
        self.proc: subprocess.Popen | None = None
        self.children: dict[int, bytes] = {}  # seen at stop()/kill(): pid -> command line

    # -- process control -------------------------------------------------------

    def start(self) -> MailServer:
        """
        Start the server and return once every listener listens, on other
        free ports if one was taken meanwhile (C{ports} is updated in place).
        """
        for attempt in range(START_ATTEMPTS):
            offsets = {p: _size(p) for p in (self.log_path, self.base / "server.log")}
            self._spawn()
            try:
                if self._wait_listening(offsets):
                    return self
            except BaseException as e:
                self.kill()
                self.reap()
                if not isinstance(e, Exception):
                    raise
                raise RuntimeError(f"server did not start:\n{self.output()}")
            if attempt < START_ATTEMPTS - 1:
                self._choose_other_ports()
        raise RuntimeError(f"server did not start, ports taken:\n{self.output()}")

    def _spawn(self) -> None:
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        config = ["--config", str(self.config_path)]
        if self.config_in_env:
            env["MAILSRV_CONFIG"] = str(self.config_path)
            config = []
        self.proc = subprocess.Popen(
            [
                TWISTD,
                "--nodaemon",
                "--pidfile=",
                "--logfile=-" if self.log_to_stdout else f"--logfile={self.base / 'server.log'}",
                "mailsrv",
                *config,
            ],
            cwd=str(self.base),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()

    def _wait_listening(self, offsets: dict[Path, int]) -> bool:
        """
        Wait until the log (read from C{offsets}) says every port listens:
        True; False if the server exited because a port was taken.
        """
        assert self.proc is not None
        wanted = set(self.ports.values())
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            exited = self.proc.poll() is not None  # before reading: no line is missed
            text = "".join(_read_from(p, offset) for p, offset in offsets.items())
            if wanted <= {int(port) for port in LISTENING.findall(text)}:
                return True
            if exited:
                if PORT_TAKEN in text:
                    self.proc.wait()
                    return False
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all of {sorted(wanted)} listening after {START_TIMEOUT}s")
            time.sleep(0.02)

    def _choose_other_ports(self) -> None:
        """New free ports for every listener, in C{ports} and the config file."""
        text = self.config_path.read_text()
        for name, port in zip(SERVICES, free_ports(len(SERVICES)), strict=True):
            line = f'{name} = ["{_listen(port)}"]'
            text = re.sub(rf"^{name} = \[.*\]$", line, text, count=1, flags=re.MULTILINE)
            self.ports[name] = port
        self.config_path.write_text(text)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, and SIGKILL after C{timeout}: the server's exit status (None if killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self._note_children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._note_children()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        """Stop the server, then the processes it started (L{reap}): nothing is left running."""
        try:
            self.stop()
        finally:
            self.reap()

    def reap(self) -> None:
        """
        Wait up to C{child_grace} for the server's children seen at stop() or
        kill() to end (the relay process does once its pipe closes), then kill,
        by pid, those still running the same command line.
        """
        deadline = time.monotonic() + self.child_grace
        left = dict(self.children)
        while left:
            left = {p: c for p, c in left.items() if _alive(p) and _cmdline(p) == c}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.01)  # a killed process takes a moment to end
        self.children = {}

    def _note_children(self) -> None:
        assert self.proc is not None
        self.children.update(_children(self.proc.pid))

    def output(self) -> str:
        text = ""
        for p in (self.log_path, self.base / "server.log"):
            if p.exists():
                text += p.read_text(errors="replace")[-6000:]
        return text

    # -- administration ---------------------------------------------------------

    def cli(self, *args: str, stdin: str | None = None, check: bool = True):
        return subprocess.run(
            [sys.executable, "-m", "mailsrv", "--config", str(self.config_path), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def add_user(self, address: str, password: str = PASSWORD) -> None:
        self.cli("user", "add", address, stdin=password + "\n")

    def inbox(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.data / "mail" / domain.lower() / local / "INBOX"

    def __enter__(self) -> MailServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
