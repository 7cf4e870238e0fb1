"""
A small concurrent stress of flags over real loopback on the mbox store:
several sessions at once STORE new keywords, NOOP, FETCH flags and APPEND
with keywords for a couple of seconds, and every response each session gets
is checked: a FETCH never shows a keyword the session was not told of by an
untagged FLAGS and PERMANENTFLAGS first (RFC 3501 7.2.6), nor a \\Recent that
another session has too (RFC 3501 2.3.2); at the end every session agrees
with the store on every message's flags (no update lost).
"""

from __future__ import annotations

import random
import re
import time

from twisted.internet import defer

from mailsrv.spool import BytesSource
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import USER

SESSIONS = 4
SECONDS = 2.0  # each session's run; bounded in commands too
MAX_COMMANDS = 400
MESSAGES = 5

FETCH = re.compile(rb"^\* (\d+) FETCH \((.*)\)\r\n$")
FLAGS_IN = re.compile(rb"FLAGS \(([^)]*)\)")
UID_IN = re.compile(rb"UID (\d+)")
FLAGS_LINE = re.compile(rb"^\* FLAGS \(([^)]*)\)\r\n$")
PERMANENT = re.compile(rb"^\* OK \[PERMANENTFLAGS \(([^)]*)\)\]")


class Checked:
    """One session: a raw client whose every response line is checked as it comes."""

    def __init__(self, port: int, name: int) -> None:
        self.client = RawClient(port)
        self.name = name
        self.defined: set[bytes] = set()
        self.permanent: set[bytes] = set()
        self.recent: set[int] = set()  # UIDs shown \Recent to this session
        self.errors: list[str] = []
        self.tags = 0

    def cmd(self, rest: bytes) -> list[bytes]:
        self.tags += 1
        tag = b"S%dT%d" % (self.name, self.tags)
        lines = self.client.cmd(tag, rest)
        for line in lines:
            self.check(rest, line)
        if not lines or not lines[-1].startswith(tag + b" OK"):
            self.errors.append(f"{rest!r}: {lines[-1:]!r}")
        return lines

    def check(self, command: bytes, line: bytes) -> None:
        m = FLAGS_LINE.match(line)
        if m:
            self.defined = set(m.group(1).split())
            return
        m = PERMANENT.match(line)
        if m:
            self.permanent = set(m.group(1).split())
            return
        m = FETCH.match(line)
        if not m:
            return
        f = FLAGS_IN.search(m.group(2))
        if f is None:
            return
        for flag in f.group(1).split():
            if flag == b"\\Recent":
                u = UID_IN.search(m.group(2))
                if u is not None:
                    self.recent.add(int(u.group(1)))
                continue
            if flag not in self.defined or flag not in self.permanent:
                self.errors.append(f"{command!r}: {flag!r} shown before FLAGS told it: {line!r}")


def session(port: int, name: int, seed: int) -> Checked:
    """Run one session's random mix of commands for at most SECONDS; return what it saw."""
    rnd = random.Random(seed)
    s = Checked(port, name)
    try:
        s.client.login()
        s.cmd(b"SELECT INBOX")
        end = time.monotonic() + SECONDS
        n = 0
        while time.monotonic() < end and n < MAX_COMMANDS:
            n += 1
            seq = rnd.randint(1, MESSAGES)
            op = rnd.random()
            if op < 0.3:
                s.cmd(b"STORE %d +FLAGS ($s%dk%d)" % (seq, name, n))
            elif op < 0.4:
                s.cmd(b"STORE %d +FLAGS.SILENT ($s%dk%d \\Flagged)" % (seq, name, n))
            elif op < 0.5:
                s.cmd(b"STORE %d -FLAGS (\\Flagged \\Seen)" % seq)
            elif op < 0.55:
                msg = b"Subject: kw %d\r\n\r\nx\r\n" % n
                s.cmd(b"APPEND INBOX ($s%da%d) {%d+}\r\n%s" % (name, n, len(msg), msg))
            elif op < 0.75:
                s.cmd(b"NOOP")
            else:
                s.cmd(b"UID FETCH 1:* (FLAGS)")
        s.cmd(b"NOOP")
    except Exception as e:  # a closed or stuck connection is an error of the run
        s.errors.append(f"session {name}: {e!r}")
    return s


class FlagStressTests(LoopbackIMAPCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_concurrent_keywords_are_announced_and_no_update_is_lost(self):
        for i in range(MESSAGES):
            msg = b"Subject: m%d\n\nbody\n" % i
            yield self.store.deliver(USER, BytesSource(msg), "a@example.test")
        port = self.port_number
        runs = yield defer.gatherResults(
            [self.in_thread(session, port, i, 1000 + i) for i in range(SESSIONS)]
        )
        # Every session catches up, then lists the flags: all agree with the store.
        finals = []
        for s in runs:
            # NOOP first: the sessions ended one by one, each before the others'
            # last changes; FETCH itself is not where a session catches up.
            yield self.in_thread(s.cmd, b"NOOP")
            out = yield self.in_thread(s.cmd, b"UID FETCH 1:* (FLAGS)")
            finals.append(
                {
                    int(UID_IN.search(line).group(1)): set(FLAGS_IN.search(line).group(1).split())
                    - {b"\\Recent"}
                    for line in out
                    if FETCH.match(line)
                }
            )
            yield self.in_thread(s.cmd, b"LOGOUT")
            s.client.close()
        yield self.settle()
        errors = [e for s in runs for e in s.errors]
        self.assertEqual(errors, [])
        self.assertGreater(sum(s.tags for s in runs), SESSIONS * 20)  # it did run
        f = yield self.store.open_folder(USER, "INBOX")
        stored = {i.uid: {x.encode() for x in i.flags} for i in f.messages()}
        f.close()
        for final in finals:
            self.assertEqual(final, stored)
        # \Recent went to one session each (RFC 3501 2.3.2).
        owners: dict[int, int] = {}
        for s in runs:
            for uid in s.recent:
                self.assertNotIn(
                    uid, owners, f"{uid} recent to sessions {owners.get(uid)}, {s.name}"
                )
                owners[uid] = s.name
        self.assertEqual(self.failures, [])
