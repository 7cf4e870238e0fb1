#!/usr/bin/env python3
"""
Many idle connections at once, mailsrv side by side with Dovecot (IMAP, POP3)
and Postfix (SMTP): how much memory each connection costs, and whether a NOOP
on a new connection is still answered at once.

    sudo .venv/bin/python benchmarks/load_bench.py [-n 1000] [--smtp 100] [--noops 500] [--repeat 3]

Per round and server: -n logged-in IMAP sessions with INBOX selected (one per
user), -n logged-in POP3 sessions (the same users: POP3 locks a maildrop per
user) and --smtp SMTP sessions in the middle of a message (after DATA and a
few lines), all idle on 127.0.0.1; then --noops NOOPs one by one on a new
IMAP, POP3 and SMTP connection (IMAP: over 5 connections), timed each.

Memory is the total RSS and PSS (shared pages divided among the processes
that map them) of the server's processes, read from /proc/PID/smaps_rollup
before and after each kind of connection: for mailsrv the server and its
relay and verifier processes; for Dovecot the master and every process it
forked (a process per connection); for Postfix the master and its children
(an smtpd per connection). KB per connection = the growth / the connections.

mailsrv runs as tests/e2e.MailServer starts it (twistd -n mailsrv in a
temporary folder), with the connection limits lifted ([policy]
max_connections = 0, max_connections_per_ip = 0,
connections_per_ip_per_minute = 0); the defaults (1,000 in all, 20 per
address) refuse this load from one address, as they should. Dovecot and
Postfix run as private instances in /tmp/mailsrv-load (configured as
../shared/peers does, with their process and client limits raised for
the load, and Postfix's smtpd_junk_command_limit lifted: past 100 NOOPs it
counts them as errors and slows down). The passwords are hashed cheaply for
all three: logins are set-up here, not what is measured. The rounds
alternate which server goes first; printed: the median [min-max] over the
rounds. Needs root; only the
processes started here are stopped, by their pid.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MAILSRV_ALLOW_ROOT", "1")  # a benchmark run as root, as the peers are

from tests.e2e import MailServer  # noqa: E402
from tests.load_support import (  # noqa: E402
    NO_CONNECTION_LIMITS,
    Idle,
    imap_noops,
    imap_session,
    memory_kb,
    pop3_noops,
    pop3_session,
    process_tree,
    smtp_noops,
    smtp_session,
    write_passwd,
)

WORK = Path("/tmp/mailsrv-load")
PASSWORD = "pass"
DOMAIN = "example.test"
PROBE = "probe"  # the user of the timed NOOPs
PEER_UID = 5000  # the peers' mailbox owner, as ../shared/peers
OPEN_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def read_pid(path: Path, timeout: float = 20) -> int:
    """The pid a server wrote to C{path}, once it has."""
    end = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text().strip()
            if text:
                return int(text)
        except OSError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"no pid in {path}")
        time.sleep(0.05)


def stop_pid(pid: int, timeout: float = 30) -> None:
    """SIGTERM C{pid} and wait until it is gone (SIGKILL after C{timeout})."""
    try:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- the servers ---------------------------------------------------------------------


class Mailsrv:
    """mailsrv, all three protocols."""

    name = "mailsrv"

    def __init__(self, n: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mailsrv-load-"))
        self.server = MailServer(self.base, extra=NO_CONNECTION_LIMITS)
        self.n = n

    def user(self, i: int) -> str:
        return f"load{i}@{DOMAIN}"

    @property
    def probe(self) -> str:
        return f"{PROBE}@{DOMAIN}"

    def start(self) -> None:
        self.server.start()
        users = [self.user(i) for i in range(self.n)] + [self.probe]
        write_passwd(self.server.data / "passwd", users, PASSWORD)
        self.ports = self.server.ports

    def pids(self) -> list[int]:
        assert self.server.proc is not None
        return process_tree(self.server.proc.pid)

    def stop(self) -> None:
        self.server.close()
        shutil.rmtree(self.base, ignore_errors=True)


class Dovecot:
    """A private Dovecot, IMAP and POP3 over mbox, configured as ../shared/peers does."""

    name = "dovecot"

    def __init__(self, n: int) -> None:
        self.dir = WORK / "dovecot"
        self.n = n
        self.ports = {"imap": free_port(), "pop3": free_port()}
        self.pid: int | None = None

    def user(self, i: int) -> str:
        return f"load{i}"

    probe = PROBE

    def start(self) -> None:
        d = self.dir
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("run", "state", "index", "mail", "mbox"):
            (d / sub).mkdir(parents=True)
        d.chmod(0o755)
        lines = []
        for u in [self.user(i) for i in range(self.n)] + [self.probe]:
            (d / "mbox" / u).mkdir()
            (d / "mail" / u).touch()
            for p in (d / "mbox" / u, d / "mail" / u):
                os.chown(p, PEER_UID, PEER_UID)
            lines.append(f"{u}:{{PLAIN}}{PASSWORD}:{PEER_UID}:{PEER_UID}::{d}/mbox/{u}::\n")
        for p in (d / "index", d / "mail", d / "mbox"):
            os.chown(p, PEER_UID, PEER_UID)
        (d / "users").write_text("".join(lines))
        limit = 2 * self.n + 500
        (d / "dovecot.conf").write_text(
            f"""instance_name = mailsrv-load-{self.ports["imap"]}
base_dir = {d}/run
state_dir = {d}/state
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {d}/log
first_valid_uid = 100
mail_location = mbox:{d}/mbox/%n:INBOX={d}/mail/%n:INDEX={d}/index/%n
mbox_read_locks = fcntl
mbox_write_locks = fcntl dotlock
default_process_limit = {limit}
default_client_limit = {2 * limit}
service auth {{
  client_limit = {4 * limit}
}}
service anvil {{
  client_limit = {4 * limit}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {d}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {d}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.ports["imap"]}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.ports["pop3"]}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
protocol imap {{
  mail_max_userip_connections = 200
}}
protocol pop3 {{
  mail_max_userip_connections = 200
}}
"""
        )
        log = open(d / "dovecot.out", "wb")
        subprocess.run(
            ["dovecot", "-c", str(d / "dovecot.conf")], check=True, stdout=log, stderr=log
        )
        self.pid = read_pid(d / "run" / "master.pid")
        wait_port(self.ports["imap"])
        wait_port(self.ports["pop3"])

    def pids(self) -> list[int]:
        assert self.pid is not None
        return process_tree(self.pid)

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


class Postfix:
    """
    A private Postfix, SMTP only, configured as ../shared/peers/postfix-start.sh
    does (virtual(8) into mbox files), on a port of its own.
    """

    name = "postfix"

    def __init__(self, n: int) -> None:
        self.dir = WORK / "postfix"
        self.ports = {"smtp": free_port()}
        self.n = n
        self.pid: int | None = None

    def start(self) -> None:
        d = self.dir
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("etc", "spool", "data", "mail"):
            (d / sub).mkdir(parents=True)
        shutil.chown(d / "data", "postfix", "postfix")
        os.chown(d / "mail", PEER_UID, PEER_UID)
        (d / "etc" / "vmailbox").write_text(f"rcpt@{DOMAIN} rcpt\n")
        (d / "etc" / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
meta_directory = /etc/postfix
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
command_directory = /usr/sbin
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {WORK}
maillog_file = {d}/maillog
myhostname = load.{DOMAIN}
mydomain = {DOMAIN}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks reject_unauth_destination
default_process_limit = {self.n + 100}
smtpd_client_connection_count_limit = 0
smtpd_junk_command_limit = 100000
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = texthash:{d}/etc/vmailbox
virtual_uid_maps = static:{PEER_UID}
virtual_gid_maps = static:{PEER_UID}
virtual_minimum_uid = 100
relayhost = [127.0.0.1]:9
smtp_dns_support_level = disabled
"""
        )
        services = [
            f"127.0.0.1:{self.ports['smtp']} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "proxymap unix - - n - - proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "virtual unix - n n - - virtual",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        (d / "etc" / "master.cf").write_text("\n".join(services) + "\n")
        etc = str(d / "etc")
        log = open(d / "postfix.out", "wb")
        subprocess.run(["postfix", "-c", etc, "set-permissions"], stdout=log, stderr=log)
        subprocess.run(["postfix", "-c", etc, "start"], check=True, stdout=log, stderr=log)
        self.pid = read_pid(d / "spool" / "pid" / "master.pid")
        wait_port(self.ports["smtp"])

    def pids(self) -> list[int]:
        assert self.pid is not None
        return process_tree(self.pid)

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


# --- one round -----------------------------------------------------------------------


def per_connection(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    return {k: (after[k] - before[k]) / n for k in ("rss", "pss")}


def run(mail, smtp, n: int, n_smtp: int, noops: int, rcpt: str) -> dict:
    """One round against C{mail} (IMAP, POP3) and C{smtp} (SMTP, maybe the same server)."""
    out: dict = {}
    idle = Idle()
    try:
        imap_noops(mail.ports["imap"], mail.probe, PASSWORD, 5)  # warm: the probe's folder open
        m0 = memory_kb(mail.pids())
        out["imap open s"] = idle.open(
            imap_session(mail.ports["imap"], mail.user, PASSWORD), n, OPEN_TIMEOUT
        )
        m1 = memory_kb(mail.pids())
        out["pop3 open s"] = idle.open(
            pop3_session(mail.ports["pop3"], mail.user, PASSWORD), n, OPEN_TIMEOUT
        )
        m2 = memory_kb(mail.pids())
        s0 = memory_kb(smtp.pids())
        idle.open(smtp_session(smtp.ports["smtp"], rcpt), n_smtp, OPEN_TIMEOUT)
        s1 = memory_kb(smtp.pids())
        out["imap KB/conn"] = per_connection(m0, m1, n)
        out["pop3 KB/conn"] = per_connection(m1, m2, n)
        out["smtp KB/conn"] = per_connection(s0, s1, n_smtp)
        out["total MB"] = {k: v / 1024 for k, v in m2.items()}
        latencies = {
            "imap": imap_noops(mail.ports["imap"], mail.probe, PASSWORD, noops // 5, 5),
            "pop3": pop3_noops(mail.ports["pop3"], mail.probe, PASSWORD, noops),
            "smtp": smtp_noops(smtp.ports["smtp"], noops),
        }
        for proto, lat in latencies.items():
            out[f"{proto} noop ms"] = {"median": lat.median_ms, "p99": lat.p99_ms}
        out["dropped"] = idle.check_open()
    finally:
        idle.close()
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="idle IMAP and idle POP3 sessions each")
    ap.add_argument("--smtp", type=int, default=100, help="SMTP sessions in DATA")
    ap.add_argument("--noops", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="mailsrv,peers")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (the peers run as private Dovecot and Postfix instances)")
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    which = args.only.split(",")
    results: dict[str, list[dict]] = {"mailsrv": [], "peers": []}
    print(f"load average {os.getloadavg()[0]:.2f}; -n {args.n} --smtp {args.smtp}", flush=True)
    for rnd in range(args.repeat):
        order = ["mailsrv", "peers"] if rnd % 2 == 0 else ["peers", "mailsrv"]
        for who in order:
            if who not in which:
                continue
            if who == "mailsrv":
                ours = Mailsrv(args.n)
                servers: list = [ours]
                mail, smtp, rcpt = ours, ours, ours.probe
            else:
                dovecot, postfix = Dovecot(args.n), Postfix(args.n)
                servers = [dovecot, postfix]
                mail, smtp, rcpt = dovecot, postfix, f"rcpt@{DOMAIN}"
            try:
                for s in servers:
                    s.start()
                r = run(mail, smtp, args.n, args.smtp, args.noops, rcpt)
            finally:
                for s in servers:
                    s.stop()
            results[who].append(r)
            print(f"round {rnd + 1} {who}: {r}", flush=True)
    print(f"\nmedian [min-max] of {args.repeat} rounds; load average {os.getloadavg()[0]:.2f}")
    for who, rows in results.items():
        if not rows:
            continue
        print(f"\n{who}:")
        for key in rows[0]:
            first = rows[0][key]
            if isinstance(first, dict):
                cells = ", ".join(f"{k} {spread([r[key][k] for r in rows])}" for k in first)
                print(f"  {key}: {cells}")
            else:
                print(f"  {key}: {spread([r[key] for r in rows])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
