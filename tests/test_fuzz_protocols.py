"""
Mutation fuzzing of a real ``twistd -n mailsrv`` over loopback: sessions of
valid IMAP commands, some of them mutated (bytes flipped, tokens dropped or
doubled, parentheses added, numbers made huge, ``*`` and empty strings put in,
lines broken, literals of the wrong size), and a few mutated POP3 and SMTP sessions.

The server must answer each command plainly (never ``[SERVERBUG]``, "Server
error" or "Internal error"), must stay up, and its log must hold no traceback.

Seeded: ``MAILSRV_FUZZ_SEED`` picks the run (default fixed, so CI is
repeatable), ``MAILSRV_FUZZ_SECONDS`` the time budget of all three tests; each session
draws from its own ``Random``, so a failure names the seed and the session
that reproduce it, with the transcript (sessions run three at a time also
depend on how they interleave).
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e import PASSWORD, MailServer

USER = "fuzz@example.test"
SEED = os.environ.get("MAILSRV_FUZZ_SEED", "20261206")
BUDGET = float(os.environ.get("MAILSRV_FUZZ_SECONDS", "12"))
# How long an answer may take before the session counts as stalled (a mutated
# literal can leave the server waiting for octets that never come) and ends: at
# least STALL, more on a loaded machine (STALL_LOGINS times the session's own
# LOGIN round trip, its baseline).
STALL = 0.3
STALL_LOGINS = 3
# How long a valid step may take (greeting, LOGIN, set-up commands): it must
# succeed, and on a loaded machine it can take seconds.
PATIENCE = 30.0
# The least work the single-session test does, past its time budget if the
# machine is slow (up to MAX_OVERRUN times the budget).
MIN_SESSIONS = 6
MIN_COMMANDS = 101
MAX_OVERRUN = 5
FORBIDDEN = (b"SERVERBUG", b"Server error", b"Internal error", b"Internal server error")
MESSAGE = (
    b"From: Ann <ann@example.test>\r\nTo: fuzz@example.test\r\nSubject: fuzz %d\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
    b"hello %d\r\n--b--\r\n"
)

# Valid commands in the selected state; "{lit}" becomes a literal of the given text.
IMAP_CORPUS = [
    b'LIST "" "*"',
    b'LIST "" "%"',
    b'LIST "Work/" "%"',
    b'LSUB "" "*"',
    b"SELECT INBOX",
    b"EXAMINE INBOX",
    b"SELECT Work/Projects",
    b"STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)",
    b"STATUS Work/Projects (MESSAGES)",
    b"FETCH 1:* (FLAGS UID RFC822.SIZE INTERNALDATE)",
    b"FETCH 1 (ENVELOPE BODYSTRUCTURE)",
    b"FETCH 1:2 (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)] BODY.PEEK[1]<0.10>)",
    b"FETCH * BODY[]",
    b"FETCH 2 (BODY[TEXT] BODY[1.MIME] RFC822.HEADER)",
    b"UID FETCH 1:* (FLAGS)",
    b"STORE 1 +FLAGS (\\Seen)",
    b"STORE 1:* -FLAGS.SILENT (\\Flagged)",
    b"STORE * FLAGS ($Label1 \\Answered)",
    b"UID STORE 1:* +FLAGS (\\Draft)",
    b'SEARCH CHARSET UTF-8 OR SUBJECT "fuzz" NOT FROM ann',
    b"SEARCH 1:* UNSEEN LARGER 10 SINCE 1-Jan-2020",
    b"SEARCH (OR (SEEN) (DELETED)) BODY hello",
    b"SEARCH HEADER Subject {lit:fuzz}",
    b"UID SEARCH UID 1:* NOT DELETED",
    b"COPY 1 Work/Projects",
    b"UID COPY 1:* Archive",
    b"MOVE 1 Work/Projects",
    b"UID MOVE 2 INBOX",
    b'APPEND INBOX (\\Seen) "01-Jan-2024 10:00:00 +0000" {lit:Subject: appended\r\n\r\nbody\r\n}',
    b"APPEND Work/Projects {lit:Subject: x\r\n\r\ny\r\n}",
    b"CREATE Work/New",
    b"RENAME Work/New Work/Renamed",
    b"DELETE Work/Renamed",
    b"SUBSCRIBE Work/Projects",
    b"UNSUBSCRIBE Work/Projects",
    b"IDLE\r\nDONE",
    b"NOOP",
    b"CHECK",
    b"EXPUNGE",
    b"UID EXPUNGE 1:*",
    b"NAMESPACE",
    b'ID ("name" "fuzz")',
    b"ENABLE UTF8=ACCEPT",
    b"CAPABILITY",
    b"UNSELECT",
    b"CLOSE",
    b'LIST "" "INBOX*"',
    b'LIST "" {lit:Work/*}',
    b"STATUS {lit:INBOX} (UNSEEN)",
    b"SELECT Empty",
    b"EXAMINE Work/Projects",
    b"FETCH 1:* (BODY.PEEK[1.1] BODY.PEEK[2.HEADER] BODY.PEEK[HEADER.FIELDS.NOT (TO)])",
    b"FETCH 1 (BODY[]<0.5> RFC822 RFC822.TEXT FAST)",
    b"FETCH 1:2 ALL",
    b"FETCH 2 FULL",
    b"UID FETCH 1:4294967295 (UID BODY.PEEK[TEXT]<2.3>)",
    b"FETCH 1,2:3 (BODY[1]<0.0>)",
    b"SEARCH KEYWORD $Label1 UNKEYWORD x SENTBEFORE 1-Feb-2025 SMALLER 100000",
    b"SEARCH CHARSET US-ASCII TEXT {lit:hello}",
    b"STORE 1 +FLAGS.SILENT (\\Deleted)",
    b"UID STORE 1:* FLAGS.SILENT ()",
    b"CREATE INBOX/x",
    b"DELETE Work",
    b"RENAME Work/Projects Work/Projects2",
    b"RENAME Work/Projects2 Work/Projects",
    b"APPEND INBOX {999999999}",
    b"SELECT INBOX/x",
    b"STATUS Work/Projects/x (MESSAGES)",
    b"RENAME INBOX Work/Projects/y",
    b'CREATE "&Jjo-/&-"',
    b"APPEND Work/Projects (\\Flagged $Label1) {lit:Subject: y\r\n\r\nz\r\n}",
]

HUGE = [
    b"0",
    b"4294967295",
    b"4294967296",
    b"18446744073709551616",
    b"99999999999999999999999999",
    b"-1",
]
NOISE = [b"(", b")", b"*", b"%", b'"', b"\\", b"{", b"}", b"[", b"]", b"<", b">", b"\x00", b"\xff"]


def literal(text: bytes, size: int | None = None, plus: bool = False) -> bytes:
    """A literal: C{{n}}, CRLF, the octets (C{size} may lie)."""
    n = len(text) if size is None else size
    return b"{%d%s}\r\n" % (n, b"+" if plus else b"") + text


def expand(cmd: bytes, rng: random.Random, wrong_sizes: bool) -> bytes:
    def lit(m: re.Match) -> bytes:
        text = m.group(1)
        size = len(text)
        if wrong_sizes:
            size = max(0, size + rng.choice([-3, -1, 1, 7]))
        return literal(text, size, plus=rng.random() < 0.5)

    return re.sub(rb"\{lit:(.*?)\}(?=$| )", lit, cmd, flags=re.S)


def mutate(cmd: bytes, rng: random.Random) -> bytes:
    """One to three random mutations of a command (without its tag)."""
    for _ in range(rng.randint(1, 3)):
        tokens = cmd.split(b" ")
        op = rng.randrange(12)
        i = rng.randrange(len(tokens))
        if op == 0 and cmd:  # byte flip
            j = rng.randrange(len(cmd))
            cmd = cmd[:j] + bytes([rng.randrange(256)]) + cmd[j + 1 :]
        elif op == 1 and len(tokens) > 1:  # token deleted
            del tokens[i]
            cmd = b" ".join(tokens)
        elif op == 2:  # token doubled
            tokens.insert(i, tokens[i])
            cmd = b" ".join(tokens)
        elif op == 3:  # parentheses
            j = rng.randrange(len(cmd) + 1)
            cmd = cmd[:j] + rng.choice([b"(", b")", b"()", b"(" * rng.randint(2, 300)]) + cmd[j:]
        elif op == 4:  # a number made huge
            cmd = re.sub(rb"\d+", lambda m: rng.choice(HUGE), cmd, count=1)
        elif op == 5:
            tokens[i] = b"*"
            cmd = b" ".join(tokens)
        elif op == 6:
            tokens[i] = b'""'
            cmd = b" ".join(tokens)
        elif op == 7:  # noise character
            j = rng.randrange(len(cmd) + 1)
            cmd = cmd[:j] + rng.choice(NOISE) + cmd[j:]
        elif op == 8:  # cut short
            cmd = cmd[: rng.randrange(len(cmd) + 1)]
        elif op == 9:  # a long token
            tokens[i] = rng.choice([b"x" * 300, b"a/" * 200 + b"b", b"%" * 100, b"1," * 500 + b"1"])
            cmd = b" ".join(tokens)
        elif op == 10:  # a line break inside: two commands, the second without a tag
            j = rng.randrange(len(cmd) + 1)
            cmd = cmd[:j] + b"\r\n" + cmd[j:]
        else:  # a literal in place of a token, of the right or a wrong size
            text = tokens[i]
            size = len(text) + rng.choice([0, 0, -1, 2])
            tokens[i] = literal(text, max(0, size), plus=rng.random() < 0.5)
            cmd = b" ".join(tokens)
    return cmd


class Session:
    """A raw client; reads with a short timeout (a mutated literal may leave the server waiting)."""

    def __init__(self, port: int, transcript: list[bytes]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
        self.buf = b""
        self.transcript = transcript
        self.closed = False

    def line(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                return None
            if not data:
                self.closed = True
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.transcript.append(b"S: " + line[:300])
        return line

    def send(self, data: bytes) -> None:
        self.transcript.append(b"C: " + data[:300])
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def close(self) -> None:
        self.sock.close()


def imap_command(s: Session, tag: bytes, cmd: bytes, timeout: float = STALL) -> list[bytes] | None:
    """
    Send a command (its literals each after the server's go-ahead); its
    answer, or None if a line of it takes longer than C{timeout}.
    """
    pieces = re.split(rb"(\{\d+\+?\}\r\n)", cmd)
    out: list[bytes] = []
    data = tag + b" " + pieces[0]
    for k in range(1, len(pieces), 2):
        marker, rest = pieces[k], pieces[k + 1]
        s.send(data + marker[:-2] + b"\r\n")
        data = b""
        if not marker.endswith(b"+}\r\n"):
            line = s.line(timeout)
            if line is None:
                return None
            out.append(line)
            if not line.startswith(b"+"):
                return out  # refused before the literal
        data = rest
    s.send(data + b"\r\n")
    while True:
        line = s.line(timeout)
        if line is None:
            return None
        out.append(line)
        if line.startswith(tag + b" ") or line.startswith(b"* BYE"):
            return out


def forbidden(lines: list[bytes]) -> bytes | None:
    for line in lines:
        if any(f in line for f in FORBIDDEN):
            return line
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The with block stops the server and its relay process even if set-up fails.
    # Hundreds of sessions a minute from one address: the fuzzer is no flood.
    policy = "[policy]\nconnections_per_ip_per_minute = 0\n"
    with MailServer(tmp_path_factory.mktemp("fuzz"), extra=policy) as srv:
        srv.add_user(USER)
        setup_mail(srv)
        yield srv


def log_size(srv: MailServer) -> int:
    return (srv.base / "server.log").stat().st_size


def server_problems(srv: MailServer, since: int) -> str:
    """The log lines since offset C{since} that tell of a traceback."""
    with open(srv.base / "server.log", "rb") as f:
        f.seek(since)
        log = f.read().decode("utf-8", "replace")
    return "\n".join(
        line for line in log.splitlines() if "Traceback" in line or "Unhandled" in line
    )


def setup_mail(srv: MailServer) -> None:
    s = Session(srv.ports["imap"], [])
    try:
        s.line(PATIENCE)
        for i, cmd in enumerate(
            [
                b'LOGIN %s "%s"' % (USER.encode(), PASSWORD.encode()),
                b"CREATE Work/Projects",
                b"CREATE Empty",
                *(b"APPEND INBOX " + literal(MESSAGE % (n, n)) for n in range(3)),
            ]
        ):
            out = imap_command(s, b"p%d" % i, cmd, PATIENCE)
            assert out and b"OK" in out[-1], out
    finally:
        s.close()


def imap_sessions(
    port: int, name: str, deadline: float, at_least: tuple[int, int] = (0, 0), cap: float = 0.0
) -> tuple[int, int, str | None]:
    """
    Mutated IMAP sessions until C{deadline}, and on until C{at_least}
    (sessions, commands) are done or C{cap} passes; session C{n} draws from
    C{Random(f"{SEED}:{name}{n}")}. Returns (sessions, commands, the first
    forbidden answer with the end of its transcript, or None).
    """
    session = commands = 0

    def more() -> bool:
        now = time.monotonic()
        if now < deadline:
            return True
        return now < cap and (session < at_least[0] or commands < at_least[1])

    while more():
        rng = random.Random(f"{SEED}:{name}{session}")
        transcript: list[bytes] = []
        where = f"seed {SEED} session {name}{session}"
        s = Session(port, transcript)
        try:
            assert (s.line(PATIENCE) or b"").startswith(b"* OK"), where
            login = b'LOGIN %s "%s"' % (USER.encode(), PASSWORD.encode())
            started = time.monotonic()
            answer = imap_command(s, b"l", login, PATIENCE)
            stall = max(STALL, STALL_LOGINS * (time.monotonic() - started))
            assert (answer or [b""])[-1].startswith(b"l OK"), where
            if rng.random() < 0.8:
                imap_command(s, b"s", b"SELECT INBOX", PATIENCE)
            for n in range(40):
                cmd = rng.choice(IMAP_CORPUS)
                mutated = rng.random() < 0.7
                cmd = expand(cmd, rng, wrong_sizes=mutated and rng.random() < 0.2)
                if mutated:
                    cmd = mutate(cmd, rng)
                out = imap_command(s, b"t%d" % n, cmd, stall)
                commands += 1
                bad = forbidden(out or [])
                if bad is not None:
                    tail = "\n".join(t.decode("latin-1") for t in transcript[-12:])
                    return session, commands, f"{where}: {bad!r}\n{tail}"
                if out is None or s.closed:
                    break
        finally:
            s.close()
        session += 1
    return session, commands, None


def assert_serving(port: int) -> None:
    s = Session(port, [])
    try:
        assert (s.line(PATIENCE) or b"").startswith(b"* OK")
    finally:
        s.close()


def test_mutated_imap_sessions(server):
    since = log_size(server)
    port = server.ports["imap"]
    start = time.monotonic()
    sessions, commands, bad = imap_sessions(
        port,
        "",
        start + BUDGET * 0.5,
        at_least=(MIN_SESSIONS, MIN_COMMANDS),
        cap=start + BUDGET * 0.5 * MAX_OVERRUN,
    )
    assert bad is None, bad
    assert_serving(port)
    assert sessions >= MIN_SESSIONS and commands >= MIN_COMMANDS, (sessions, commands)
    problems = server_problems(server, since)
    assert not problems, problems + "\n" + server.output()


def test_concurrent_mutated_imap_sessions(server):
    """Three at a time: sessions of one user race on the same folders and files."""
    since = log_size(server)
    port = server.ports["imap"]
    deadline = time.monotonic() + BUDGET * 0.3
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda k: imap_sessions(port, f"c{k}-", deadline), range(3)))
    for _, _, bad in results:
        assert bad is None, bad
    assert_serving(port)
    problems = server_problems(server, since)
    assert not problems, problems + "\n" + server.output()


POP3_CORPUS = [
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"UIDL",
    b"UIDL 2",
    b"RETR 1",
    b"TOP 1 0",
    b"TOP 2 5",
    b"DELE 3",
    b"RSET",
    b"NOOP",
    b"CAPA",
]
SMTP_CORPUS = [
    b"EHLO client.test",
    b"HELO client.test",
    b"MAIL FROM:<ann@example.test> SIZE=100",
    b"RCPT TO:<fuzz@example.test>",
    b"RCPT TO:<nobody@example.test>",
    b"DATA\r\nSubject: fuzz\r\n\r\nbody\r\n.",
    b"RSET",
    b"NOOP",
    b"VRFY fuzz",
    b"HELP",
    b"BDAT 10 LAST",
]


def line_session(port: int, greeting: bytes, lines: list[bytes], where: str) -> None:
    transcript: list[bytes] = []
    s = Session(port, transcript)
    try:
        assert (s.line(PATIENCE) or b"").startswith(greeting), where
        for cmd in lines:
            s.send(cmd + b"\r\n")
            while True:
                line = s.line(0.5)
                if line is None or line == b"." or line[:1] in (b"+", b"-") or line[3:4] == b" ":
                    break
            if s.closed:
                break
    finally:
        s.close()


def test_mutated_pop3_and_smtp_sessions(server):
    since = log_size(server)
    deadline = time.monotonic() + BUDGET * 0.2
    session = 0
    while time.monotonic() < deadline:
        rng = random.Random(f"{SEED}:pop3smtp:{session}")
        where = f"seed {SEED} pop3/smtp session {session}"
        pop = [b"USER " + USER.encode(), b"PASS " + PASSWORD.encode()]
        pop += [mutate(c, rng) if rng.random() < 0.7 else c for c in rng.choices(POP3_CORPUS, k=15)]
        line_session(server.ports["pop3"], b"+OK", [*pop, b"QUIT"], where)
        smtp = [b"EHLO fuzz.test"]
        smtp += [
            mutate(c, rng) if rng.random() < 0.7 else c for c in rng.choices(SMTP_CORPUS, k=15)
        ]
        line_session(server.ports["smtp"], b"220", [*smtp, b"QUIT"], where)
        session += 1
    problems = server_problems(server, since)
    assert not problems, problems + "\n" + server.output()
