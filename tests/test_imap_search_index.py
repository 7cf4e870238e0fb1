"""
SEARCH over the index: the whole-view evaluation (L{Matcher.mask}) and the
compiled per-message one give what the search tree means, message by
message (a reference evaluator below, the tree walked per message as the
server did before), on random programs over random views; and a search of a
big view runs off the reactor, so another session's NOOP is answered while
it runs.
"""

from __future__ import annotations

import calendar
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer, threads
from twisted.mail import imap4
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsrv.auth.realm import MailRealm
from mailsrv.imap.commands.selected import found, matching
from mailsrv.imap.parsing import SeqSet
from mailsrv.imap.search import Literal, Matcher, SearchError, parse, tokenize
from mailsrv.imap.searchmask import Spans
from mailsrv.imap.server import IMAPServerFactory, account_factory
from mailsrv.interfaces import DELETED, FLAGGED, SEEN, MessageInfo
from mailsrv.spool import BytesSource
from mailsrv.store.infos import InfoList
from mailsrv.store.memory import MemoryMailStore
from tests.imap_loopback_support import RawClient
from tests.test_imap_harness import PASSWORD, USER, make_config

NOW = 1_700_000_000
KEYWORDS = ["$a", "$b"]
FLAG_SETS = [
    frozenset(),
    frozenset({SEEN}),
    frozenset({SEEN, FLAGGED}),
    frozenset({DELETED}),
    frozenset({SEEN, "$a"}),
    frozenset({"$b", FLAGGED, "\\Answered", "\\Draft"}),
]
_SYSTEM = {
    "ANSWERED": "\\Answered",
    "DELETED": DELETED,
    "DRAFT": "\\Draft",
    "FLAGGED": FLAGGED,
    "SEEN": SEEN,
}


def _set_members(raw: bytes, last: int) -> Spans:
    return Spans(SeqSet(raw).ranges(last))


def reference(tree: tuple, seq: int, info: MessageInfo, n: int, last_uid: int, recent: set) -> bool:
    """What a tree means for one message: the tree walked as the server did before."""

    def members(raw: Any, last: int) -> Any:
        try:
            return _set_members(raw.value if isinstance(raw, Literal) else raw, last)
        except Exception:
            raise SearchError("Bad message set")

    def day(ts: float) -> tuple[int, int, int]:
        t = time.gmtime(ts)
        return t.tm_year, t.tm_mon, t.tm_mday

    def ev(t: tuple) -> bool:
        k = t[0]
        if k == "and":
            return all(ev(x) for x in t[1])
        if k == "or":
            return ev(t[1]) or ev(t[2])
        if k == "not":
            return not ev(t[1])
        if k == "ALL":
            return True
        if k in _SYSTEM:
            return _SYSTEM[k] in info.flags
        if k.startswith("UN") and k[2:] in _SYSTEM:
            return _SYSTEM[k[2:]] not in info.flags
        if k == "RECENT":
            return info.uid in recent
        if k == "NEW":
            return info.uid in recent and SEEN not in info.flags
        if k == "OLD":
            return info.uid not in recent
        if k == "KEYWORD":
            return t[1] in info.flags
        if k == "UNKEYWORD":
            return t[1] not in info.flags
        if k == "MODSEQ":
            return info.modseq >= t[1]
        if k == "LARGER":
            return info.size > t[1]
        if k == "SMALLER":
            return info.size < t[1]
        if k == "seqset":
            return seq in members(t[1], n)
        if k == "saved":
            return info.uid in t[1]
        if k == "UID":
            return info.uid in members(t[1], last_uid)
        if k == "OLDER":
            return int(info.internal_date) <= NOW - t[1]
        if k == "YOUNGER":
            return int(info.internal_date) >= NOW - t[1]
        d = day(info.internal_date)
        if k == "BEFORE":
            return d < t[1]
        if k == "ON":
            return d == t[1]
        if k == "SINCE":
            return d >= t[1]
        raise AssertionError(k)

    return ev(tree)


# --- random views and programs ------------------------------------------------------

_DAY0 = calendar.timegm((2023, 2, 27, 0, 0, 0))
_OFFSETS = [0, 0.5, 86399.75, 86400, 2 * 86400 - 0.25, 2 * 86400, 3 * 86400 + 7, 40 * 86400]


@st.composite
def views(draw: Any) -> list[MessageInfo]:
    n = draw(st.integers(0, 40))
    uid, out = 0, []
    for _ in range(n):
        uid += draw(st.integers(1, 5))
        out.append(
            MessageInfo(
                uid,
                draw(st.integers(0, 3000)),
                draw(st.sampled_from(FLAG_SETS)),
                _DAY0 + draw(st.sampled_from(_OFFSETS)),
                draw(st.integers(1, 60)),
            )
        )
    return out


_NUMBERS = st.sampled_from([b"1", b"2", b"3", b"7", b"20", b"35", b"*", b"4294967295"])
_SETS = st.builds(
    lambda parts: b",".join(parts),
    st.lists(
        st.one_of(_NUMBERS, st.builds(lambda a, b: a + b":" + b, _NUMBERS, _NUMBERS)),
        min_size=1,
        max_size=3,
    ),
)
_DAYS = [b"27-Feb-2023", b"28-Feb-2023", b"29-Feb-2023", b"31-Feb-2023", b"1-Mar-2023"]
_DAYS += [b"0-Mar-2023", b"2-Mar-2023", b"10-Apr-2023", b"1-Jan-1969", b"1-Jan-10000"]
_DAYS += [b"32-Dec-9999", b"26-Feb-2023", b"0-Jan-2023", b"32-Dec-2022"]
_DATES = st.sampled_from(_DAYS)
_KEYS = st.one_of(
    st.sampled_from(
        [b"ALL", b"NEW", b"OLD", b"RECENT", b"SEEN", b"UNSEEN", b"DELETED", b"UNDELETED"]
        + [b"FLAGGED", b"UNFLAGGED", b"ANSWERED", b"UNANSWERED", b"DRAFT", b"UNDRAFT"]
        + [b"KEYWORD $a", b"UNKEYWORD $b", b"KEYWORD $c", b"1x", b"UID 3:x", b"$"]
    ),
    st.builds(
        lambda k, v: k + b" %d" % v, st.sampled_from([b"LARGER", b"SMALLER"]), st.integers(0, 3001)
    ),
    st.builds(lambda v: b"MODSEQ %d" % v, st.integers(0, 61)),
    st.builds(lambda k, v: k + b" " + v, st.sampled_from([b"SINCE", b"BEFORE", b"ON"]), _DATES),
    st.builds(
        lambda k, v: k + b" %d" % v,
        st.sampled_from([b"OLDER", b"YOUNGER"]),
        st.sampled_from([1, 86400, NOW - _DAY0 - 86400, NOW - _DAY0, 10**9]),
    ),
    _SETS,
    st.builds(lambda s: b"UID " + s, _SETS),
)


def programs() -> Any:
    return st.recursive(
        _KEYS,
        lambda inner: st.one_of(
            st.builds(lambda a: b"NOT " + a, inner),
            st.builds(lambda a, b: b"OR " + a + b" " + b, inner, inner),
            st.builds(
                lambda xs: b"(" + b" ".join(xs) + b")", st.lists(inner, min_size=1, max_size=3)
            ),
        ),
        max_leaves=6,
    )


def _outcome(f: Any) -> Any:
    try:
        return f()
    except SearchError:
        return "SearchError"


@settings(max_examples=300, deadline=None)
@given(
    views(),
    st.lists(programs(), min_size=1, max_size=3),
    st.sets(st.integers(1, 200), max_size=6),
    st.sets(st.integers(1, 200), max_size=6),
    st.booleans(),
)
def test_whole_view_and_compiled_evaluation_mean_what_the_tree_means(
    infos, words, recent, saved, as_columns
):
    tree = parse(tokenize(b" ".join(words)), saved=sorted(saved))
    n = len(infos)
    last_uid = infos[-1].uid if infos else 0
    expected = _outcome(
        lambda: [s for s, i in enumerate(infos, 1) if reference(tree, s, i, n, last_uid, recent)]
    )
    view = InfoList.of(infos) if as_columns else infos

    def matcher() -> Matcher:
        return Matcher(tree, n, last_uid, set(recent), _set_members, now=NOW)

    # one message at a time (the compiled closures), as CONTEXT's updates use it
    assert _outcome(lambda: [s for s, _ in matching(matcher(), None, view)]) == expected
    # the whole view at once where it can, else one at a time: what SEARCH answers
    got = _outcome(lambda: found(matcher(), None, view, False, True, True))
    if expected == "SearchError":
        assert got == expected
        return
    seqs, uids, modseqs = got
    assert list(seqs) == expected
    assert list(uids) == [infos[s - 1].uid for s in expected]
    assert list(modseqs) == [infos[s - 1].modseq for s in expected]
    by_uid = found(matcher(), None, view, True, False, False)[0]
    assert list(by_uid) == [infos[s - 1].uid for s in expected]


def test_days_of_the_internal_date_at_their_edges():
    """BEFORE, ON, SINCE over the whole view: days that do not exist, and the ends of the range."""
    infos = [MessageInfo(u, 1, frozenset(), _DAY0 + o, 1) for u, o in enumerate(_OFFSETS, 1)]
    n = len(infos)
    for key in (b"BEFORE", b"ON", b"SINCE"):
        for day in _DAYS:
            tree = parse(tokenize(key + b" " + day))
            m = Matcher(tree, n, n, set(), _set_members, now=NOW)
            mask = m.mask(infos)
            assert mask is not None
            want = [s for s, i in enumerate(infos, 1) if reference(tree, s, i, n, n, set())]
            assert [s for s, bit in enumerate(mask, 1) if bit] == want, (key, day)


def test_shortcuts_are_taken_for_the_common_programs():
    """The common programs over the index are evaluated over the view at once, not per message."""
    infos = [MessageInfo(u, u * 10, FLAG_SETS[u % 6], _DAY0 + u * 3600, u) for u in range(1, 300)]
    for program in (
        b"ALL",
        b"1:*",
        b"UID 50:*",
        b"UNSEEN",
        b"SINCE 1-Mar-2023",
        b"FLAGGED",
        b"DELETED",
        b"OR SEEN LARGER 1000",
        b"NOT KEYWORD $a MODSEQ 20 2,4:9",
    ):
        m = Matcher(parse(tokenize(program)), len(infos), 299, set(), _set_members, now=NOW)
        assert m.mask(infos) is not None, program
    header = Matcher(parse(tokenize(b"SUBJECT x")), len(infos), 299, set(), _set_members)
    assert header.mask(infos) is None


# --- the reactor keeps answering -----------------------------------------------------


class _Gate:
    """Pool jobs wait here while closed; C{entered} is set when one does."""

    def __init__(self) -> None:
        self.closed = False
        self.entered = threading.Event()
        self._open = threading.Event()

    def wrap(self, f: Any) -> Any:
        def gated(*a: Any, **kw: Any) -> Any:
            if self.closed:
                self.entered.set()
                self._open.wait(30)
            return f(*a, **kw)

        return gated

    def open(self) -> None:
        self.closed = False
        self._open.set()


class SearchOffTheReactorTest(unittest.TestCase):
    """An index-only SEARCH over a big view runs in the pool; other sessions are answered meanwhile."""

    timeout = 60
    MESSAGES = 5000

    def setUp(self) -> None:

        from twisted.internet import reactor

        tmp = Path(tempfile.mkdtemp(prefix="imapsearch-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="imap-search-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = MemoryMailStore(clock=lambda: float(NOW))
        folder = self.store.open_folder(USER, "INBOX").result
        folder.append_many(
            (BytesSource(b"Subject: %d\n\nbody\n" % i), FLAG_SETS[i % 6], float(_DAY0 + i))
            for i in range(self.MESSAGES)
        )
        folder.close()
        self.gate = _Gate()

        def run(f: Any, *a: Any, **kw: Any) -> defer.Deferred:
            return threads.deferToThreadPool(reactor, self.pool, self.gate.wrap(f), *a, **kw)

        config = make_config(tmp)
        realm = MailRealm()
        realm.register(imap4.IAccount, account_factory(config, self.store, run))
        portal = Portal(realm, [InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD})])
        factory = IMAPServerFactory(
            config=config, store=self.store, portal=portal, reactor=reactor, run=run
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def in_thread(self, f: Any, *args: Any) -> defer.Deferred:
        return threads.deferToThread(f, *args)

    @defer.inlineCallbacks
    def test_noop_answered_while_an_index_search_runs(self):
        port = self.port.getHost().port
        a = yield self.in_thread(RawClient, port)
        b = yield self.in_thread(RawClient, port)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        for c in (a, b):
            yield self.in_thread(c.login)
            out = yield self.in_thread(c.cmd, b"S", b"SELECT INBOX")
            self.assertTrue(out[-1].startswith(b"S OK"), out)
        self.gate.closed = True
        self.addCleanup(self.gate.open)
        a.send(b"A1 SEARCH UNSEEN NOT DELETED\r\n")
        went = yield self.in_thread(self.gate.entered.wait, 10)
        self.assertTrue(went, "the search did not go to the thread pool")
        out = yield self.in_thread(b.cmd, b"B1", b"NOOP")
        self.assertEqual(out[-1], b"B1 OK NOOP completed\r\n")
        self.gate.open()
        out = yield self.in_thread(a.read_until, b"A1")
        # UNSEEN NOT DELETED: the messages with no flags (i % 6 == 0) or $b's set (i % 6 == 5)
        want = [i + 1 for i in range(self.MESSAGES) if i % 6 in (0, 5)]
        self.assertEqual(
            out,
            [
                b"* SEARCH " + b" ".join(b"%d" % s for s in want) + b"\r\n",
                b"A1 OK SEARCH completed\r\n",
            ],
        )
