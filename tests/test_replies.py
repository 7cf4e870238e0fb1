"""The one reply type: what the client sees, kept apart from the cause that is logged."""

from __future__ import annotations

import inspect
import re

from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial import unittest

from mailsrv import replies
from mailsrv.outbound import ipc
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.process import ServerSide
from mailsrv.replies import Reply, ReplyError, SMTPReplyError, cause_of
from mailsrv.store.memory import MemoryMailStore
from tests.test_outbound_support import temp_dir


def test_reply_line_and_kind():
    assert replies.NO_SUCH_USER.line() == b"5.1.1 No such user here"
    assert replies.LOCAL_ERROR.line("Other text") == b"4.3.0 Other text"
    assert str(replies.LOCAL_ERROR) == "451 4.3.0 Local error in processing, try again later"
    assert replies.NO_SUCH_USER.permanent and not replies.NO_SUCH_USER.temporary
    assert replies.LOCAL_ERROR.temporary and not replies.LOCAL_ERROR.permanent
    assert not replies.OK.permanent and not replies.OK.temporary


def test_reply_error_keeps_the_cause_from_the_client():
    e = ReplyError(replies.LOCAL_ERROR, cause="/var/mail/alice: EIO at offset 4096")
    assert (e.code, e.resp) == (451, "4.3.0 Local error in processing, try again later")
    assert "EIO" not in str(e) and "EIO" not in e.resp
    assert e.cause == "/var/mail/alice: EIO at offset 4096"
    assert cause_of(e) == e.cause
    assert e.reply is replies.LOCAL_ERROR
    assert SMTPReplyError is ReplyError


def test_reply_error_with_other_text_carries_that_reply():
    e = ReplyError(replies.LOCAL_ERROR, "Relaying is not available, try again later")
    assert e.reply == replies.RELAY_UNAVAILABLE
    assert e.resp == "4.3.0 Relaying is not available, try again later"
    assert cause_of(e) == str(e)
    assert cause_of(ValueError()) == "ValueError"


def test_delivery_error_is_a_reply():
    e = DeliveryError(True, "5.1.2", "Host or domain name not found: x.test", remote="mx.x.test")
    assert isinstance(e, ReplyError)
    assert e.reply == Reply(550, "5.1.2", "Host or domain name not found: x.test")
    assert (e.permanent, e.status, e.text, e.remote) == (True, "5.1.2", e.reply.text, "mx.x.test")
    assert str(e) == "Host or domain name not found: x.test"
    t = DeliveryError(False, "4.4.3", "No address for mx.y.test")
    assert t.reply.code == 450 and not t.permanent
    assert repr(t) == "DeliveryError(temporary, 4.4.3, 'No address for mx.y.test')"


def test_every_reply_constant_cites_its_rfcs():
    """The comment above each constant names RFC 5321 (or the RFC of its command) and RFC 3463."""
    lines = inspect.getsource(replies).splitlines()
    names = [n for n, v in vars(replies).items() if isinstance(v, Reply)]
    assert len(names) > 30
    for name in names:
        [at] = [i for i, line in enumerate(lines) if line.startswith(f"{name} = Reply(")]
        comment = []
        for line in reversed(lines[:at]):
            if not line.startswith("# ") or line.startswith("# ---"):
                break
            comment.insert(0, line)
        text = " ".join(comment)
        assert re.search(r"RFC (5321|4954|3207) \d", text), name
        if getattr(replies, name).enhanced:
            assert re.search(r"RFC (3463|4954) \d", text), name


class _Client(amp.AMP):
    pass


class LocalDeliveryFailedTests(unittest.TestCase):
    """A local delivery that fails reaches the relay process as a 451 with its cause."""

    def test_crosses_the_pipe_with_its_cause(self):
        tmp = temp_dir(self)
        (tmp / "queue" / "tmp").mkdir(parents=True)

        class Broken(MemoryMailStore):
            def deliver(self, user, source, sender, folder="INBOX"):
                raise OSError(28, "No space left on device")

        server = ServerSide(Broken(), tmp / "queue")
        client, _, pump = iosim.connectedServerAndClient(lambda: server, _Client, greet=False)
        d = client.callRemote(
            ipc.DeliverLocal, recipient="bob@example.test", sender="", size=2, data=b"x\n"
        )
        failures = []
        d.addErrback(failures.append)
        pump.flush()
        [f] = failures
        f.trap(ipc.LocalDeliveryFailed)
        assert isinstance(f.value, ReplyError)
        assert f.value.reply == replies.LOCAL_ERROR
        assert "No space left on device" in f.value.cause
        assert str(f.value) == f.value.cause
