"""
QRESYNC (RFC 7162 3.2) as a client depends on it, over loopback against the
mbox store: a client that keeps a cache of UIDs and flags from its last sync
and resynchronises (SELECT (QRESYNC ...), UID FETCH (CHANGEDSINCE n
VANISHED), or NOOP in a session that stays selected) after random changes by
other sessions and by another program rewriting the mbox file must end with
exactly what a full fetch shows, and HIGHESTMODSEQ never goes backwards;
plus the edge cases of UNCHANGEDSINCE, MODSEQ values, and VANISHED (EARLIER)
over huge UID sets.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3

from twisted.internet import defer, threads

from mailsrv.store.locking import MboxLock
from mailsrv.store.names import INBOX, folder_path
from tests.imap_loopback_support import RawClient
from tests.test_imap_condstore import CondstoreCase, highest
from tests.test_imap_harness import USER

_FETCH = re.compile(rb"\* (\d+) FETCH \((.*)\)\r\n")
_FLAG_POOL = ["\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$Work", "$Later"]


def uids_of(text: bytes) -> set[int]:
    """The UIDs of a (small) uid-set."""
    out: set[int] = set()
    for part in text.split(b","):
        lo, _, hi = part.partition(b":")
        a, b = int(lo), int(hi or lo)
        out.update(range(min(a, b), max(a, b) + 1))
    return out


def set_of(uids) -> bytes:
    return b",".join(b"%d" % u for u in sorted(uids))


def fetched(lines: list[bytes]) -> dict[int, frozenset[str]]:
    """UID -> flags (without \\Recent) of the untagged FETCH lines that carry both."""
    out = {}
    for ln in lines:
        m = _FETCH.match(ln)
        if not m:
            continue
        u = re.search(rb"UID (\d+)", m.group(2))
        f = re.search(rb"FLAGS \(([^)]*)\)", m.group(2))
        if u and f:
            out[int(u.group(1))] = frozenset(f.group(1).decode().split()) - {"\\Recent"}
    return out


class Replica:
    """A client's cache of INBOX: UIDVALIDITY, HIGHESTMODSEQ and UID -> flags."""

    def __init__(self) -> None:
        self.validity = 0
        self.highest = 0
        self.uid_next = 1
        self.flags: dict[int, frozenset[str]] = {}

    def apply(self, lines: list[bytes], where: str) -> None:
        """Take in a resync's answer: VANISHED, FETCH, HIGHESTMODSEQ (never backwards)."""
        for ln in lines:
            assert not re.match(rb"\* \d+ EXPUNGE", ln), (where, lines)
            m = re.match(rb"\* VANISHED (?:\(EARLIER\) )?([\d:,]+)\r\n", ln)
            if m:
                for u in uids_of(m.group(1)):
                    self.flags.pop(u, None)
            m = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", ln)
            if m:
                top = int(m.group(1))
                assert top >= self.highest, (where, self.highest, lines)
                self.highest = top
            m = re.search(rb"\[UIDVALIDITY (\d+)\]", ln)
            if m:
                self.validity = int(m.group(1))
            m = re.search(rb"\[UIDNEXT (\d+)\]", ln)
            if m:
                self.uid_next = int(m.group(1))
        self.flags.update(fetched(lines))

    def check(self, c: RawClient, where: str) -> None:
        """The cache is what a full fetch in the same session shows."""
        full = fetched(c.cmd(b"F", b"UID FETCH 1:* (FLAGS)"))
        assert self.flags == full, (where, self.flags, full)


class QresyncPropertyTest(CondstoreCase):
    timeout = 240

    @defer.inlineCallbacks
    def restart_server(self):
        """
        The server stops at once (its connections cut, nothing written back)
        and a new one starts on the same folders: a new store, a new port.
        """
        from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
        from twisted.cred.portal import Portal
        from twisted.mail import imap4

        from mailsrv.auth.realm import MailRealm
        from mailsrv.imap.server import IMAPServerFactory, account_factory
        from mailsrv.store.mbox import MboxMailStore
        from tests.test_imap_harness import PASSWORD

        for p in self.protocols:
            if p.transport is not None:
                p.transport.abortConnection()
        yield self.port.stopListening()
        yield self.settle()
        reactor, pool = self.reactor, self.pool
        self.store = MboxMailStore(self.config.mail_dir, self.config.index_dir, reactor, pool)

        def run(f, *a, **kw):
            return threads.deferToThreadPool(reactor, pool, f, *a, **kw)

        realm = MailRealm()
        realm.register(imap4.IAccount, account_factory(self.config, self.store, run))
        portal = Portal(realm, [InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD})])
        factory = IMAPServerFactory(
            config=self.config, store=self.store, portal=portal, reactor=reactor, run=run, tls=None
        )
        build = factory.buildProtocol

        def tracked(addr):
            p = build(addr)
            self.protocols.append(p)
            return p

        factory.buildProtocol = tracked
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def mbox_path(self):
        return folder_path(self.config.mail_dir, USER, INBOX)

    def rewrite(self, rng: random.Random) -> str:
        """Another program (as mutt) rewrites the file: drops, appends or marks a message."""
        path = self.mbox_path()
        with MboxLock(path):
            data = path.read_bytes()
            parts = re.split(rb"(?m)^(?=From )", data)
            parts = [p for p in parts if p]
            what = rng.choice(["drop", "append", "status"]) if parts else "append"
            if what == "drop":
                del parts[rng.randrange(len(parts))]
            elif what == "append":
                n = rng.randrange(10**6)
                parts.append(
                    b"From x@example.test Sat Jan  1 00:00:00 2022\n"
                    b"From: x@example.test\nSubject: ext %d\nMessage-ID: <ext%d@t>\n\n"
                    b"body %d\n\n" % (n, n, n)
                )
            else:
                i = rng.randrange(len(parts))
                head, sep, body = parts[i].partition(b"\n\n")
                head = re.sub(rb"(?m)^(Status|X-Status): .*\n?", b"", head).rstrip(b"\n")
                parts[i] = head + b"\nStatus: RO\nX-Status: F" + sep + body
            tmp = path.with_name(path.name + ".mutt")
            tmp.write_bytes(b"".join(parts))
            tmp.replace(path)
        return what

    def change(self, rng: random.Random, b: RawClient, other: RawClient) -> None:
        """One random change by another session (or another program)."""
        b.cmd(b"n", b"NOOP")
        count = len(fetched(b.cmd(b"f", b"UID FETCH 1:* (FLAGS)")))
        what = rng.choice(
            ["flags", "flags", "expunge", "append", "move", "copyback", "mutt", "forget"]
        )
        if what == "mutt":
            self.rewrite(rng)
            return
        if what == "forget":  # the expunge history runs out (as past its limit)
            db = sqlite3.connect(
                str(self.config.index_dir / "example.test" / "alice" / "INBOX.sqlite")
            )
            with db:
                db.execute(
                    "UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'highest_modseq')"
                    " WHERE key = 'vanished_floor'"
                )
                db.execute("DELETE FROM vanished")
            db.close()
            return
        if what == "append" or not count:
            msg = b"From: a@example.test\r\nSubject: new\r\n\r\nhi\r\n"
            flag = rng.choice(["", "\\Seen", "$Work"])
            b.send(b"a APPEND INBOX (%s) {%d}\r\n" % (flag.encode(), len(msg)))
            assert b.file.readline().startswith(b"+")
            b.send(msg + b"\r\n")
            assert b.read_until(b"a")[-1].startswith(b"a OK")
            return
        seqs = set_of(rng.sample(range(1, count + 1), rng.randint(1, min(3, count))))
        if what == "flags":
            flags = " ".join(rng.sample(_FLAG_POOL, rng.randint(1, 2)))
            mode = rng.choice([b"+FLAGS", b"-FLAGS", b"FLAGS", b"+FLAGS.SILENT"])
            b.cmd(b"x", b"STORE %s %s (%s)" % (seqs, mode, flags.encode()))
        elif what == "expunge":
            b.cmd(b"x", b"STORE %s +FLAGS.SILENT (\\Deleted)" % seqs)
            b.cmd(b"x", b"EXPUNGE")
        elif what == "move":
            b.cmd(b"m", b"MOVE %s Other" % seqs)
        else:
            other.cmd(b"n", b"NOOP")
            out = other.cmd(b"c", b"MOVE 1 INBOX")
            assert out[-1].startswith((b"c OK", b"c BAD", b"c NO")), out

    @defer.inlineCallbacks
    def test_random_changes_then_resync(self):
        restarts = []

        def script(connect):
            for seed in range(int(os.environ.get("QRESYNC_SEEDS", "6"))):
                rng = random.Random(seed)
                b, other = connect(), connect()
                b.cmd(b"c", b"CREATE Other")
                b.cmd(b"s", b"SELECT INBOX")
                other.cmd(b"s", b"SELECT Other")
                rep = Replica()
                stay = connect()  # a client that stays selected and syncs by NOOP
                stay.cmd(b"e", b"ENABLE QRESYNC")
                stay_rep = Replica()
                stay_rep.apply(stay.cmd(b"s", b"SELECT INBOX"), "stay select")
                stay_rep.flags = fetched(stay.cmd(b"f", b"UID FETCH 1:* (FLAGS)"))
                a = connect()
                a.cmd(b"e", b"ENABLE QRESYNC")
                rep.apply(a.cmd(b"s", b"SELECT INBOX"), "first select")
                rep.flags = fetched(a.cmd(b"f", b"UID FETCH 1:* (FLAGS)"))
                a.cmd(b"o", b"LOGOUT")
                for step in range(12):
                    for _ in range(rng.randint(1, 4)):
                        self.change(rng, b, other)
                    if rng.random() < 0.15:  # the server restarts; the clients reconnect
                        for c in (b, other, stay):
                            c.close()
                        threads.blockingCallFromThread(self.reactor, self.restart_server)
                        restarts.append(seed)
                        b, other, stay = connect(), connect(), connect()
                        b.cmd(b"s", b"SELECT INBOX")
                        other.cmd(b"s", b"SELECT Other")
                        stay.cmd(b"e", b"ENABLE QRESYNC")
                        out = stay.cmd(
                            b"s",
                            b"SELECT INBOX (QRESYNC (%d %d))"
                            % (stay_rep.validity, stay_rep.highest),
                        )
                        stay_rep.apply(out, "seed %d step %d restart" % (seed, step))
                    where = "seed %d step %d" % (seed, step)
                    a = connect()
                    a.cmd(b"e", b"ENABLE QRESYNC")
                    how = rng.choice(["select", "known", "match", "fetch"])
                    if how == "fetch":
                        sel = a.cmd(b"s", b"SELECT INBOX")
                        out = a.cmd(
                            b"u", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % rep.highest
                        )
                        rep.apply(out, where + " fetch")
                        rep.apply(sel, where + " select")
                    else:
                        extra = b""
                        if how != "select" and rep.flags:
                            extra = b" " + set_of(rep.flags)
                            if how == "match":
                                known = sorted(rep.flags)
                                extra += b" (1:%d %s)" % (len(known), set_of(known))
                        out = a.cmd(
                            b"s",
                            b"SELECT INBOX (QRESYNC (%d %d%s))"
                            % (rep.validity, rep.highest, extra),
                        )
                        assert out[-1].startswith(b"s OK"), out
                        before = rep.uid_next
                        rep.apply(out, where + " " + how)
                        if extra:
                            # RFC 7162 3.2.5.1: told only of the known UIDs; the
                            # client fetches those above its last UIDNEXT
                            got = fetched(a.cmd(b"f", b"UID FETCH %d:* (FLAGS)" % before))
                            rep.flags.update((u, f) for u, f in got.items() if u >= before)
                    rep.check(a, where + " " + how)
                    a.cmd(b"o", b"LOGOUT")
                    stay_rep.apply(stay.cmd(b"n", b"NOOP"), where + " noop")
                    # new messages are told by EXISTS: a client fetches those above its last UID
                    top = max(stay_rep.flags, default=0)
                    got = fetched(stay.cmd(b"f", b"UID FETCH %d:* (FLAGS)" % (top + 1)))
                    stay_rep.flags.update((u, f) for u, f in got.items() if u > top)
                    stay_rep.check(stay, where + " noop")
                for c in (b, other, stay):
                    c.cmd(b"o", b"LOGOUT")
                b = connect()
                b.cmd(b"d", b"DELETE Other")
                b.cmd(b"o", b"LOGOUT")

        yield self.drive(script)
        self.assertTrue(restarts)


def forget_history(case: CondstoreCase) -> None:
    """The store no longer knows which UIDs were expunged (as past its history's limit)."""
    path = case.config.index_dir / "example.test" / "alice" / "INBOX.sqlite"
    db = sqlite3.connect(str(path))
    with db:
        db.execute(
            "UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'highest_modseq')"
            " WHERE key = 'vanished_floor'"
        )
        db.execute("DELETE FROM vanished")
    db.close()


class QresyncEdgeTest(CondstoreCase):
    @defer.inlineCallbacks
    def test_huge_sequence_match_data_costs_what_the_folder_holds(self):
        """
        RFC 7162 3.2.5.2: sequence match data naming every number up to
        4294967295 is answered at once (work bounded by the folder, not by
        the ranges' width), as the same data naming only what exists.
        """

        def script(connect):
            a = connect()
            a.cmd(b"e", b"ENABLE QRESYNC")
            out = a.cmd(b"s", b"SELECT INBOX")
            v = int(re.search(rb"UIDVALIDITY (\d+)", b"".join(out)).group(1))
            a.cmd(b"x", b"STORE 2 +FLAGS (\\Deleted)")
            a.cmd(b"x", b"EXPUNGE")
            forget_history(self)
            c = RawClient(self.port_number, timeout=5)
            try:
                c.login()
                c.cmd(b"e", b"ENABLE QRESYNC")
                out = c.cmd(
                    b"s",
                    b"SELECT INBOX (QRESYNC (%d 1 1:4294967295 (1:4294967295 1:4294967295)))" % v,
                )
                assert out[-1] == b"s OK [READ-WRITE] SELECT completed\r\n", out
                # seq 1 is UID 1, seq 2 is no longer UID 2: from UID 2 on, all gaps
                # below UIDNEXT
                assert b"* VANISHED (EARLIER) 2\r\n" in out, out
            finally:
                c.close()

        yield self.drive(script)

    @defer.inlineCallbacks
    def test_unchangedsince_on_a_message_expunged_meanwhile_fails(self):
        """
        RFC 7162 3.1.3: a conditional STORE on a message another session
        expunged (the client not told yet) cannot have succeeded: it is named
        in MODIFIED (by number, or by UID for UID STORE), as Dovecot does.
        """

        def script(connect):
            a, b = connect(), connect()
            top = highest(a.cmd(b"s", b"SELECT INBOX"))
            b.cmd(b"s", b"SELECT INBOX")
            b.cmd(b"x", b"STORE 3 +FLAGS.SILENT (\\Deleted)")
            b.cmd(b"x", b"EXPUNGE")
            out = a.cmd(b"t", b"STORE 2:4 (UNCHANGEDSINCE %d) +FLAGS (\\Flagged)" % top)
            assert out[-1] == b"t OK [MODIFIED 3] Conditional store failed\r\n", out
            assert not any(ln.startswith(b"* 3 FETCH") for ln in out), out
            out = a.cmd(
                b"u", b"UID STORE 3:5 (UNCHANGEDSINCE 9223372036854775807) +FLAGS.SILENT (\\Seen)"
            )
            assert out[-1] == b"u OK [MODIFIED 3] Conditional store failed\r\n", out
            # without the condition, nothing to fail: as before
            out = a.cmd(b"p", b"STORE 3 +FLAGS (\\Answered)")
            assert out[-1] == b"p OK STORE completed\r\n", out

        yield self.drive(script)

    @defer.inlineCallbacks
    def test_modseq_told_past_a_delayed_expunge_comes_with_a_lower_highestmodseq(self):
        """
        RFC 7162 3.2: a FETCH MODSEQ sent while an expunge with a lower
        mod-sequence is not told yet (STORE and FETCH may not send VANISHED)
        comes with a HIGHESTMODSEQ below that expunge's, so that a client
        that loses the connection does not resynchronise past it (as Dovecot).
        """

        def script(connect):
            a, b = connect(), connect()
            a.cmd(b"e", b"ENABLE QRESYNC")
            top = highest(a.cmd(b"s", b"SELECT INBOX"))
            b.cmd(b"e", b"ENABLE QRESYNC")
            b.cmd(b"s", b"SELECT INBOX")
            b.cmd(b"x", b"STORE 3 +FLAGS.SILENT (\\Deleted)")
            out = b.cmd(b"x", b"EXPUNGE")
            gone = int(re.search(rb"HIGHESTMODSEQ (\d+)", out[-1]).group(1))
            out = a.cmd(b"t", b"STORE 1 +FLAGS (\\Seen)")
            sent = int(re.search(rb"MODSEQ \((\d+)\)", out[0]).group(1))
            assert sent > gone, out
            assert out[1:] == [
                b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % top,
                b"t OK STORE completed\r\n",
            ], out
            assert top < gone
            out = a.cmd(b"f", b"FETCH 1 (MODSEQ)")
            assert out[1:] == [
                b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % top,
                b"f OK FETCH completed\r\n",
            ], out
            # once told (NOOP: VANISHED), nothing is delayed
            assert b"* VANISHED 3\r\n" in a.cmd(b"n", b"NOOP")
            out = a.cmd(b"t", b"STORE 1 +FLAGS (\\Answered)")
            assert len(out) == 2 and out[-1] == b"t OK STORE completed\r\n", out
            # without QRESYNC, EXPUNGE is never delayed past a FETCH MODSEQ told
            # (CONDSTORE only, RFC 7162 3.1): no such line
            c = connect()
            c.cmd(b"s", b"SELECT INBOX (CONDSTORE)")
            b.cmd(b"x", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
            b.cmd(b"x", b"EXPUNGE")
            out = c.cmd(b"t", b"STORE 2 +FLAGS (\\Seen)")
            assert len(out) == 2, out

        yield self.drive(script)

    @defer.inlineCallbacks
    def test_conditional_flags_replacement_replaces_what_others_added(self):
        """
        RFC 3501 6.4.6 under RFC 7162 3.1.3: STORE (UNCHANGEDSINCE n) FLAGS
        replaces the flags as they are, with a keyword another session added
        that this session's view has not seen yet (as Dovecot: the message's
        flags are then exactly those given).
        """

        def script(connect):
            a, b = connect(), connect()
            a.cmd(b"s", b"SELECT INBOX")
            b.cmd(b"s", b"SELECT INBOX")
            b.cmd(b"x", b"STORE 1 +FLAGS ($Work \\Flagged)")
            out = a.cmd(b"t", b"STORE 1 (UNCHANGEDSINCE 9223372036854775807) FLAGS (\\Seen)")
            assert out[-1] == b"t OK STORE completed\r\n", out
            assert re.search(rb"\* 1 FETCH \(MODSEQ \(\d+\) FLAGS \(\\Seen\)\)", b"".join(out)), out
            b.cmd(b"n", b"NOOP")
            out = b.cmd(b"f", b"FETCH 1 (FLAGS)")
            assert out[0] == b"* 1 FETCH (FLAGS (\\Seen))\r\n", out

        yield self.drive(script)

    @defer.inlineCallbacks
    def test_select_highestmodseq_covers_only_what_it_told(self):
        """
        RFC 7162 3.1.2.1 and 3.2.5: another session's flag change that lands
        while a SELECT (QRESYNC) is under way (here: while it takes its
        \\Recent messages) is either told by that SELECT or not covered by
        the HIGHESTMODSEQ it gives; a client that then disconnects and
        resynchronises from that HIGHESTMODSEQ ends with the store's flags.
        """
        from mailsrv.store.mbox.view import MboxFolder

        real = MboxFolder.claim_recent
        armed = [True]

        def claim(folder):
            if not armed:
                return real(folder)
            armed.clear()

            def change(other):
                d = other.change_flags([1], add={"$Work"})
                return d.addBoth(lambda r: (other.close(), r)[1])

            d = self.store.open_folder(USER, INBOX).addCallback(change)
            return d.addCallback(lambda _: real(folder))

        def script(connect):
            a = connect()
            a.cmd(b"e", b"ENABLE QRESYNC")
            rep = Replica()
            rep.apply(a.cmd(b"s", b"SELECT INBOX"), "first")
            rep.flags = fetched(a.cmd(b"f", b"UID FETCH 1:* (FLAGS)"))
            a.cmd(b"o", b"LOGOUT")
            self.patch(MboxFolder, "claim_recent", claim)
            c = connect()
            c.cmd(b"e", b"ENABLE QRESYNC")
            out = c.cmd(b"s", b"SELECT INBOX (QRESYNC (%d %d))" % (rep.validity, rep.highest))
            assert not armed, "the change did not land during SELECT"
            rep.apply(out, "during")
            c.cmd(b"o", b"LOGOUT")  # the connection ends before any NOOP
            d = connect()
            d.cmd(b"e", b"ENABLE QRESYNC")
            out = d.cmd(b"s", b"SELECT INBOX (QRESYNC (%d %d))" % (rep.validity, rep.highest))
            rep.apply(out, "after")
            rep.check(d, "after")

        yield self.drive(script)

    @defer.inlineCallbacks
    def test_vanished_earlier_never_names_a_message_that_exists(self):
        """
        RFC 7162 3.2.6 and 3.2.5.2: with the expunge history gone, VANISHED
        (EARLIER) names the UIDs below the view's UIDNEXT it does not hold,
        never a message another session appended since the view was taken.
        """

        def script(connect):
            a, b = connect(), connect()
            a.cmd(b"e", b"ENABLE QRESYNC")
            out = a.cmd(b"s", b"SELECT INBOX")
            top = highest(out)
            a.cmd(b"x", b"STORE 2 +FLAGS.SILENT (\\Deleted)")
            a.cmd(b"x", b"EXPUNGE")
            forget_history(self)
            b.cmd(b"s", b"SELECT INBOX")
            msg = b"From: a@example.test\r\nSubject: new\r\n\r\nhi\r\n"
            b.send(b"a APPEND INBOX {%d}\r\n" % len(msg))
            assert b.file.readline().startswith(b"+")
            b.send(msg + b"\r\n")
            assert b.read_until(b"a")[-1].startswith(b"a OK")
            out = a.cmd(b"u", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % top)
            assert out[0] == b"* VANISHED (EARLIER) 2\r\n", out
            out = a.cmd(b"u", b"UID FETCH 1:99 (FLAGS) (CHANGEDSINCE %d VANISHED)" % top)
            assert out[0] == b"* VANISHED (EARLIER) 2\r\n", out
            out = a.cmd(b"n", b"NOOP")
            assert b"* 5 EXISTS\r\n" in out, out
            out = a.cmd(b"u", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % top)
            assert out[0] == b"* VANISHED (EARLIER) 2\r\n", out
            assert b"UID 6 " in b"".join(out), out

        yield self.drive(script)
