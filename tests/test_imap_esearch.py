"""
ESEARCH (RFC 4731) and SEARCHRES (RFC 5182): SEARCH's RETURN options and the
saved result C{$}, over loopback against the mbox store, and compared byte
for byte with Dovecot's answers on the same mbox file where a private
Dovecot can run here (tests/dovecot_peer.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from mailsrv.imap.esearch import (
    SEARCH_RETURN_OPTIONS,
    ReturnSyntaxError,
    answers,
    esearch_line,
    parse_return,
    saved_part,
)
from mailsrv.imap.parsing import SavedResult, resolve
from mailsrv.imap.search import SearchError, parse, tokenize
from mailsrv.store.names import INBOX, folder_path
from tests import dovecot_peer, sort_corpus
from tests.imap_loopback_support import LoopbackIMAPCase, RawClient
from tests.test_imap_harness import PASSWORD, USER

# --- pure parts -----------------------------------------------------------------


def test_parse_return_with_save():
    assert parse_return(b"RETURN (SAVE MIN) 1:3", SEARCH_RETURN_OPTIONS) == (
        frozenset({"SAVE", "MIN"}),
        b" 1:3",
    )
    assert parse_return(b"RETURN () ALL", SEARCH_RETURN_OPTIONS)[0] == frozenset({"ALL"})
    with pytest.raises(ReturnSyntaxError):
        parse_return(b"RETURN (SAVE) ALL")  # ESORT is not offered SAVE


def test_saved_part():
    """RFC 5182 2.4: SAVE with MIN/MAX alone keeps only those; with ALL or COUNT, all."""
    found = [3, 4, 5]
    assert saved_part(frozenset({"SAVE"}), found) == found
    assert saved_part(frozenset({"SAVE", "MIN"}), found) == [3]
    assert saved_part(frozenset({"SAVE", "MAX"}), found) == [5]
    assert saved_part(frozenset({"SAVE", "MIN", "MAX"}), found) == [3, 5]
    assert saved_part(frozenset({"SAVE", "MIN", "MAX"}), [7]) == [7]
    assert saved_part(frozenset({"SAVE", "MAX", "COUNT"}), found) == found
    assert saved_part(frozenset({"SAVE", "MIN", "ALL"}), found) == found
    assert saved_part(frozenset({"SAVE", "MIN"}), []) == []
    assert not answers(frozenset({"SAVE"}))
    assert answers(frozenset({"SAVE", "COUNT"}))


def test_esearch_line_ignores_save():
    line = esearch_line(b"t", False, frozenset({"SAVE", "MIN", "ALL"}), [1, 2, 3, 7])
    assert line == b'ESEARCH (TAG "t") MIN 1 ALL 1:3,7'


def test_saved_result_names_uids_in_either_command():
    saved = SavedResult([2, 3, 4, 9])
    uids = [1, 3, 4, 8, 9, 12]  # 2 was expunged since it was saved
    assert list(resolve(saved, uids, False)) == [2, 3, 5]
    assert list(resolve(saved, uids, True)) == [2, 3, 5]
    assert list(resolve(SavedResult(()), uids, False)) == []
    assert list(resolve(SavedResult([5]), [], False)) == []  # no BAD for an empty mailbox
    assert saved.contains(9, 12) and not saved.contains(8, 12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 60), unique=True).map(sorted),
    st.lists(st.integers(1, 60), unique=True).map(sorted),
    st.booleans(),
)
def test_saved_result_property(saved, present, uid):
    """C{$} names exactly the saved UIDs still present, by position, in either command."""
    want = [i + 1 for i, u in enumerate(present) if u in saved]
    assert list(resolve(SavedResult(saved), present, uid)) == want


def test_search_dollar_key():
    assert parse(tokenize(b"$"), saved=[4, 5]) == ("and", [("saved", frozenset({4, 5}))])
    assert parse(tokenize(b"UID $"), saved=[]) == ("and", [("saved", frozenset())])
    assert parse(tokenize(b"SUBJECT $"), saved=[1])[1][0][0] == "SUBJECT"
    with pytest.raises(SearchError):
        parse(tokenize(b"$"))  # where no saved result is given (SORT, THREAD)


# --- over loopback ----------------------------------------------------------------


def _session(port: int, login: bytes, script: list[bytes]) -> list[list[bytes]]:
    """Each command's untagged lines and its tagged status word, from one session."""
    c = RawClient(port)
    try:
        out = c.cmd(b"L", login)
        assert out[-1].startswith(b"L OK"), out
        answers = []
        for i, command in enumerate(script):
            tag = b"T%d" % i
            lines = c.cmd(tag, command)
            status = lines[-1].split(b" ")[1] if lines else b""
            answers.append([ln for ln in lines[:-1] if ln.startswith(b"* ")] + [status])
        return answers
    finally:
        c.close()


def _results(answers: list[list[bytes]]) -> list[list[bytes]]:
    """Only the lines a comparison needs: search results, FETCH lines, the status word."""
    keep = (b"* SEARCH", b"* ESEARCH", b"* SORT", b"* THREAD")
    return [
        [ln for ln in a[:-1] if ln.startswith(keep) or b" FETCH (" in ln] + a[-1:] for a in answers
    ]


OURS = b'LOGIN %s "%s"' % (USER.encode(), PASSWORD)


class ESearchCase(LoopbackIMAPCase):
    """Our server over loopback with the 24 messages of tests/sort_corpus.py in INBOX."""

    def setUp(self) -> None:
        super().setUp()
        path = folder_path(self.config.mail_dir, USER, INBOX)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sort_corpus.mbox())

    def run_script(self, script: list[bytes]) -> defer.Deferred:
        return self.in_thread(_session, self.port_number, OURS, [b"SELECT INBOX", *script])

    @defer.inlineCallbacks
    def assert_script(self, pairs: list[tuple[bytes, list[bytes]]]):
        """Run the commands; each answer (untagged lines, status word) must be as given."""
        got = yield self.run_script([c for c, _ in pairs])
        assert got[0][-1] == b"OK", got[0]
        for (command, want), answer in zip(pairs, got[1:], strict=True):
            assert answer == want, (command, answer)


class ESearchTest(ESearchCase):
    """SEARCH RETURN (...) and UID SEARCH RETURN (...) answer with ESEARCH (RFC 4731)."""

    @defer.inlineCallbacks
    def test_capabilities(self):
        got = yield self.in_thread(_session, self.port_number, OURS, [b"CAPABILITY"])
        caps = got[0][0].split()
        assert b"ESEARCH" in caps and b"SEARCHRES" in caps

    def test_return_options(self):
        return self.assert_script(
            [
                (
                    b"SEARCH RETURN (MIN MAX COUNT ALL) 1:3,7,9:10",
                    [b'* ESEARCH (TAG "T1") MIN 1 MAX 10 ALL 1:3,7,9:10 COUNT 6\r\n', b"OK"],
                ),
                (b"SEARCH RETURN () 2,4", [b'* ESEARCH (TAG "T2") ALL 2,4\r\n', b"OK"]),
                (
                    b"UID SEARCH RETURN (COUNT) ALL",
                    [b'* ESEARCH (TAG "T3") UID COUNT 24\r\n', b"OK"],
                ),
                (
                    b"UID SEARCH RETURN (ALL) 2,5:6",
                    [b'* ESEARCH (TAG "T4") UID ALL 2,5:6\r\n', b"OK"],
                ),
                (
                    b"SEARCH RETURN (MIN MAX COUNT ALL) SUBJECT nothing-matches",
                    [b'* ESEARCH (TAG "T5") COUNT 0\r\n', b"OK"],
                ),
                (
                    b"UID SEARCH RETURN (MIN MAX ALL) SUBJECT nothing-matches",
                    [b'* ESEARCH (TAG "T6") UID\r\n', b"OK"],
                ),
                (
                    b"SEARCH RETURN (all min) CHARSET UTF-8 1:3",
                    [b'* ESEARCH (TAG "T7") MIN 1 ALL 1:3\r\n', b"OK"],
                ),
                (b"SEARCH RETURN (FOO) ALL", [b"BAD"]),
                (b"SEARCH RETURN ALL ALL", [b"BAD"]),
                (b"SEARCH 2,4", [b"* SEARCH 2 4\r\n", b"OK"]),  # no RETURN: as before
            ]
        )


class SearchResTest(ESearchCase):
    """RETURN (SAVE) and C{$} (RFC 5182)."""

    def test_save_and_use(self):
        return self.assert_script(
            [
                (b"FETCH $ (UID)", [b"OK"]),  # RFC 5182 2.1: empty before any SAVE
                (b"SEARCH $", [b"* SEARCH\r\n", b"OK"]),
                (b"SEARCH RETURN (SAVE) 2:4", [b"OK"]),  # SAVE alone: no ESEARCH
                (
                    b"FETCH $ (UID)",
                    [b"* 2 FETCH (UID 2)\r\n", b"* 3 FETCH (UID 3)\r\n", b"* 4 FETCH (UID 4)\r\n"]
                    + [b"OK"],
                ),
                (b"UID SEARCH $", [b"* SEARCH 2 3 4\r\n", b"OK"]),
                (b"SEARCH UID $", [b"* SEARCH 2 3 4\r\n", b"OK"]),
                (b"SEARCH OR $ 9", [b"* SEARCH 2 3 4 9\r\n", b"OK"]),
                (b"SEARCH RETURN (SAVE MIN) 3:5", [b'* ESEARCH (TAG "T8") MIN 3\r\n', b"OK"]),
                (b"UID FETCH $ (UID)", [b"* 3 FETCH (UID 3)\r\n", b"OK"]),
                (
                    b"SEARCH RETURN (SAVE MIN MAX) 3:5",
                    [b'* ESEARCH (TAG "T10") MIN 3 MAX 5\r\n', b"OK"],
                ),
                (b"FETCH $ (UID)", [b"* 3 FETCH (UID 3)\r\n", b"* 5 FETCH (UID 5)\r\n", b"OK"]),
                (
                    b"SEARCH RETURN (SAVE MAX COUNT) 3:5",
                    [b'* ESEARCH (TAG "T12") MAX 5 COUNT 3\r\n', b"OK"],
                ),
                (b"SEARCH $", [b"* SEARCH 3 4 5\r\n", b"OK"]),
                (b"SEARCH RETURN (SAVE) NOT $", [b"OK"]),  # "$" is read before it is replaced
                (b"SEARCH RETURN (COUNT) $", [b'* ESEARCH (TAG "T15") COUNT 21\r\n', b"OK"]),
                (b"FETCH 1,$ (UID)", [b"BAD"]),  # RFC 5182 4: "$" only as a whole set
                (b"SEARCH 1,$", [b"BAD"]),
                (b"SEARCH RETURN (SAVE) 6", [b"OK"]),
                (b"SEARCH FOOBAR", [b"BAD"]),
                (b"SEARCH RETURN (SAVE) FOOBAR", [b"BAD"]),  # a BAD leaves "$" as it was
                (b"FETCH $ (UID)", [b"* 6 FETCH (UID 6)\r\n", b"OK"]),
                (b"SEARCH RETURN (SAVE) CHARSET KOI8-R 6", [b"NO"]),  # a NO empties it
                (b"FETCH $ (UID)", [b"OK"]),
            ]
        )

    def test_store_copy_move_expunge(self):
        return self.assert_script(
            [
                (b"SEARCH RETURN (SAVE) 1:2", [b"OK"]),
                (
                    b"STORE $ +FLAGS (\\Flagged)",
                    [b"* 1 FETCH (FLAGS (\\Flagged \\Recent))\r\n"]
                    + [b"* 2 FETCH (FLAGS (\\Flagged \\Recent))\r\n", b"OK"],
                ),
                (
                    b"UID STORE $ -FLAGS (\\Flagged)",
                    [b"* 1 FETCH (FLAGS (\\Recent) UID 1)\r\n"]
                    + [b"* 2 FETCH (FLAGS (\\Recent) UID 2)\r\n", b"OK"],
                ),
                (b"COPY $ INBOX", [b"* 26 EXISTS\r\n", b"* 26 RECENT\r\n", b"OK"]),
                (b"UID COPY $ INBOX", [b"* 28 EXISTS\r\n", b"* 28 RECENT\r\n", b"OK"]),
                # RFC 5182 2.1: "$" holds UIDs; an expunge does not change what it names.
                (b"UID SEARCH RETURN (SAVE) 3:5", [b"OK"]),
                (b"STORE 1 +FLAGS.SILENT (\\Deleted)", [b"OK"]),
                (b"EXPUNGE", [b"* 1 EXPUNGE\r\n", b"OK"]),
                (
                    b"FETCH $ (UID)",
                    [b"* 2 FETCH (UID 3)\r\n", b"* 3 FETCH (UID 4)\r\n", b"* 4 FETCH (UID 5)\r\n"]
                    + [b"OK"],
                ),
                (b"STORE $ +FLAGS.SILENT (\\Deleted)", [b"OK"]),
                (
                    b"UID EXPUNGE $",
                    [b"* 2 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n", b"OK"],
                ),
                (b"FETCH $ (UID)", [b"OK"]),  # all it named are gone
            ]
        )

    @defer.inlineCallbacks
    def test_move(self):
        got = yield self.run_script(
            [
                b"CREATE Archive",
                b"SEARCH RETURN (SAVE) 2,6",
                b"STORE 1 +FLAGS.SILENT (\\Deleted)",
                b"EXPUNGE",
                b"MOVE $ Archive",
                b"FETCH $ (UID)",
                b"STATUS Archive (MESSAGES)",
            ]
        )
        move = got[5]
        assert move[0].startswith(b"* OK [COPYUID ") and move[0].split()[4] == b"2,6", move
        assert move[1:] == [b"* 1 EXPUNGE\r\n", b"* 4 EXPUNGE\r\n", b"OK"], move
        assert got[6] == [b"OK"]
        assert got[7] == [b"* STATUS Archive (MESSAGES 2)\r\n", b"OK"]

    def test_sort_and_thread(self):
        """C{$} in SORT and THREAD keys, and SAVE with ESORT (RFC 5267 3)."""
        return self.assert_script(
            [
                (b"SEARCH RETURN (SAVE) 2:6", [b"OK"]),
                (b"UID SORT (SUBJECT) UTF-8 UID $", [b"* SORT 2 3 4 5 6\r\n", b"OK"]),
                (b"THREAD REFERENCES UTF-8 $", [b"* THREAD (2 3)((4 5)(6))\r\n", b"OK"]),
                (b"SORT RETURN (SAVE) (REVERSE ARRIVAL) UTF-8 1:3", [b"OK"]),
                (b"SEARCH $", [b"* SEARCH 1 2 3\r\n", b"OK"]),
                (
                    b"SORT RETURN (SAVE MIN) (REVERSE ARRIVAL) UTF-8 1:3",
                    [b'* ESEARCH (TAG "T6") MIN 3\r\n', b"OK"],
                ),
                (b"SEARCH $", [b"* SEARCH 3\r\n", b"OK"]),
                (b"SORT RETURN (SAVE) (ARRIVAL) CHARSET-X 1", [b"NO"]),
                (b"SEARCH $", [b"* SEARCH\r\n", b"OK"]),
            ]
        )

    @defer.inlineCallbacks
    def test_reset_by_select_examine_unselect_close(self):
        script = [b"SEARCH RETURN (SAVE) 1:3"]
        for change in (b"SELECT INBOX", b"EXAMINE INBOX", b"UNSELECT", b"CLOSE"):
            script += [b"SEARCH RETURN (SAVE) 1:3", change, b"SELECT INBOX"]
            script += [b"FETCH $ (UID)", b"SEARCH $"]
        got = yield self.run_script(script)
        for i in range(4):
            fetch, search = got[5 + 5 * i], got[6 + 5 * i]
            assert fetch == [b"OK"], (i, fetch)
            assert search == [b"* SEARCH\r\n", b"OK"], (i, search)


# --- the same answers as Dovecot's ------------------------------------------------

DOVECOT_SCRIPT = [
    b"SELECT INBOX",
    b"FETCH $ (UID)",
    b"SEARCH $",
    b"SEARCH RETURN (MIN MAX COUNT ALL) ALL",
    b"SEARCH RETURN (MIN MAX COUNT ALL) 1:3,7,9:10",
    b"SEARCH RETURN () 2,4",
    b"UID SEARCH RETURN (COUNT) ALL",
    b"UID SEARCH RETURN (ALL) 2,5:6",
    b"SEARCH RETURN (MIN MAX COUNT ALL) SUBJECT nothing-matches",
    b"SEARCH RETURN (MIN) SUBJECT nothing-matches",
    b"UID SEARCH RETURN (MIN MAX ALL) SUBJECT nothing-matches",
    b"SEARCH RETURN (ALL) CHARSET UTF-8 1:3",
    b"SEARCH RETURN (all min) FROM ann",
    b"UID SEARCH RETURN (MIN MAX) NOT SUBJECT hello",
    b"SEARCH RETURN (COUNT COUNT) 1",
    b"SEARCH RETURN (FOO) ALL",
    b"SEARCH RETURN ALL ALL",
    b"SEARCH RETURN (SAVE) 2:4",
    b"FETCH $ (UID)",
    b"UID FETCH $ (UID)",
    b"SEARCH $",
    b"UID SEARCH $",
    b"SEARCH UID $",
    b"SEARCH OR $ 9",
    b"SEARCH RETURN (SAVE MIN) 3:5",
    b"FETCH $ (UID)",
    b"SEARCH RETURN (SAVE MIN MAX) 3:5",
    b"FETCH $ (UID)",
    b"SEARCH RETURN (SAVE MAX COUNT) 3:5",
    b"FETCH $ (UID)",
    b"SEARCH RETURN (SAVE ALL) 6",
    b"SEARCH RETURN (SAVE) FOOBAR",
    b"FETCH $ (UID)",
    b"SEARCH RETURN (SAVE) NOT $",
    b"SEARCH RETURN (COUNT) $",
    b"FETCH 1,$ (UID)",
    b"FETCH $,1 (UID)",
    # SORT and THREAD before any expunge: Dovecot 2.3's mbox THREAD can panic after one.
    b"SEARCH RETURN (SAVE) 2:6",
    b"SORT (REVERSE ARRIVAL) UTF-8 $",
    b"UID SORT (SUBJECT) UTF-8 UID $",
    b"THREAD REFERENCES UTF-8 $",
    b"UID THREAD ORDEREDSUBJECT UTF-8 OR $ 1",
    b"SORT RETURN (SAVE) (REVERSE ARRIVAL) UTF-8 1:3",
    b"FETCH $ (UID)",
    b"SORT RETURN (SAVE MIN) (REVERSE ARRIVAL) UTF-8 1:3",
    b"FETCH $ (UID)",
    b"UID SORT RETURN (SAVE MAX ALL) (SUBJECT) UTF-8 4:9",
    b"FETCH $ (UID)",
    b"SORT RETURN (SAVE FOO) (SUBJECT) UTF-8 4:9",
    b"FETCH $ (UID)",
    b"SEARCH RETURN (SAVE) SUBJECT nothing-matches",
    b"FETCH $ (UID)",
    b"STORE $ +FLAGS (\\Flagged)",
    b"SEARCH RETURN (SAVE) 1:2",
    b"STORE $ +FLAGS (\\Flagged)",
    b"SEARCH RETURN (SAVE) FLAGGED",
    b"UID SEARCH RETURN (ALL) $",
    b"UID SEARCH RETURN (SAVE) 4:6",
    b"STORE 1 +FLAGS.SILENT (\\Deleted)",
    b"EXPUNGE",
    b"FETCH $ (UID)",
    b"SEARCH RETURN (ALL) $",
    b"UID SEARCH RETURN (ALL) $",
    b"UNSELECT",
    b"SELECT INBOX",
    b"FETCH $ (UID)",
]


class ESearchLikeDovecotTest(ESearchCase):
    """Our ESEARCH and SEARCHRES answers equal Dovecot's on the same mailbox."""

    timeout = 120

    def setUp(self) -> None:
        reason = dovecot_peer.available()
        if reason:
            raise unittest.SkipTest(reason)
        super().setUp()
        self.dovecot = dovecot_peer.Dovecot()
        self.addCleanup(self.dovecot.stop)
        self.dovecot.start(sort_corpus.mbox())

    @defer.inlineCallbacks
    def test_same_answers_as_dovecot(self):
        ours = yield self.in_thread(_session, self.port_number, OURS, DOVECOT_SCRIPT)
        login = b"LOGIN %s %s" % (dovecot_peer.USER.encode(), dovecot_peer.PASSWORD.encode())
        theirs = yield self.in_thread(_session, self.dovecot.port, login, DOVECOT_SCRIPT)
        diffs = [
            (command, o, t)
            for command, o, t in zip(DOVECOT_SCRIPT, _results(ours), _results(theirs), strict=True)
            if o != t
        ]
        for command, o, t in diffs:
            print(command, "\n  ours:   ", o, "\n  dovecot:", t)
        self.assertEqual(diffs, [])
        shown = [ln for answer in _results(theirs) for ln in answer]
        assert sum(ln.startswith(b"* ESEARCH") for ln in shown) >= 15, shown
        assert sum(b" FETCH (UID" in ln for ln in shown) >= 10, shown
