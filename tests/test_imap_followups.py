"""
IMAP over real loopback, the mbox store on disk: RENAME into a mailbox's
own inferior, APPEND's date-time, concurrent SUBSCRIBE and UNSUBSCRIBE.
"""

from __future__ import annotations

from twisted.internet import defer

from tests.imap_loopback_support import LoopbackIMAPCase, RawClient


def _tagged(lines: list[bytes]) -> bytes:
    return lines[-1].rstrip(b"\r\n")


class RenameIntoItselfTests(LoopbackIMAPCase):
    def session(self, commands: list[bytes]) -> list[bytes]:
        """Log in, run C{commands}; the tagged answer of each."""
        c = RawClient(self.port_number)
        try:
            c.login()
            return [_tagged(c.cmd(b"T%d" % i, cmd)) for i, cmd in enumerate(commands)]
        finally:
            c.close()

    def listed(self) -> list[bytes]:
        c = RawClient(self.port_number)
        try:
            c.login()
            return sorted(x.rstrip(b"\r\n") for x in c.cmd(b"L1", b'LIST "" "*"')[:-1])
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_rename_into_its_own_inferior_is_refused_clearly(self):
        setup = [b"CREATE Work/Old", b"CREATE Mail", b"CREATE Work2"]
        answers = yield self.in_thread(self.session, setup)
        self.assertEqual(answers, [b"T%d OK CREATE completed" % i for i in range(3)])
        before = yield self.in_thread(self.listed)
        answers = yield self.in_thread(
            self.session,
            [
                b"RENAME Work Work/Sub",  # Work holds only folders (a directory)
                b"RENAME Work Work/Old/Deeper",
                b"RENAME Mail Mail/Sub",  # Mail is a mailbox (an mbox file)
                b'RENAME "Work/Old" "Work/Old/x"',
                b"RENAME Work2 Work2",
            ],
        )
        self.assertEqual(
            answers,
            [b"T%d NO [CANNOT] Cannot rename a mailbox into itself" % i for i in range(5)],
        )
        after = yield self.in_thread(self.listed)
        self.assertEqual(after, before)
        # A name that merely begins like it is another mailbox. Renaming
        # INBOX moves its messages (RFC 3501 6.3.5), so that rule is not
        # INBOX's: the store has its own (no folders under INBOX).
        answers = yield self.in_thread(
            self.session, [b"RENAME Work2 Work2x", b"RENAME INBOX INBOX/Old"]
        )
        self.assertEqual(
            answers, [b"T0 OK RENAME completed", b"T1 NO INBOX cannot have sub-folders"]
        )
        self.assertEqual(self.failures, [])


class AppendDateTimeTests(LoopbackIMAPCase):
    MESSAGE = b"Subject: dated\r\n\r\nhi\r\n"

    def appends(self, dates: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """
        APPEND the message with each date (LITERAL+), each in a session of its
        own (a client that keeps sending bad commands is dropped); the
        answers, then INBOX's internal dates.
        """
        answers = []
        for i, date in enumerate(dates):
            c = RawClient(self.port_number)
            try:
                c.login()
                tag = b"A%d" % i
                c.send(b'%s APPEND INBOX "%s" {%d+}\r\n' % (tag, date, len(self.MESSAGE)))
                c.send(self.MESSAGE + b"\r\n")
                answers.append(_tagged(c.read_until(tag)))
            finally:
                c.close()
        c = RawClient(self.port_number)
        try:
            c.login()
            c.cmd(b"S", b"SELECT INBOX")
            fetched = c.cmd(b"F", b"FETCH 1:* (INTERNALDATE)")[:-1]
            return answers, [x.split(b'"')[1] for x in fetched]
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_an_impossible_date_time_is_bad_and_nothing_is_stored(self):
        bad = [
            b"99-Jan-2026 10:00:00 +0000",
            b"31-Feb-2026 25:61:61 +9999",
            b"29-Feb-2026 10:00:00 +0000",  # not a leap year
            b"31-Apr-2026 10:00:00 +0000",
            b" 0-Jan-2026 10:00:00 +0000",
            b"01-Jan-0000 10:00:00 +0000",
            b"01-Jan-2026 24:00:00 +0000",
            b"01-Jan-2026 10:60:00 +0000",
            b"01-Jan-2026 10:00:61 +0000",
            b"01-Jan-2026 10:00:00 +0160",
            b"01-Jan-2026 10:00:00 -2400",
        ]
        good = [b"29-Feb-2024 23:59:60 +0000", b" 1-Jan-2026 00:00:00 -1200"]
        answers, dates = yield self.in_thread(self.appends, bad + good)
        self.assertEqual(
            answers[: len(bad)], [b"A%d BAD Bad date-time" % i for i in range(len(bad))]
        )
        self.assertEqual(
            [a.split(b" [")[0] for a in answers[len(bad) :]],
            [b"A%d OK" % (len(bad) + i) for i in range(len(good))],
        )
        # Only the two good ones were stored, each with its own date (the
        # leap second counts as the next second; the zone is converted).
        self.assertEqual(dates, [b"01-Mar-2024 00:00:00 +0000", b"01-Jan-2026 12:00:00 +0000"])
        self.assertEqual(self.failures, [])


class SubscriptionsOfTwoSessionsTests(LoopbackIMAPCase):
    """Two sessions of one user change the subscriptions: every change survives."""

    def lsub(self, c: RawClient, tag: bytes) -> list[bytes]:
        lines = c.cmd(tag, b'LSUB "" "*"')
        self.assertTrue(lines[-1].startswith(tag + b" OK"), lines)
        return sorted(x.rstrip(b"\r\n").rsplit(b" ", 1)[1] for x in lines[:-1])

    @defer.inlineCallbacks
    def test_changes_of_two_sessions_all_survive(self):
        port = self.port_number

        def client() -> tuple[list[bytes], list[bytes], list[bytes]]:
            a, b = RawClient(port), RawClient(port)
            try:
                a.login()
                b.login()  # both have read the subscriptions now
                # At once: each session subscribes names of its own.
                for c, prefix in ((a, b"A"), (b, b"B")):
                    c.send(b"".join(b"s%d SUBSCRIBE %s%d\r\n" % (i, prefix, i) for i in range(20)))
                for c in (a, b):
                    lines = c.read_until(b"s19")
                    assert len(lines) == 20 and all(b"OK SUBSCRIBE" in x for x in lines), lines
                # One session unsubscribes what the other subscribed.
                answer = a.cmd(b"u", b"UNSUBSCRIBE B7")
                seen_by_a = self.lsub(a, b"l")
                seen_by_b = self.lsub(b, b"l")
                return answer, seen_by_a, seen_by_b
            finally:
                a.close()
                b.close()

        answer, seen_by_a, seen_by_b = yield self.in_thread(client)
        self.assertEqual(_tagged(answer), b"u OK UNSUBSCRIBE completed")
        expected = sorted(
            [b"INBOX"]
            + [b"A%d" % i for i in range(20)]
            + [b"B%d" % i for i in range(20) if i != 7]
            + [n.encode() for n in self.config.imap.special_folders]
        )
        self.assertEqual(seen_by_a, expected)
        self.assertEqual(seen_by_b, expected)
        subs = self.tmp / "imap" / "example.test" / "alice.subscriptions"
        self.assertEqual(sorted(subs.read_text().encode().splitlines()), expected)
        self.assertEqual(self.failures, [])
