#!/usr/bin/env python3
"""
The cost of the defences per message: the SMTP intake rate of a real
``twistd -n mailsrv`` with every local check on, beside the same server
with the checks off, on the same messages, alternating.

    .venv/bin/python benchmarks/checks_bench.py [--repeat 5] [-m 1000] [-s 10] [--each]

"Every local check" is every check that needs no outside daemon: the
connection gate and rate limits, the DNS block and allow lists and the
client's reverse name (PTR and its forward check), greylisting (the
triplet already passed), the duplicate-mail count, SPF for the sender,
DKIM verification of a real RSA-2048 signature, DMARC with its record,
and the Authentication-Results field. The DNS answers come from a real
twisted.names server on loopback (run in a thread of this process), so the
figure is the server's own cost, not the Internet's latency. The spam
filter daemons (rspamd, spamd) are not local checks: their cost is theirs.

The load is Postfix's C{smtp-source} (in Debian's postfix package) sending
one pre-formatted, DKIM-signed 4 KB message (C{-F}) to one local user
over C{-s} parallel sessions; the figure is messages accepted per second
(the time smtp-source takes, every message answered 250). Both servers run
at once on other ports; each round measures both back to back, the order
flipping every round, and prints the ratio within the round; the summary
is median [min-max] over --repeat rounds, beside the server process's CPU
time a message (all its threads, from /proc; the relay process is apart)
and its verifier processes' (the DKIM, ARC and DMARC work; "on_threads"
is the "on" server verifying in its own threads instead).
With --each, a server per check with only that check on runs beside them,
to tell which check costs what. Everything listens on 127.0.0.1;
each load is bounded; only the servers started here are stopped, by pid.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dkim  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.names import dns  # noqa: E402

from tests.e2e import MailServer  # noqa: E402
from tests.test_outbound_support import MemoryAuthority  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
USER = "alice@example.test"
SENDER = "news@sender.test"
SELECTOR = "s1"

# The checks that cost something per message, on (names from etc/mailsrv.toml).
CHECKS_ON = """
[policy]
pregreet = false
max_connections_per_ip = 1000
connections_per_ip_per_minute = 100000
messages_per_hour = 1000000
recipients_per_hour = 1000000
dnsbl = ["bl.test"]
dnswl = ["wl.test"]
greylist = true
greylist_delay = "1s"
duplicate_recipients = 50
reverse_dns = true
authentication_checks = true
spf_reject = true
dmarc_reject = true
"""

# The same server with the checks off (the limits must not refuse the load either).
CHECKS_OFF = """
[policy]
pregreet = false
max_connections_per_ip = 1000
connections_per_ip_per_minute = 100000
messages_per_hour = 0
recipients_per_hour = 0
duplicate_recipients = 0
reverse_dns = false
authentication_checks = false
"""


def dns_records(public_txt: str) -> list[tuple[str, Any]]:
    """The names the checks look up, for a client on 127.0.0.1 and the sender's domain."""
    txt = dns.Record_TXT
    return [
        # Reverse name of 127.0.0.1, confirmed forward.
        ("1.0.0.127.in-addr.arpa", dns.Record_PTR(b"client.test", ttl=300)),
        ("client.test", dns.Record_A("127.0.0.1", ttl=300)),
        # The sender's SPF, DKIM key and DMARC policy.
        ("sender.test", txt(b"v=spf1 ip4:127.0.0.0/8 -all", ttl=300)),
        (f"{SELECTOR}._domainkey.sender.test", txt(*_strings(public_txt), ttl=300)),
        ("_dmarc.sender.test", txt(b"v=DMARC1; p=reject", ttl=300)),
        # bl.test and wl.test exist and list nobody: each lookup is an NXDOMAIN.
        ("bl.test", txt(b"a block list that lists nobody", ttl=300)),
        ("wl.test", txt(b"an allow list that lists nobody", ttl=300)),
    ]


def _strings(value: str) -> list[bytes]:
    """A TXT value as the 255-octet strings of RFC 1035 3.3.14."""
    data = value.encode()
    return [data[i : i + 255] for i in range(0, len(data), 255)]


def signed_message(private_key: bytes) -> bytes:
    """A 4 KB message from SENDER, signed as its domain's server would sign it."""
    body = b"".join(
        b"Line %04d of a newsletter that many people read with care.\r\n" % i for i in range(64)
    )
    head = (
        f"From: News <{SENDER}>\r\nTo: <{USER}>\r\nSubject: the weekly news\r\n"
        "Date: Sun, 06 Dec 2026 12:00:00 +0000\r\nMessage-ID: <bench@sender.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
    ).encode()
    message = head + b"\r\n" + body
    sig = dkim.sign(
        message,
        SELECTOR.encode(),
        b"sender.test",
        private_key,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return sig + message


def rsa_key() -> tuple[bytes, str]:
    """A new RSA-2048 key (PEM) and its DKIM TXT record value."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import base64

    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def start_dns_thread(records: list[tuple[str, Any]]) -> int:
    """A DNS server for every zone the checks ask, in a thread; its UDP port."""
    ready: list[int] = []

    def listen() -> None:
        from twisted.names import server

        zones = {}
        for name, record in records:
            origin = "in-addr.arpa" if name.endswith(".in-addr.arpa") else "test"
            zones.setdefault(origin, []).append((name, record))
        factory = server.DNSServerFactory(
            authorities=[MemoryAuthority(origin, rs) for origin, rs in zones.items()]
        )
        factory.noisy = False
        udp = dns.DNSDatagramProtocol(controller=factory)
        udp.noisy = False
        ready.append(reactor.listenUDP(0, udp, interface="127.0.0.1").getHost().port)

    reactor.callWhenRunning(listen)
    threading.Thread(
        target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
    ).start()
    deadline = time.monotonic() + 10
    while not ready:
        if time.monotonic() > deadline:
            raise RuntimeError("the DNS server did not start")
        time.sleep(0.01)
    return ready[0]


def send(server: MailServer, message: Path, count: int, sessions: int) -> float:
    """Messages per second smtp-source gets accepted (every one must be)."""
    start = time.monotonic()
    subprocess.run(
        [
            SMTP_SOURCE,
            "-d",  # a new connection per message, as MX traffic is
            "-m", str(count),
            "-s", str(sessions),
            "-f", SENDER,
            "-t", USER,
            "-F", str(message),
            "-M", "client.test",
            f"127.0.0.1:{server.ports['smtp']}",
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )  # fmt: skip
    return count / (time.monotonic() - start)


def delivered(server: MailServer) -> int:
    path = server.inbox(USER)
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.startswith(b"From "))


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time of process C{pid} (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def verifier_cpu_seconds(pid: int) -> float:
    """The CPU time of the verifier processes of server C{pid} (L{mailsrv.authres.workers})."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as c:
                cmdline = c.read()
        except OSError:
            continue
        if int(fields[1]) == pid and b"mailsrv.authres.worker_main" in cmdline:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def one_check(key_values: dict[str, str]) -> str:
    """CHECKS_OFF with C{key_values} set: one check on, the others off."""
    text = CHECKS_OFF
    for key, value in key_values.items():
        line = f"{key} = {value}"
        if re.search(rf"^{key} =", text, re.M):
            text = re.sub(rf"^{key} = .*$", line, text, flags=re.M)
        else:
            text += line + "\n"
    return text


# --each: one server per check, each with only that check on.
EACH = {
    "reverse_dns": {"reverse_dns": "true"},
    "dns_lists": {"dnsbl": '["bl.test"]', "dnswl": '["wl.test"]'},
    "greylist": {"greylist": "true", "greylist_delay": '"1s"'},
    "duplicates": {"duplicate_recipients": "50"},
    "rates": {"messages_per_hour": "1000000", "recipients_per_hour": "1000000"},
    "authentication": {"authentication_checks": "true"},
    # The same, verified in the server's threads rather than in verifier processes.
    "authentication_threads": {"authentication_checks": "true", "authentication_workers": "0"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("-m", "--messages", type=int, default=1000)
    ap.add_argument("-s", "--sessions", type=int, default=10)
    ap.add_argument("--each", action="store_true", help="also each check alone")
    args = ap.parse_args()
    if not shutil.which(SMTP_SOURCE):
        print(f"needs {SMTP_SOURCE} (Debian's postfix package)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="mailsrv-checks-bench-"))
    pem, public = rsa_key()
    dns_port = start_dns_thread(dns_records(public))
    message = base / "message.eml"
    message.write_bytes(signed_message(pem).replace(b"\r\n", b"\n"))
    nameservers = f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
    # on_threads: every check, DKIM, ARC and DMARC in the server's threads.
    configs = {
        "off": CHECKS_OFF,
        "on": CHECKS_ON,
        "on_threads": CHECKS_ON + "authentication_workers = 0\n",
    }
    if args.each:
        configs.update({name: one_check(kv) for name, kv in EACH.items()})
    servers = {}
    try:
        for name, checks in configs.items():
            folder = base / name
            folder.mkdir()
            servers[name] = MailServer(folder, extra=nameservers + checks).start()
            servers[name].add_user(USER)
        # Warm up (imports, the greylist triplet passes its delay, caches fill).
        for server in servers.values():
            try:
                send(server, message, 5, 1)
            except subprocess.CalledProcessError:
                pass  # greylisted the first time
        time.sleep(1.5)
        for server in servers.values():
            send(server, message, 20, 2)
        head = servers["on"].inbox(USER).read_bytes()[-8000:]
        for result in (b"spf=pass", b"dkim=pass", b"dmarc=pass", b"(client.test [127.0.0.1])"):
            assert result in head, f"the checks did not run as set up: no {result!r}"
        rates: dict[str, list[float]] = {name: [] for name in servers}
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        verifiers: dict[str, list[float]] = {name: [] for name in servers}
        to_off: dict[str, list[float]] = {name: [] for name in servers}
        ratios: list[float] = []
        for r in range(args.repeat):
            names = list(servers)
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                server = servers[name]
                assert server.proc is not None
                pid = server.proc.pid
                before, cpu_before = delivered(server), cpu_seconds(pid)
                verifiers_before = verifier_cpu_seconds(pid)
                rates[name].append(send(server, message, args.messages, args.sessions))
                cpu[name].append((cpu_seconds(pid) - cpu_before) / args.messages)
                spent = verifier_cpu_seconds(pid) - verifiers_before
                verifiers[name].append(spent / args.messages)
                assert delivered(server) - before == args.messages, name
            ratios.append(rates["on"][-1] / rates["off"][-1])
            for name in servers:
                to_off[name].append(rates[name][-1] / rates["off"][-1])
            print(
                f"round {r + 1}: off {rates['off'][-1]:.0f}/s, on {rates['on'][-1]:.0f}/s, "
                f"on/off {ratios[-1]:.3f}",
                flush=True,
            )
        for name in servers:
            ms = [c * 1000 for c in cpu[name]]
            vms = [c * 1000 for c in verifiers[name]]
            print(
                f"{name:>22}: {_spread(rates[name], 0)} messages/s,"
                f" server CPU {_spread(ms, 2)} ms a message,"
                f" verifier processes {_spread(vms, 2)} ms; /off {_spread(to_off[name], 3)}"
            )
        print(f"on/off: {_spread(ratios, 3)} (1.0 = free; the target is at least 0.8)")
    finally:
        for server in servers.values():
            server.close()
        reactor.callFromThread(reactor.stop)
    shutil.rmtree(base, ignore_errors=True)
    return 0


def _spread(values: list[float], digits: int) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
    )


if __name__ == "__main__":
    sys.exit(main())
