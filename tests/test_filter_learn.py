"""
Training the spam filter from IMAP copies and moves into and out of Junk:
the rule, the bounded background queue, and the IMAP hook, with the server
on a StringTransport over the memory store and a recording trainer
(task.Clock). The trainers against the real daemons: test_filter_learn_daemons.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv import config as configmod
from mailsrv.filter.learn import HAM, SPAM, IMessageTrainer, TrainingQueue, learn_class
from mailsrv.filter.trainers import (
    CommandTrainer,
    RspamdTrainer,
    SpamdTrainer,
    build_trainer,
    parse_tell_response,
    tell_request,
)
from mailsrv.filter.verdict import FilterError

from .test_imap_harness import USER, Harness, sync_run

SPAMMY = b"From: win@lottery.test\nSubject: You won\nMessage-ID: <w1@lottery.test>\n\nclaim now\n"
HAMMY = b"From: bob@example.test\nSubject: Lunch\nMessage-ID: <l1@example.test>\n\nnoon?\n"


@implementer(IMessageTrainer)
class RecordingTrainer:
    """Records what it is asked to learn; answers with C{self.answer()} (a Deferred)."""

    def __init__(self) -> None:
        self.learnt: list[tuple[bytes, str, str]] = []
        self.answer = lambda: defer.succeed("learnt")

    def learn(self, message: bytes, message_class: str, user: str) -> defer.Deferred:
        self.learnt.append((message, message_class, user))
        return self.answer()


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def training(h: Harness, **kw) -> tuple[RecordingTrainer, TrainingQueue]:
    trainer = RecordingTrainer()
    queue = TrainingQueue(trainer, h.store, sync_run, h.clock, timeout=30, **kw)
    h.factory.training = queue
    return trainer, queue


def crlf(message: bytes) -> bytes:
    return message.replace(b"\n", b"\r\n")


def session(h: Harness, folder: str = "INBOX"):
    c = h.connect()
    c.login()
    c.select(folder)
    return c


def test_the_rule():
    assert learn_class("INBOX", "Junk") == SPAM
    assert learn_class("Archive/2024", "Junk") == SPAM
    assert learn_class("Junk", "INBOX") == HAM
    assert learn_class("Junk", "Archive") == HAM
    assert learn_class("Junk", "Trash") is None  # deleting a spam is no sign it was ham
    assert learn_class("Junk", "Junk") is None
    assert learn_class("INBOX", "Archive") is None
    assert learn_class("INBOX", "Trash") is None
    assert learn_class("INBOX", "junk") is None  # IMAP names are case-sensitive but INBOX


def test_copy_into_junk_is_learnt_as_spam(h):
    trainer, _ = training(h)
    h.deliver(HAMMY)
    h.deliver(SPAMMY)
    c = session(h)
    out = c.cmd(b"c COPY 2 Junk")
    assert b"c OK [COPYUID" in out, out
    assert trainer.learnt == [(crlf(SPAMMY), SPAM, USER)]


@pytest.mark.parametrize("command", [b"MOVE 2", b"UID MOVE 2", b"UID COPY 2"])
def test_move_and_uid_variants_into_junk_are_learnt_as_spam(h, command):
    trainer, _ = training(h)
    h.deliver(HAMMY)
    h.deliver(SPAMMY)
    c = session(h)
    out = c.cmd(b"m " + command + b" Junk")
    assert b"m OK" in out, out
    assert trainer.learnt == [(crlf(SPAMMY), SPAM, USER)]


def test_out_of_junk_is_ham_but_not_into_trash(h):
    trainer, _ = training(h)
    c = session(h)  # the login makes the special folders, Junk among them
    h.deliver(HAMMY, folder="Junk")
    h.deliver(SPAMMY, folder="Junk")
    h.deliver(HAMMY, folder="Junk")
    c.select("Junk")
    assert b"m OK" in c.cmd(b"m MOVE 1 INBOX")
    assert trainer.learnt == [(crlf(HAMMY), HAM, USER)]
    assert b"t OK" in c.cmd(b"t MOVE 1 Trash")  # the spam: deleted, not learnt
    assert b"a OK" in c.cmd(b"a COPY 1 Archive")
    assert [m[1] for m in trainer.learnt] == [HAM, HAM]


def test_nothing_else_is_learnt(h):
    trainer, _ = training(h)
    h.deliver(SPAMMY)
    c = session(h)
    assert b"a OK" in c.cmd(b"a COPY 1 Archive")
    assert b"t OK" in c.cmd(b"t MOVE 1 Trash")
    # APPEND into Junk: Dovecot's setup learns from COPY only (MOVE is a COPY)
    out = c.send(b"p APPEND Junk {%d}\r\n" % len(SPAMMY))
    out += c.send(SPAMMY + b"\r\n")
    assert b"p OK" in out, out
    assert trainer.learnt == []


def test_learning_never_delays_or_fails_the_command(h):
    trainer, queue = training(h)
    pending: list[defer.Deferred] = []
    trainer.answer = lambda: pending.append(defer.Deferred()) or pending[-1]
    h.deliver(SPAMMY)
    c = session(h)
    out = c.cmd(b"m MOVE 1 Junk")
    assert out.endswith(b"m OK MOVE completed\r\n"), out  # answered, the learning hangs
    assert len(pending) == 1
    with capturedLogs() as events:
        h.clock.advance(30)  # the timeout: the learning is cancelled and logged
    lines = [formatEvent(e) for e in events]
    assert any(
        "learn spam alice@example.test Junk uid 1: failed (no answer within 30s)" in x
        for x in lines
    ), lines
    assert queue.idle().called
    trainer.answer = lambda: defer.fail(FilterError("spamd error: 69 EX_UNAVAILABLE"))
    c.select("Junk")
    with capturedLogs() as events:
        out = c.cmd(b"m MOVE 1 INBOX")
    assert out.endswith(b"m OK MOVE completed\r\n"), out
    assert any(
        "learn ham" in formatEvent(e) and "69 EX_UNAVAILABLE" in formatEvent(e) for e in events
    )


def test_each_outcome_is_logged(h):
    training(h)
    h.deliver(SPAMMY)
    c = session(h)
    with capturedLogs() as events:
        c.cmd(b"m MOVE 1 Junk")
    assert [formatEvent(e) for e in events if "learn" in formatEvent(e)] == [
        "learn spam alice@example.test Junk uid 1: learnt"
    ]


def test_at_most_n_at_once_and_a_queue_cap(h):
    trainer, queue = training(h, concurrency=2, max_queued=3)
    pending: list[defer.Deferred] = []
    trainer.answer = lambda: pending.append(defer.Deferred()) or pending[-1]
    for _ in range(7):
        h.deliver(SPAMMY)
    c = session(h)
    with capturedLogs() as events:
        out = c.cmd(b"m MOVE 1:7 Junk")
    assert out.endswith(b"m OK MOVE completed\r\n"), out
    assert len(pending) == 2  # two at once; three wait; two dropped, logged
    lines = [formatEvent(e) for e in events if "queue full" in formatEvent(e)]
    assert lines == [
        "learning queue full: 2 of 7 messages filed into Junk by alice@example.test "
        "not learnt as spam"
    ]
    idle = queue.idle()
    for _ in range(5):
        pending[0].callback("learnt")
        pending.pop(0)
        h.settle()
    assert len(trainer.learnt) == 5 and not pending
    assert idle.called


def test_no_training_without_the_setting(h):
    h.deliver(SPAMMY)
    c = session(h)
    assert b"m OK" in c.cmd(b"m MOVE 1 Junk")  # no queue: nothing to call, nothing fails


def test_trainers_provide_the_interface():
    from twisted.internet import reactor

    for trainer in (
        RspamdTrainer(reactor, "http://127.0.0.1:11334", "q1"),
        SpamdTrainer(reactor, "127.0.0.1", 783),
        CommandTrainer(reactor, ("/bin/true",)),
        RecordingTrainer(),
    ):
        assert verifyObject(IMessageTrainer, trainer)


def test_the_tell_request_and_answers():
    assert tell_request(b"Subject: x\r\n\r\nhi\r\n", SPAM, USER) == (
        b"TELL SPAMC/1.5\r\nMessage-class: spam\r\nSet: local\r\nContent-length: 18\r\n"
        b"User: alice@example.test\r\n\r\nSubject: x\r\n\r\nhi\r\n"
    )
    assert parse_tell_response(b"SPAMD/1.1 0 EX_OK\r\nDidSet: local\r\n\r\n") == "learnt"
    assert parse_tell_response(b"SPAMD/1.1 0 EX_OK\r\n\r\n") == "already learnt"
    with pytest.raises(FilterError, match="69"):
        parse_tell_response(b"SPAMD/1.0 69 EX_UNAVAILABLE TELL commands are not enabled\r\n")
    with pytest.raises(FilterError):
        parse_tell_response(b"HTTP/1.0 400 Bad\r\n\r\n")


def test_config_keys():
    c = configmod.parse(
        '[filter]\nrspamd = "http://127.0.0.1:11333"\nlearn = true\nrspamd_password = "q1"\n',
        "<t>",
    ).filter
    assert (c.learn, c.rspamd_controller, c.rspamd_password) == (
        True,
        "http://127.0.0.1:11334",
        "q1",
    )
    assert isinstance(build_trainer(c, None), RspamdTrainer)
    c = configmod.parse(
        '[filter]\nspamd = "127.0.0.1:7830"\nlearn = true\n'
        'learn_command = ["/usr/bin/sa-learn", "--{class}"]\n',
        "<t>",
    ).filter
    assert isinstance(build_trainer(c, None), CommandTrainer)
    c = configmod.parse('[filter]\nspamd = "127.0.0.1:7830"\n', "<t>").filter
    assert c.learn is False and build_trainer(c, None) is None  # off by default
    c = configmod.parse('[filter]\nspamd = "127.0.0.1:7830"\nlearn = true\n', "<t>").filter
    assert isinstance(build_trainer(c, None), SpamdTrainer)
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse('[filter]\nlearn = "yes"\nlearn_command = ["rel"]\n', "<t>")
    assert "filter.learn:" in str(e.value) and "filter.learn_command:" in str(e.value)
