"""
IMAP4rev2 (RFC 9051) over a real loopback session: the server offers
IMAP4rev1 and IMAP4rev2, and a session follows rev2 once it has sent
C{ENABLE IMAP4rev2}: no \\Recent and no RECENT, SEARCH answered by ESEARCH,
mailbox names in UTF-8, \\HasChildren/\\HasNoChildren in every LIST, the
response codes of RFC 9051 7.1 on refusals; STATUS DELETED and SIZE; what
rev2 dropped (CHECK, LSUB, RFC822.*, SEARCH RECENT) still answered. A
session that does not enable rev2 sees IMAP4rev1 as before, on the same
folders.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailsrv.store.names import INBOX, folder_path
from tests import dovecot_peer, sort_corpus
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import PASSWORD, USER

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody text\r\n"
CAFE = "café".encode()
NOT_NFC = b"NO [CANNOT] Mailbox name is not Net-Unicode (NFC, no control characters)"


def _untagged(lines: list[bytes]) -> list[bytes]:
    return [x.rstrip(b"\r\n") for x in lines if x.startswith(b"* ")]


def _tagged(lines: list[bytes]) -> bytes:
    return lines[-1].rstrip(b"\r\n").split(b" ", 1)[1]


def _append(c: RawClient, tag: bytes, folder: bytes = b"INBOX", flags: bytes = b"") -> None:
    out = c.cmd(tag, b"APPEND %s %s{%d+}\r\n%s" % (folder, flags, len(MESSAGE), MESSAGE))
    assert _tagged(out).startswith(b"OK"), out


class Rev2Case(LoopbackIMAPCase):
    def client(self, rev2: bool = True) -> RawClient:
        c = RawClient(self.port_number)
        self.addCleanup(c.close)
        c.login()
        if rev2:
            out = c.cmd(b"E", b"ENABLE IMAP4rev2")
            assert out == [b"* ENABLED IMAP4rev2\r\n", b"E OK ENABLE completed\r\n"], out
        return c

    def in_client(self, f, *args) -> defer.Deferred:
        return self.in_thread(f, *args)


class EnableTests(Rev2Case):
    def test_capabilities_and_enable(self):
        def client():
            c = self.client(rev2=False)
            caps = _untagged(c.cmd(b"C", b"CAPABILITY"))[0].split()
            assert b"IMAP4rev1" in caps and b"IMAP4rev2" in caps, caps
            assert b"STATUS=SIZE" in caps, caps
            # Case-insensitive, once, with UTF8=ACCEPT in the same command.
            out = c.cmd(b"E", b"ENABLE imap4rev2 UTF8=ACCEPT IMAP4REV2")
            assert out[0] == b"* ENABLED IMAP4rev2 UTF8=ACCEPT\r\n", out

        return self.in_client(client)

    def test_enable_while_selected_drops_recent(self):
        def client():
            c = self.client(rev2=False)
            _append(c, b"A")
            sel = _untagged(c.cmd(b"S", b"SELECT INBOX"))
            assert b"* 1 RECENT" in sel, sel
            assert c.cmd(b"E", b"ENABLE IMAP4rev2")[0] == b"* ENABLED IMAP4rev2\r\n"
            out = c.cmd(b"F", b"FETCH 1 FLAGS")
            assert _untagged(out) == [b"* 1 FETCH (FLAGS ())"], out
            assert _untagged(c.cmd(b"R", b"SEARCH RECENT")) == [b'* ESEARCH (TAG "R")']

        return self.in_client(client)


class RecentTests(Rev2Case):
    def test_no_recent_in_rev2_and_kept_for_rev1(self):
        def client():
            setup = self.client(rev2=False)
            _append(setup, b"A")
            setup.close()
            c = self.client()
            sel = _untagged(c.cmd(b"S", b"SELECT INBOX"))
            assert not [x for x in sel if b"RECENT" in x or b"[UNSEEN" in x], sel
            assert b"* 1 EXISTS" in sel, sel
            # RFC 9051 6.3.2: the mailbox's LIST response.
            assert b'* LIST (\\NoInferiors) "/" INBOX' in sel, sel
            out = c.cmd(b"F", b"FETCH 1 (FLAGS UID)")
            assert _untagged(out) == [b"* 1 FETCH (FLAGS () UID 1)"], out
            # Another session's new message: EXISTS, and no RECENT.
            other = self.client(rev2=False)
            _append(other, b"B")
            out = c.cmd(b"N", b"NOOP")
            assert _untagged(out) == [b"* 2 EXISTS"], out
            # The rev2 session took no message as \Recent: a rev1 session gets both.
            sel = _untagged(other.cmd(b"S", b"SELECT INBOX"))
            assert b"* 2 RECENT" in sel, sel
            out = other.cmd(b"F", b"FETCH 1:2 FLAGS")
            assert _untagged(out) == [
                b"* 1 FETCH (FLAGS (\\Recent))",
                b"* 2 FETCH (FLAGS (\\Recent))",
            ], out
            # SEARCH NEW/OLD/RECENT are still parsed (rev1 keys): nothing is recent.
            out = c.cmd(b"R", b"SEARCH OR NEW RECENT")
            assert _untagged(out) == [b'* ESEARCH (TAG "R")'], out
            out = c.cmd(b"O", b"SEARCH OLD")
            assert _untagged(out) == [b'* ESEARCH (TAG "O") ALL 1:2'], out

        return self.in_client(client)


class SearchTests(Rev2Case):
    def test_search_answers_esearch(self):
        def client():
            c = self.client()
            for i in range(3):
                _append(c, b"A%d" % i, flags=b"(\\Seen) " if i != 1 else b"")
            c.cmd(b"S", b"SELECT INBOX")
            answers = {
                b"SEARCH SEEN": b'* ESEARCH (TAG "T") ALL 1,3',
                b"UID SEARCH SEEN": b'* ESEARCH (TAG "T") UID ALL 1,3',
                b"SEARCH CHARSET UTF-8 SUBJECT hello": b'* ESEARCH (TAG "T") ALL 1:3',
                b"SEARCH RETURN (COUNT) ALL": b'* ESEARCH (TAG "T") COUNT 3',
                b"SEARCH DELETED": b'* ESEARCH (TAG "T")',
            }
            for command, answer in answers.items():
                out = c.cmd(b"T", command)
                assert _untagged(out) == [answer], (command, out)
                assert _tagged(out) == b"OK SEARCH completed", out
            # SEARCHRES: SAVE alone answers nothing; "$" is what it found.
            assert _untagged(c.cmd(b"T", b"SEARCH RETURN (SAVE) UNSEEN")) == []
            assert _untagged(c.cmd(b"T", b"UID FETCH $ UID")) == [b"* 2 FETCH (UID 2)"]
            # A rev1 session is answered with SEARCH, as before.
            old = self.client(rev2=False)
            old.cmd(b"S", b"SELECT INBOX")
            assert _untagged(old.cmd(b"T", b"SEARCH SEEN")) == [b"* SEARCH 1 3"]

        return self.in_client(client)


class StatusTests(Rev2Case):
    def test_status_deleted_and_size(self):
        def client():
            c = self.client()
            _append(c, b"A", flags=b"(\\Deleted) ")
            _append(c, b"B")
            for session in (c, self.client(rev2=False)):
                out = session.cmd(b"T", b"STATUS INBOX (MESSAGES DELETED SIZE)")
                line = b"* STATUS INBOX (MESSAGES 2 DELETED 1 SIZE %d)" % (2 * len(MESSAGE))
                assert _untagged(out) == [line], out
            out = c.cmd(b"T", b'LIST "" "INBOX" RETURN (STATUS (DELETED SIZE))')
            assert _untagged(out)[1] == b"* STATUS INBOX (DELETED 1 SIZE %d)" % (
                2 * len(MESSAGE)
            ), out

        return self.in_client(client)


class ListTests(Rev2Case):
    def test_names_in_utf8_and_children_always(self):
        def client():
            c = self.client()
            assert _tagged(c.cmd(b"C", b'CREATE "%s/x"' % CAFE)) == b"OK CREATE completed"
            assert _tagged(c.cmd(b"C", b"SUBSCRIBE gone")) == b"OK SUBSCRIBE completed"
            out = c.cmd(b"L", b'LIST "" "caf*" RETURN (SUBSCRIBED)')
            assert _untagged(out) == [
                b'* LIST (\\Noselect \\HasChildren) "/" "%s"' % CAFE,
                b'* LIST (\\NoInferiors) "/" "%s/x"' % CAFE,
            ], out
            out = c.cmd(b"L", b'LIST (SUBSCRIBED) "" "g*"')
            assert _untagged(out) == [
                b'* LIST (\\Subscribed \\NonExistent \\HasNoChildren) "/" gone'
            ], out
            out = c.cmd(b"X", b'EXAMINE "%s/x"' % CAFE)
            assert b'* LIST (\\NoInferiors) "/" "%s/x"' % CAFE in _untagged(out), out
            assert _tagged(out) == b"OK [READ-ONLY] EXAMINE completed", out
            c.cmd(b"U", b"UNSELECT")
            out = c.cmd(b"T", b'STATUS "%s/x" (MESSAGES)' % CAFE)
            assert _untagged(out) == [b'* STATUS "%s/x" (MESSAGES 0)' % CAFE], out
            # LSUB is still answered (IMAP4rev1 is offered too).
            assert _untagged(c.cmd(b"L", b'LSUB "" "g*"')) == [b'* LSUB () "/" gone']
            # A rev1 session: modified UTF-7, and no child attributes unasked.
            old = self.client(rev2=False)
            out = old.cmd(b"L", b'LIST "" "caf*" RETURN (SUBSCRIBED)')
            assert _untagged(out) == [
                b'* LIST (\\Noselect) "/" caf&AOk-',
                b'* LIST (\\NoInferiors) "/" caf&AOk-/x',
            ], out

        return self.in_client(client)

    def test_namespace(self):
        def client():
            out = self.client().cmd(b"N", b"NAMESPACE")
            assert _untagged(out) == [b'* NAMESPACE (("" "/")) NIL NIL'], out

        return self.in_client(client)


class ResponseCodeTests(Rev2Case):
    def test_refusals_carry_codes(self):
        def client():
            c = self.client()
            for command in (b"CREATE a/b", b"CREATE c"):
                assert _tagged(c.cmd(b"T", command)).startswith(b"OK"), command
            answers = {
                b"CREATE a": b"NO [ALREADYEXISTS] Folder already exists",
                b"RENAME c a": b"NO [ALREADYEXISTS] Target folder exists",
                b"DELETE nothere": b"NO [NONEXISTENT] No such folder",
                b"RENAME nothere d": b"NO [NONEXISTENT] No such folder",
                b"SELECT nothere": b"NO [NONEXISTENT] Mailbox doesn't exist",
                b"APPEND nothere {1+}\r\nx": b"NO [TRYCREATE] Mailbox doesn't exist",
                b"DELETE INBOX": b"NO [CANNOT] INBOX cannot be deleted",
                b"RENAME c INBOX": b"NO [ALREADYEXISTS] Cannot rename to INBOX",
                b"GETQUOTA nothere": b"NO [NONEXISTENT] Quota root doesn't exist",
                # RFC 9051 6.3.4: not Net-Unicode ("e" and a combining acute accent)
                b'CREATE "cafe\xcc\x81"': NOT_NFC,
                b'RENAME c "cafe\xcc\x81"': NOT_NFC,
                b"DELETE a": b"NO [HASCHILDREN] Mailbox has children, delete them first",
                b"SELECT a": b"NO [CANNOT] Mailbox isn't selectable",
                b"STATUS a (MESSAGES)": b"NO [CANNOT] Mailbox isn't selectable",
            }
            for command, answer in answers.items():
                assert _tagged(c.cmd(b"T", command)) == answer, command
            # A rev1 session's refusals are as they were.
            old = self.client(rev2=False)
            assert _tagged(old.cmd(b"T", b"CREATE a")) == b"NO Folder already exists"
            assert _tagged(old.cmd(b"T", b"DELETE INBOX")) == b"NO INBOX cannot be deleted"

        return self.in_client(client)


class DeprecatedTests(Rev2Case):
    def test_rev1_commands_still_answered(self):
        def client():
            c = self.client()
            _append(c, b"A")
            _append(c, b"B", flags=b"(\\Deleted) ")
            c.cmd(b"S", b"SELECT INBOX")
            assert _tagged(c.cmd(b"T", b"CHECK")) == b"OK CHECK completed"
            out = c.cmd(b"T", b"FETCH 1 (RFC822.SIZE RFC822.HEADER)")
            head = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
            assert out[0] == b"* 1 FETCH (RFC822.SIZE %d RFC822.HEADER {%d}\r\n" % (
                len(MESSAGE),
                len(head),
            ), out
            # UID in every FETCH of a UID command; BINARY.
            out = c.cmd(b"T", b"UID FETCH 1 BINARY.SIZE[1]")
            assert _untagged(out) == [b"* 1 FETCH (UID 1 BINARY.SIZE[1] 11)"], out
            # UID EXPUNGE: EXPUNGE responses, as in rev1.
            out = c.cmd(b"T", b"UID EXPUNGE 2")
            assert _untagged(out) == [b"* 2 EXPUNGE"], out
            # CLOSE then UNSELECT (no mailbox: BAD), SELECT twice: CLOSED.
            c.cmd(b"S", b"SELECT INBOX")
            out = c.cmd(b"S", b"EXAMINE INBOX")
            assert _untagged(out)[0] == b"* OK [CLOSED] Previous mailbox closed.", out
            assert _tagged(c.cmd(b"T", b"CLOSE")) == b"OK CLOSE completed"
            assert _tagged(c.cmd(b"T", b"UNSELECT")).startswith(b"BAD")

        return self.in_client(client)


# Refusals and STATUS SIZE: Dovecot (which offers IMAP4rev1 only, but sends
# the RFC 5530 codes there) and a rev2 session of ours, on the same mbox.
DOVECOT_SCRIPT = [
    b"CREATE a/b",
    b"CREATE c",
    b"CREATE a",
    b"CREATE c",
    b"RENAME c a/b",
    b"RENAME c INBOX",
    b"DELETE nothere",
    b"RENAME nothere d",
    b"APPEND nothere {1+}\r\nx",
    b"STATUS INBOX (MESSAGES UNSEEN SIZE)",
    b"SELECT INBOX",
    b"COPY 1 nothere",
    b"SEARCH RETURN (COUNT) ALL",
]


def _session(port: int, login: bytes, script: list[bytes], enable: bool) -> list[bytes]:
    """Each command's untagged STATUS/ESEARCH lines and tagged status word and code."""
    c = RawClient(port)
    try:
        assert c.cmd(b"L", login)[-1].startswith(b"L OK")
        if enable:
            assert c.cmd(b"E", b"ENABLE IMAP4rev2")[0] == b"* ENABLED IMAP4rev2\r\n"
        answers = []
        for command in script:
            lines = [ln.rstrip(b"\r\n") for ln in c.cmd(b"T", command)]
            kept = [ln for ln in lines[:-1] if ln.startswith((b"* STATUS", b"* ESEARCH"))]
            _, word, text = (lines[-1] + b" ").split(b" ", 2)
            code = text.split(b"]")[0] + b"]" if text.startswith(b"[") else b""
            answers.append(b" ".join([*kept, word, code]).strip())
        return answers
    finally:
        c.close()


class LikeDovecotTest(Rev2Case):
    """The response codes and STATUS SIZE of a rev2 session equal Dovecot's."""

    timeout = 120

    def setUp(self) -> None:
        reason = dovecot_peer.available()
        if reason:
            raise unittest.SkipTest(reason)
        super().setUp()
        path = folder_path(self.config.mail_dir, USER, INBOX)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sort_corpus.mbox())
        self.dovecot = dovecot_peer.Dovecot()
        self.addCleanup(self.dovecot.stop)
        self.dovecot.start(sort_corpus.mbox())

    @defer.inlineCallbacks
    def test_same_codes_as_dovecot(self):
        ours_login = b'LOGIN %s "%s"' % (USER.encode(), PASSWORD)
        ours = yield self.in_thread(_session, self.port_number, ours_login, DOVECOT_SCRIPT, True)
        login = b"LOGIN %s %s" % (dovecot_peer.USER.encode(), dovecot_peer.PASSWORD.encode())
        theirs = yield self.in_thread(_session, self.dovecot.port, login, DOVECOT_SCRIPT, False)
        self.assertEqual(
            list(zip(DOVECOT_SCRIPT, ours, strict=True)),
            list(zip(DOVECOT_SCRIPT, theirs, strict=True)),
        )
        assert any(b"SIZE" in a for a in ours) and any(b"[ALREADYEXISTS]" in a for a in ours)
