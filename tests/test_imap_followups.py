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
