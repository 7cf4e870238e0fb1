#!/usr/bin/env python3
"""
The cost of the routing step per recipient with 10,000 aliases: in process
(L{mailsrv.routing.Router.resolve}, µs a call) and over the wire (RCPT round
trips on a real ``twistd -n mailsrv``, one command at a time), beside the
same server with no aliases file, and optionally beside Postfix with the same
users and aliases in C{virtual_alias_maps}.

    .venv/bin/python benchmarks/routing_bench.py [--users 1000] [--aliases 10000]
        [--repeat 5] [--calls 20000] [--rcpts 1000] [--reloads 5] [--postfix]
        [--only inproc|wire|reload]

Every figure is C{median [min-max]} of --repeat rounds; the servers (or
routers) alternate within a round, in an order that flips every round, so a
noisy moment on this shared machine does not fall on one side only. In
process, a round's figure is this thread's CPU time per call, the best of
five batches (time spent waiting for a core is not the routing step's).

The data, made in a temporary folder: a real password file (one argon2 hash
shared by every line) with --users users, most in C{example.test}, ten in
the IDN domain C{bücher.example}; an aliases file of --aliases entries: bare
names and full addresses (in C{example.test} and C{example.org}), one- and
three-hop chains, C{:include:} lists of 20 members, and fan-out lists of ten
local and two remote members.

"reload": while one client sends RCPTs without pause, the aliases file is
replaced (one alias more); reported are the time until the server takes the
new alias (asked for every 10 ms; the watcher looks every few seconds, then
parses on the disk thread pool) and the RCPT latencies meanwhile, beside
those of the same time just before.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e import MailServer, free_ports  # noqa: E402

DOMAINS = ("example.test", "example.org", "bücher.example")
IDN_ACE = "xn--bcher-kva.example"
IDN_USERS = 10
INCLUDE_FILES = 10
INCLUDE_MEMBERS = 20
LIST_LOCAL, LIST_REMOTE = 10, 2
BATCH = 100  # RCPTs per transaction: each RCPT of a transaction names another address
QUIET = 5.0  # reload: seconds of RCPTs before the aliases file is replaced
BATCHES = 5  # in process: the best of this many batches of calls
PARSE_WINDOW = 0.5  # reload: the window before the new alias was taken

#: In-process cases: name -> address (the aliases these name exist in every aliases file made here).
CASES = {
    "user": "user0500@example.test",
    "alias_1hop": "one@example.test",
    "alias_3hops": "hop1@example.test",
    "subaddress": "user0500+lists@example.test",
    "unknown": "nobody@example.test",
    "idn": "idn3@BÜCHER.example",
    "list_12": "list007@example.test",
    "include_20": "inc003@example.test",
}
ALIAS_CASES = {"alias_1hop", "alias_3hops", "list_12", "include_20"}


def spread(vals: list[float], digits: int = 2) -> str:
    """C{median [min-max]} of C{vals}."""
    return f"{statistics.median(vals):.{digits}f} [{min(vals):.{digits}f}-{max(vals):.{digits}f}]"


def users(n: int) -> list[str]:
    """The users: C{user0000@example.test}..., and the last ten in the IDN domain."""
    local = [f"user{i:04d}@example.test" for i in range(n - IDN_USERS)]
    return local + [f"idn{i}@{IDN_ACE}" for i in range(IDN_USERS)]


def write_passwd(path: Path, n: int) -> None:
    """A password file as C{mailsrv user add} writes it, one hash for every user."""
    from mailsrv.auth.passwd import default_hasher

    hashed = default_hasher().hash("bench password")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{u}:{hashed}\n" for u in users(n)))
    path.chmod(0o600)


def alias_entries(n_users: int, n: int) -> Iterator[tuple[str, list[str]]]:
    """
    (name, targets) of an aliases file with C{n} entries; a target
    C{:include:F} names an include file (L{write_aliases} writes them).
    """
    local_users = n_users - IDN_USERS

    def user(k: int) -> str:
        return f"user{k % local_users:04d}"

    fixed = [
        ("one", [user(1)]),
        ("hop1", ["hop2"]),
        ("hop2", ["hop3"]),
        ("hop3", [user(3)]),
        ("kontakt@bücher.example", ["idn0"]),
    ]
    yield from fixed
    rest = n - len(fixed)
    n_inc, n_list = rest // 100, rest * 4 // 100  # 1% include lists, 4% fan-out lists
    n_full = rest * 30 // 100  # 30% full addresses, the rest bare names
    for k in range(n_inc):
        yield f"inc{k:03d}", [f":include:include/list{k % INCLUDE_FILES}.txt"]
    for k in range(n_list):
        members = [user(k * LIST_LOCAL + m) for m in range(LIST_LOCAL)]
        members += [f"member{k}.{m}@remote{m}.example.net" for m in range(LIST_REMOTE)]
        yield f"list{k:03d}", members
    for k in range(n_full):
        domain = "example.test" if k % 2 else "example.org"
        target = f"{user(k)}@example.test"
        if k % 10 == 0:
            yield f"fa{k:05d}@{domain}", [target, f"fwd{k}@elsewhere.example.net"]
        else:
            yield f"fa{k:05d}@{domain}", [target]
    for k in range(rest - n_inc - n_list - n_full):
        yield f"a{k:05d}", [user(k)]


def write_aliases(path: Path, n_users: int, n: int, extra: str = "") -> None:
    """The aliases file (and its include files, once) beside C{path}, written atomically."""
    inc = path.parent / "include"
    inc.mkdir(parents=True, exist_ok=True)
    local_users = n_users - IDN_USERS
    for f in range(INCLUDE_FILES if not path.exists() else 0):
        members = [f"user{(f * 37 + m) % local_users:04d}" for m in range(INCLUDE_MEMBERS)]
        (inc / f"list{f}.txt").write_text("# members\n" + "\n".join(members) + "\n")
    lines = ["# aliases for the routing benchmark"]
    for name, targets in alias_entries(n_users, n):
        if len(targets) > 4:  # long lists on continuation lines, as administrators write them
            lines.append(f"{name}: {', '.join(targets[:4])},")
            lines.append(f"    {', '.join(targets[4:])}")
        else:
            lines.append(f"{name}: {', '.join(targets)}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n" + extra)
    os.replace(tmp, path)


# --- in process --------------------------------------------------------------


def config_text(domains: tuple[str, ...] = DOMAINS) -> str:
    doms = ", ".join(f'"{d}"' for d in domains)
    return (
        f'[server]\nhostname = "mx.example.test"\ndomains = [{doms}]\ndata_dir = "data"\n'
        '[addresses]\npostmaster = "user0000@example.test"\n'
    )


def make_router(base: Path, n_users: int, n_aliases: int | None, rules: bool) -> Callable:
    """
    A Router on the real config, password file and alias table in C{base};
    C{n_aliases} None: no aliases file; C{rules} False: no address rules at
    all (the routing step before they were added).
    """
    from twisted.internet.task import Clock

    from mailsrv import config as mconfig
    from mailsrv.addresses.resolver import address_rules
    from mailsrv.auth.passwd import PasswordFile
    from mailsrv.outbound.queue import OutboundQueue
    from mailsrv.routing import Router

    base.mkdir(parents=True, exist_ok=True)
    (base / "mailsrv.toml").write_text(config_text())
    config = mconfig.load(base / "mailsrv.toml")
    config.server.data_dir.mkdir(parents=True, exist_ok=True)
    write_passwd(config.auth.passwd_file, n_users)
    if n_aliases is not None:
        write_aliases(config.addresses.aliases, n_users, n_aliases)
    router = Router(
        is_local_domain=config.is_local_domain,
        passwords=PasswordFile(config.auth.passwd_file),
        # Never used by resolve (it only asks whether there is one).
        queue=OutboundQueue(config.queue_dir, None, None),
        addresses=address_rules(config, Clock()) if rules else None,
    )
    return router.resolve


def time_calls(resolve: Callable, address: str, calls: int, refused: bool) -> float:
    """
    CPU µs per call of C{resolve(address)} (this thread's CPU time: on a
    shared machine, time spent waiting for a core is not the routing step's),
    the best of L{BATCHES} batches; C{refused}: whether it is to be refused.
    """
    result = resolve(address, may_relay=False)  # warm: the password file is read once
    assert hasattr(result, "reply") == refused, f"{address}: {result}"
    per_batch = max(1, calls // BATCHES)
    best = float("inf")
    for _ in range(BATCHES):
        t0 = time.thread_time_ns()
        for _ in range(per_batch):
            resolve(address, may_relay=False)
        best = min(best, (time.thread_time_ns() - t0) / per_batch / 1e3)
    return best


def run_inproc(a: argparse.Namespace, base: Path) -> dict:
    from mailsrv.addresses.aliases import parse_aliases

    routers = {
        "no_rules": make_router(base / "none", a.users, None, rules=False),
        "no_aliases_file": make_router(base / "empty", a.users, None, rules=True),
        f"aliases_{a.aliases}": make_router(base / "full", a.users, a.aliases, rules=True),
    }
    results: dict[str, dict[str, list[float]]] = {}
    names = list(routers)
    for rnd in range(a.repeat):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            for case, address in CASES.items():
                if case in ALIAS_CASES and not name.startswith("aliases"):
                    continue
                if case in ("idn", "subaddress") and name == "no_rules":
                    continue  # rules of their own (a U-label domain, a detail)
                us = time_calls(routers[name], address, a.calls, case == "unknown")
                results.setdefault(name, {}).setdefault(case, []).append(us)
    aliases_file = base / "full" / "aliases"
    parse_ms = []
    for _ in range(a.repeat):
        t0 = time.thread_time_ns()
        parsed = parse_aliases(aliases_file)
        parse_ms.append((time.thread_time_ns() - t0) / 1e6)
        assert len(parsed.entries) == a.aliases and not parsed.problems, parsed.problems[:3]
    out = {
        "resolve_us": {n: {c: spread(v) for c, v in cases.items()} for n, cases in results.items()},
        "parse_aliases_ms": spread(parse_ms, 1),
        "aliases_file_lines": len(aliases_file.read_text().splitlines()),
    }
    return out


# --- over the wire -------------------------------------------------------------


class Client:
    """A blocking SMTP client that sends one command and waits for its whole reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.reply()
        self.command("EHLO bench.example.net")

    def reply(self) -> int:
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self.buf += chunk
                continue
            line, self.buf = self.buf[:end], self.buf[end + 2 :]
            if line[3:4] != b"-":
                return int(line[:3])

    def command(self, line: str) -> int:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.command("QUIT")
        except OSError:
            pass
        self.sock.close()


def rcpt_series(port: int, addresses: list[str], expect: int) -> list[float]:
    """RCPT latencies (µs), one at a time, in transactions of L{BATCH} recipients."""
    c = Client(port)
    out: list[float] = []
    try:
        for i, address in enumerate(addresses):
            if i % BATCH == 0:
                if i:
                    c.command("RSET")
                assert c.command("MAIL FROM:<sender@elsewhere.example.net>") == 250
            t0 = time.perf_counter()
            code = c.command(f"RCPT TO:<{address}>")
            out.append((time.perf_counter() - t0) * 1e6)
            assert code == expect, f"RCPT {address}: {code}, not {expect}"
    finally:
        c.close()
    return out


def series_addresses(n_users: int, n_aliases: int, count: int) -> dict[str, tuple[list[str], int]]:
    """name -> (addresses, expected code): plain users, alias hits, unknown addresses."""
    local_users = n_users - IDN_USERS
    plain = [f"user{i % local_users:04d}@example.test" for i in range(count)]
    bare = [name for name, _ in alias_entries(n_users, n_aliases) if name.startswith("a0")]
    alias = [f"{bare[(i * 7919) % len(bare)]}@example.test" for i in range(count)]
    unknown = [f"nobody{i}@example.test" for i in range(count)]
    return {"user": (plain, 250), "alias": (alias, 250), "unknown": (unknown, 550)}


class Mailsrv:
    """A C{twistd -n mailsrv} (tests.e2e.MailServer) on the benchmark's users."""

    def __init__(self, base: Path, a: argparse.Namespace, n_aliases: int | None) -> None:
        self.name = f"mailsrv_aliases_{n_aliases or 0}"
        self.n_aliases = n_aliases
        base.mkdir(parents=True)
        self.server = MailServer(
            base,
            domains=DOMAINS,
            extra=(
                "[limits]\nmax_errors = 1000000\n"
                '[addresses]\npostmaster = "user0000@example.test"\n'
            ),
        )
        write_passwd(self.server.data / "passwd", a.users)
        self.aliases = base / "aliases"
        if n_aliases is not None:
            write_aliases(self.aliases, a.users, n_aliases)
        self.server.start()
        self.port = self.server.ports["smtp"]

    def close(self) -> None:
        self.server.close()


class Postfix:
    """
    A private Postfix instance (config, queue and log in C{base}) on a free
    loopback port: the users in C{virtual_mailbox_maps}, the aliases (bare
    names spelled out for each domain, include files written inline) in
    C{virtual_alias_maps}, both C{hash:} maps built with postmap. Modelled on
    /work/shared/peers/postfix-start.sh; it never delivers anything here.
    """

    def __init__(self, base: Path, a: argparse.Namespace, n_aliases: int | None) -> None:
        self.name = f"postfix_aliases_{n_aliases or 0}"
        self.base = base
        etc, spool, data = base / "etc", base / "spool", base / "data"
        for d in (etc, spool, data):
            d.mkdir(parents=True)
        for d in (base.parent, base):
            d.chmod(0o755)  # Postfix's own daemons (user postfix) pass through
        shutil.chown(data, "postfix", "postfix")
        (self.port,) = free_ports(1)
        domains = ", ".join(d.encode("idna").decode() for d in DOMAINS)
        with open(etc / "vmailbox", "w") as f:
            for u in users(a.users):
                f.write(f"{u} {u}\n")
        virtual = ""
        if n_aliases is not None:
            self._write_virtual(etc / "virtual", a.users, n_aliases)
            virtual = f"virtual_alias_maps = hash:{etc}/virtual"
        (etc / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
meta_directory = /etc/postfix
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
command_directory = /usr/sbin
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {base}
maillog_file = {base}/maillog
myhostname = pf.example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks reject_unauth_destination
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000000
smtpd_hard_error_limit = 1000000
smtpd_junk_command_limit = 1000000
virtual_mailbox_domains = {domains}
virtual_mailbox_base = {base}/mail
virtual_mailbox_maps = hash:{etc}/vmailbox
{virtual}
virtual_uid_maps = static:5000
virtual_gid_maps = static:5000
relayhost = [127.0.0.1]:9
smtp_dns_support_level = disabled
""")
        master = Path("/work/shared/peers/postfix-start.sh").read_text()
        table = master.split('cat > "$PF/etc/master.cf" <<EOF\n', 1)[1].split("\nEOF", 1)[0]
        table = table.replace("127.0.0.1:$SMTP_PORT", f"127.0.0.1:{self.port}")
        (etc / "master.cf").write_text(table + "\n")
        for m in ("vmailbox", "virtual") if n_aliases is not None else ("vmailbox",):
            subprocess.run(["postmap", "-c", str(etc), f"hash:{etc}/{m}"], check=True)
        self.etc = etc
        subprocess.run(["postfix", "-c", str(etc), "set-permissions"], capture_output=True)
        started = subprocess.run(["postfix", "-c", str(etc), "start"], capture_output=True)
        if started.returncode:
            raise RuntimeError(f"postfix did not start: {started.stderr.decode()}")
        self._wait()

    @staticmethod
    def _write_virtual(path: Path, n_users: int, n_aliases: int) -> None:
        tmp = path.parent / "aliases-src"
        write_aliases(tmp / "aliases", n_users, n_aliases)
        ace = [d.encode("idna").decode() for d in DOMAINS]
        with open(path, "w") as f:
            for name, targets in alias_entries(n_users, n_aliases):
                expanded: list[str] = []
                for t in targets:
                    if t.startswith(":include:"):
                        inc = (tmp / t[len(":include:") :]).read_text().split("\n")[1:]
                        expanded += [m for m in inc if m]
                    else:
                        expanded.append(t)
                local, at, dom = name.rpartition("@")
                names = [(local, dom.encode("idna").decode())] if at else [(name, d) for d in ace]
                for lp, d in names:
                    full = [t if "@" in t else f"{t}@{d}" for t in expanded]
                    f.write(f"{lp}@{d} {', '.join(full)}\n")

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                Client(self.port).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"postfix did not listen on {self.port}")

    def close(self) -> None:
        pidfile = self.base / "spool" / "pid" / "master.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_wire(a: argparse.Namespace, base: Path) -> dict:
    targets: list = []
    try:
        targets.append(Mailsrv(base / "m0", a, None))
        targets.append(Mailsrv(base / "m10k", a, a.aliases))
        if a.postfix:
            targets.append(Postfix(base / "p0", a, None))
            targets.append(Postfix(base / "p10k", a, a.aliases))
        series = series_addresses(a.users, a.aliases, a.rcpts)
        for t in targets:  # warm up: each server's first connection and lookups
            rcpt_series(t.port, series["user"][0][:BATCH], 250)
        runs: dict[str, dict[str, list[dict]]] = {}
        for rnd in range(a.repeat):
            print(f"wire round {rnd + 1}, load {os.getloadavg()}", file=sys.stderr, flush=True)
            for t in targets if rnd % 2 == 0 else targets[::-1]:
                for name, (addresses, code) in series.items():
                    if name == "alias" and t.name.endswith("_0"):
                        continue
                    lat = sorted(rcpt_series(t.port, addresses, code))
                    runs.setdefault(t.name, {}).setdefault(name, []).append(
                        {
                            "median": statistics.median(lat),
                            "p99": lat[int(len(lat) * 0.99)],
                            "mean": statistics.fmean(lat),
                        }
                    )
    finally:
        for t in reversed(targets):
            t.close()
    out: dict = {"rcpt_us": {}}
    for server, by_series in runs.items():
        out["rcpt_us"][server] = {
            s: {k: spread([r[k] for r in rs], 0) for k in ("median", "p99", "mean")}
            for s, rs in by_series.items()
        }

    def ratio(x: str, y: str, s: str) -> str | None:
        """Median RCPT latency of C{x} / C{y}, per round."""
        if x not in runs or y not in runs or s not in runs[x] or s not in runs[y]:
            return None
        pairs = zip(runs[x][s], runs[y][s], strict=True)
        return spread([p["median"] / q["median"] for p, q in pairs])

    m10k, m0 = f"mailsrv_aliases_{a.aliases}", "mailsrv_aliases_0"
    p10k, p0 = f"postfix_aliases_{a.aliases}", "postfix_aliases_0"
    # Latency ratios per round: 1 is unchanged; postfix / mailsrv > 1, mailsrv answers sooner.
    out["ratio_per_round"] = {
        f"mailsrv {a.aliases} / 0 aliases, user": ratio(m10k, m0, "user"),
        f"mailsrv {a.aliases} / 0 aliases, unknown": ratio(m10k, m0, "unknown"),
        "postfix / mailsrv, 0 aliases, user": ratio(p0, m0, "user"),
        f"postfix / mailsrv, {a.aliases} aliases, user": ratio(p10k, m10k, "user"),
        f"postfix / mailsrv, {a.aliases} aliases, alias": ratio(p10k, m10k, "alias"),
        f"postfix / mailsrv, {a.aliases} aliases, unknown": ratio(p10k, m10k, "unknown"),
    }
    out["ratio_per_round"] = {k: v for k, v in out["ratio_per_round"].items() if v}
    return out


# --- reload ----------------------------------------------------------------------


def steady_rcpts(
    port: int, addresses: list[str], stop: threading.Event, samples: list[tuple[float, float]]
) -> None:
    """RCPTs one after the other until C{stop}: (start, latency µs) of each in C{samples}."""
    c = Client(port)
    try:
        i = 0
        while not stop.is_set():
            if i % BATCH == 0:
                if i:
                    c.command("RSET")
                c.command("MAIL FROM:<sender@elsewhere.example.net>")
            t0 = time.perf_counter()
            assert c.command(f"RCPT TO:<{addresses[i % len(addresses)]}>") == 250
            samples.append((t0, (time.perf_counter() - t0) * 1e6))
            i += 1
    finally:
        c.close()


def run_reload(a: argparse.Namespace, base: Path) -> dict:
    from mailsrv.addresses.resolver import ALIAS_CHECK_INTERVAL

    srv = Mailsrv(base / "reload", a, a.aliases)
    stats: dict[str, list[float]] = {}
    try:
        plain = series_addresses(a.users, a.aliases, 10 * BATCH)["user"][0]
        rcpt_series(srv.port, plain[:BATCH], 250)
        for n in range(a.reloads):
            samples: list[tuple[float, float]] = []  # (start, latency µs)
            stop = threading.Event()
            client = threading.Thread(target=steady_rcpts, args=(srv.port, plain, stop, samples))
            client.start()
            # The new alias, asked for every 10 ms until it is taken. (The
            # server's log cannot tell: the relay process reads the file too,
            # and logs the same line.)
            probe = Client(srv.port)
            probe.command("MAIL FROM:<sender@elsewhere.example.net>")
            # The watcher looks every ALIAS_CHECK_INTERVAL: writes at different
            # points of its period.
            time.sleep(QUIET + (n * 1.7) % ALIAS_CHECK_INTERVAL)
            t_write = time.perf_counter()
            write_aliases(srv.aliases, a.users, a.aliases, extra=f"reload{n}: user0001\n")
            while probe.command(f"RCPT TO:<reload{n}@example.test>") != 250:
                if time.perf_counter() - t_write > 30:
                    raise TimeoutError("the aliases file was not read again in 30 s")
                time.sleep(0.01)
            t_seen = time.perf_counter()
            probe.close()
            stop.set()
            client.join()
            wait = t_seen - t_write
            during = sorted(lat for t, lat in samples if t_write <= t < t_seen)
            # The same length of time just before (capped at QUIET), and the
            # last PARSE_WINDOW before the alias was taken: the re-read is in there.
            quiet = min(wait, QUIET)
            before = sorted(lat for t, lat in samples if t_write - quiet <= t < t_write)
            last = sorted(lat for t, lat in samples if t_seen - PARSE_WINDOW <= t < t_seen)
            for key, value in (
                ("pickup_s", wait),
                ("rcpts_while_waiting", len(during)),
                ("rcpt_max_us_while_waiting", during[-1]),
                ("rcpt_p99_us_while_waiting", during[int(len(during) * 0.99)]),
                ("rcpt_max_us_same_time_before", before[-1]),
                ("rcpt_p99_us_same_time_before", before[int(len(before) * 0.99)]),
                (f"rcpt_max_us_last_{PARSE_WINDOW}s_before_pickup", last[-1]),
                (f"rcpt_median_us_last_{PARSE_WINDOW}s_before_pickup", statistics.median(last)),
            ):
                stats.setdefault(key, []).append(value)
    finally:
        srv.close()
    return {k: spread(v, 2 if k == "pickup_s" else 0) for k, v in stats.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--aliases", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000, help="in process: calls per case")
    ap.add_argument("--rcpts", type=int, default=1000, help="over the wire: RCPTs per series")
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--postfix", action="store_true", help="also a private Postfix instance")
    ap.add_argument("--only", choices=("inproc", "wire", "reload"))
    a = ap.parse_args()
    if a.postfix and shutil.which("postmap") is None:
        ap.error("--postfix needs Postfix (apt-get install postfix)")
    base = Path(tempfile.mkdtemp(prefix="routing-bench-"))
    out: dict = {"users": a.users, "aliases": a.aliases, "repeat": a.repeat}
    try:
        parts = {"inproc": run_inproc, "wire": run_wire, "reload": run_reload}
        for name, part in parts.items():
            if a.only in (None, name):
                print(f"{name}: load {os.getloadavg()}", file=sys.stderr, flush=True)
                out[name] = part(a, base)
                print(json.dumps({name: out[name]}, indent=1, ensure_ascii=False), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
