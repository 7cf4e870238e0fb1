"""
A private Dovecot on 127.0.0.1 over one user's mbox INBOX, for comparing
answers with ours (the configuration of ../shared/peers/dovecot-start.sh,
with its own directory and a free port). Needs root and Dovecot installed;
L{available} says whether it can run here and why not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "sorter"
PASSWORD = "pass"
MAIL_UID = 5000  # as the peers' mailboxes: a numeric owner without a passwd entry


def available() -> str | None:
    """None if a private Dovecot can be started here, else the reason it cannot."""
    if not shutil.which("dovecot"):
        return "dovecot is not installed"
    if os.geteuid() != 0:
        return "a private dovecot needs root"
    return None


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class Dovecot:
    """One private Dovecot; C{start(mbox_bytes)}, then C{port}; C{stop()} ends it by its pid."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dovecot-sort-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.port = 0
        self.pid: int | None = None

    @property
    def inbox(self) -> Path:
        return self.dir / "mail" / USER

    def start(self, mbox: bytes | Path) -> None:
        d = self.dir
        for sub in ("run", "state", "index", "mail", "mbox", f"mbox/{USER}"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if isinstance(mbox, Path):
            shutil.copyfile(mbox, self.inbox)
        else:
            self.inbox.write_bytes(mbox)
        for p in (d / "index", d / "mail", d / "mbox", d / "mbox" / USER, self.inbox):
            os.chown(p, MAIL_UID, MAIL_UID)
        users = d / "users"
        users.write_text(f"{USER}:{{PLAIN}}{PASSWORD}:{MAIL_UID}:{MAIL_UID}::{d}/mbox/{USER}::\n")
        self.port = _free_port()
        (d / "dovecot.conf").write_text(
            f"""instance_name = sortpeer-{self.port}
base_dir = {d}/run
state_dir = {d}/state
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {d}/log
first_valid_uid = 100
mail_location = mbox:{d}/mbox/%n:INBOX={d}/mail/%n:INDEX={d}/index/%n
mbox_read_locks = fcntl
mbox_write_locks = fcntl dotlock
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {users}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
        )
        self.launch()

    def launch(self) -> None:
        """Start the master of the configuration written by L{start}; wait until it listens."""
        d = self.dir
        subprocess.run(["dovecot", "-c", str(d / "dovecot.conf")], check=True)
        pidfile = d / "run" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pidfile.exists() and pidfile.read_text().strip():
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                    break
                except OSError:
                    pass
            time.sleep(0.05)
        self.pid = int(pidfile.read_text().strip())

    def restart_cold(self, mbox: Path) -> None:
        """Stop, put a pristine copy of C{mbox} in place, drop the index, start again."""
        self.stop_master()
        shutil.rmtree(self.dir / "index" / USER, True)
        shutil.copyfile(mbox, self.inbox)
        os.chown(self.inbox, MAIL_UID, MAIL_UID)
        self.launch()

    def stop(self) -> None:
        """End the master (by its pid) and remove the directory."""
        self.stop_master()
        shutil.rmtree(self.dir, True)

    def stop_master(self) -> None:
        """End the master by its pid and wait until it is gone."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
            except ProcessLookupError:
                pass
            self.pid = None
            (self.dir / "run" / "master.pid").unlink(missing_ok=True)
