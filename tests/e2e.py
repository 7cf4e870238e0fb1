"""
Support for end-to-end tests: a real ``twistd -n mailsrv`` in a subprocess,
on loopback ports chosen free, with its config and data in a temporary folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"
# The twistd script installed beside this Python (the venv's), as an administrator runs it.
TWISTD = str(Path(sys.executable).with_name("twistd"))
SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 20.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class MailServer:
    """A mailsrv daemon for one test; call stop() (or kill()) when done."""

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
        self.ports = {name: free_port() for name in SERVICES}
        self.config_path = base / "mailsrv.toml"
        listen = "\n".join(
            f'{name} = ["tcp:{port}:interface=127.0.0.1"]' for name, port in self.ports.items()
        )
        doms = ", ".join(f'"{d}"' for d in domains)
        self.config_path.write_text(
            "[server]\n"
            'hostname = "mx.example.test"\n'
            f"domains = [{doms}]\n"
            'data_dir = "data"\n'
            "[auth]\n"
            "failure_delay = 0.2\n"
            f"[listen]\n{listen}\n{extra}\n"
        )
        self.log_path = base / "twistd.log"
        self.proc: subprocess.Popen | None = None

    # -- process control -------------------------------------------------------

    def start(self) -> MailServer:
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
        try:
            for name in ("smtp", "pop3", "imap"):
                wait_for_port("127.0.0.1", self.ports[name], proc=self.proc)
        except Exception:
            self.kill()
            raise RuntimeError(f"server did not start:\n{self.output()}")
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

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
        self.stop()
