"""The POP3 server on StringTransport: every command, its errors, and its policies."""

from __future__ import annotations

import pytest
from twisted.logger import LogLevel, globalLogPublisher
from twisted.mail.interfaces import IMailboxPOP3
from zope.interface.verify import verifyObject

from mailsrv.pop3 import Maildrop, dot_stuff, terminator, top_of, uidl

from .test_pop3_support import (
    ALICE,
    PASSWORD,
    REMOTE,
    Session,
    deliver,
    make_ctx,
    plain,
)

MSG1 = b"Subject: one\n\nline 1\n.dot line\n..two dots\nend\n"
MSG2 = b"Subject: two\nX-A: b\n\nbody\nsecond\nthird\n"


@pytest.fixture
def ctx(tmp_path):
    c = make_ctx(tmp_path)
    deliver(c, MSG1)
    deliver(c, MSG2)
    return c


def crlf(b: bytes) -> bytes:
    return b.replace(b"\n", b"\r\n")


def lines(reply: bytes) -> list[bytes]:
    return reply.split(b"\r\n")[:-1]


def test_greeting_and_capa(ctx):
    s = Session(ctx)
    assert s.take() == b"+OK mailsrv ready.\r\n"
    caps = lines(s.cmd("CAPA"))
    assert caps[0] == b"+OK" and caps[-1] == b"."
    assert set(caps[1:-1]) == {
        b"TOP",
        b"UIDL",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"USER",
        b"SASL PLAIN LOGIN",
        b"STLS",
        b"IMPLEMENTATION mailsrv",
    }
    assert s.login().startswith(b"+OK")
    caps = lines(s.cmd("capa"))
    assert b"STLS" not in caps and b"USER" not in caps and b"PIPELINING" in caps


def test_user_pass_stat_list_uidl(ctx):
    s = Session(ctx)
    s.take()
    assert s.cmd(f"USER {ALICE}") == b"+OK\r\n"
    assert s.cmd(f"PASS {PASSWORD}") == b"+OK Logged in.\r\n"  # a password with a space
    size1, size2 = len(crlf(MSG1)), len(crlf(MSG2))
    assert s.cmd("STAT") == b"+OK 2 %d\r\n" % (size1 + size2)
    assert s.cmd("LIST") == b"+OK 2 messages:\r\n1 %d\r\n2 %d\r\n.\r\n" % (size1, size2)
    assert s.cmd("LIST 2") == b"+OK 2 %d\r\n" % size2
    assert s.cmd("LIST 3") == b"-ERR There's no message 3.\r\n"
    assert s.cmd("LIST 0") == b"-ERR There's no message 0.\r\n"
    assert s.cmd("LIST x").startswith(b"-ERR Invalid message number")
    v = s.proto.mbox.uid_validity
    assert s.cmd("UIDL") == b"+OK\r\n1 00000001%08X\r\n2 00000002%08X\r\n.\r\n" % (v, v)
    assert s.cmd("UIDL 2") == b"+OK 2 00000002%08X\r\n" % v
    assert s.cmd("NOOP") == b"+OK\r\n"


def test_uidl_written_as_the_client_reads(ctx, monkeypatch):
    """A long listing goes out a piece at a time; a pipelined command waits for its end."""
    import mailsrv.pop3.transaction

    monkeypatch.setattr(mailsrv.pop3.transaction, "LISTING_PIECE", 2)
    for n in range(3):
        deliver(ctx, b"Subject: %d\n\nx\n" % n)
    s = Session(ctx)
    s.take()
    s.login()
    v = s.proto.mbox.uid_validity
    t = s.transport
    write = t.write

    def write_then_full(data):
        write(data)
        if t.producer is not None:
            t.producer.pauseProducing()  # as a transport whose buffer is full does

    t.write = write_then_full
    assert s.send(b"UIDL\r\nNOOP\r\n") == b"+OK\r\n1 00000001%08X\r\n" % v
    t.write = write
    t.producer.resumeProducing()
    rest = b"".join(b"%d %08X%08X\r\n" % (n, n, v) for n in range(2, 6))
    assert s.take() == rest + b".\r\n+OK\r\n"
    assert t.producer is None
    assert s.cmd("STAT").startswith(b"+OK 5 ")


def test_retr_byte_stuffed_with_exact_size(ctx):
    s = Session(ctx)
    s.take()
    s.login()
    reply = s.cmd("RETR 1")
    body = crlf(MSG1)
    assert (
        reply == (b"+OK %d octets\r\n" % len(body)) + body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    )
    assert b"\r\n..dot line\r\n...two dots\r\n" in reply
    # The whole reply went out in one write, not status + chunks + terminator.
    s.proto.transport.io.seek(0)
    writes = []
    s.transport.write = writes.append
    s.cmd("RETR 2")
    assert len(writes) == 1


def test_retr_reads_off_the_reactor_and_reads_ahead(ctx):
    for i in range(3, 101):
        deliver(ctx, b"Subject: %d\n\nbody\n" % i)
    s = Session(ctx)
    s.take()
    s.login()
    pool = ctx.threadpool
    pool.hold = []
    s.proto.dataReceived(b"RETR 1\r\nSTAT\r\n")
    assert s.take() == b""  # nothing until the read is done; STAT waits its turn
    pool.run_held()  # RETR 1's read
    out = s.take()
    assert out.startswith(b"+OK %d octets\r\n" % len(crlf(MSG1)))
    assert out.endswith(b".\r\n+OK 100 %d\r\n" % sum(m.size for _, m in s.proto.mbox.live()))
    assert s.proto._batch == {1, 2}  # the next two, read ahead in one trip
    assert len(pool.hold) == 1
    s.proto.dataReceived(b"RETR 2\r\n")
    assert s.take() == b""  # waits for that trip
    pool.run_held()
    assert s.take().startswith(b"+OK %d octets\r\nSubject: two" % len(crlf(MSG2)))
    waited = 0
    for i in range(3, 91):
        if i == 51:
            calls = pool.calls
        s.proto.dataReceived(b"RETR %d\r\n" % i)
        out = s.take()
        if not out:  # its batch was still in the pool
            waited += 1
            pool.run_held()
            out = s.take()
        assert out.startswith(b"+OK"), i
        pool.run_held()  # the pool finishes what was read ahead before the next RETR
    assert waited == 0
    assert pool.calls - calls <= 40 // 8  # once under way: one trip to the pool per 8 RETRs
    assert len(s.proto._cache) + len(s.proto._opened) + len(s.proto._batch) <= 32
    s.proto.dataReceived(b"RETR 100\r\n")  # far ahead: read on its own
    pool.run_held()
    assert s.take().startswith(b"+OK")
    pool.hold = None


def test_top(ctx):
    s = Session(ctx)
    s.take()
    s.login()
    assert s.cmd("TOP 2 0") == b"+OK\r\nSubject: two\r\nX-A: b\r\n\r\n.\r\n"
    assert s.cmd("TOP 2 2") == b"+OK\r\nSubject: two\r\nX-A: b\r\n\r\nbody\r\nsecond\r\n.\r\n"
    assert s.cmd("TOP 2 99") == b"+OK\r\n" + crlf(MSG2) + b".\r\n"
    assert s.cmd("TOP 1 2") == b"+OK\r\nSubject: one\r\n\r\nline 1\r\n..dot line\r\n.\r\n"
    assert s.cmd("TOP 2 -1").startswith(b"-ERR Invalid number of lines")
    assert s.cmd("TOP 2").startswith(b"-ERR Invalid number of lines")
    assert s.cmd("TOP 9 1") == b"-ERR There's no message 9.\r\n"


def test_dele_rset_quit_expunges_by_uid(ctx):
    s = Session(ctx)
    s.take()
    s.login()
    assert s.cmd("DELE 1") == b"+OK Marked to be deleted.\r\n"
    assert s.cmd("DELE 1") == b"-ERR Message is deleted.\r\n"
    assert s.cmd("RETR 1") == b"-ERR Message is deleted.\r\n"
    assert s.cmd("LIST") == b"+OK 1 messages:\r\n2 %d\r\n.\r\n" % len(crlf(MSG2))
    assert s.cmd("STAT") == b"+OK 1 %d\r\n" % len(crlf(MSG2))
    assert s.cmd("RSET") == b"+OK\r\n"
    assert s.cmd("STAT").startswith(b"+OK 2 ")
    assert s.cmd("DELE 2") == b"+OK Marked to be deleted.\r\n"
    # Mail that arrives during the session is not shown and not lost by QUIT.
    deliver(ctx, b"Subject: late\n\nlate\n")
    assert s.cmd("STAT").startswith(b"+OK 1 ")
    assert s.cmd("QUIT") == b"+OK Logging out, messages deleted.\r\n"
    assert s.transport.disconnecting
    s.close()
    s2 = Session(ctx)
    s2.take()
    s2.login()
    assert s2.cmd("STAT").startswith(b"+OK 2 ")
    assert b"Subject: one" in s2.cmd("RETR 1")
    assert b"Subject: late" in s2.cmd("RETR 2")
    assert s2.proto.mbox.getUidl(1).startswith(b"00000003")


def test_quit_removes_nothing_when_uidvalidity_changed_since_login(ctx):
    import dataclasses

    s = Session(ctx)
    s.take()
    s.login()
    assert s.cmd("DELE 1") == b"+OK Marked to be deleted.\r\n"
    # Meanwhile the first message goes and the index is rebuilt: MSG2 becomes UID 1.
    state = s.proto.mbox.folder._state
    state.messages = [
        dataclasses.replace(m, info=dataclasses.replace(m.info, uid=n))
        for n, m in enumerate(state.messages[1:], 1)
    ]
    state.uid_validity += 1
    state.uid_next = len(state.messages) + 1
    assert s.cmd("QUIT").startswith(b"-ERR")
    s.close()
    s2 = Session(ctx)
    s2.take()
    s2.login()
    assert b"Subject: two" in s2.cmd("RETR 1")


def test_disconnect_without_quit_deletes_nothing_and_frees_the_maildrop(ctx):
    s = Session(ctx)
    s.take()
    s.login()
    s.cmd("DELE 1")
    s.close()
    s2 = Session(ctx)
    s2.take()
    assert s2.login() == b"+OK Logged in.\r\n"
    assert s2.cmd("STAT").startswith(b"+OK 2 ")


def test_in_use(ctx):
    s1 = Session(ctx)
    s1.take()
    s1.login()
    s2 = Session(ctx, factory=None)
    s2.take()
    assert s2.login() == b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    # pop3s shares the locks
    s3 = Session(ctx, implicit_tls=True)
    s3.take()
    assert s3.login().startswith(b"-ERR [IN-USE]")
    assert s1.cmd("QUIT").startswith(b"+OK")
    s1.close()
    assert s2.login() == b"+OK Logged in.\r\n"


def test_wrong_user_and_wrong_password_same_answer_after_delay(ctx):
    answers = []
    for user, pw in ((ALICE, "wrong"), ("ghost@example.test", PASSWORD), ("not-an-address", "x")):
        s = Session(ctx)
        s.take()
        s.cmd(f"USER {user}")
        assert s.cmd(f"PASS {pw}") == b""
        assert s.cmd("NOOP") == b""  # pipelined commands wait for the login
        ctx.reactor.advance(1.99)
        assert s.take() == b""
        ctx.reactor.advance(0.01)
        answers.append(s.take())
        s.close()
    assert answers == [b"-ERR [AUTH] Authentication failed\r\n+OK\r\n"] * 3


def test_throttle_after_repeated_failures(ctx):
    s = Session(ctx)
    s.take()
    for _ in range(3):  # max_failures = 3
        s.cmd(f"USER {ALICE}")
        s.cmd("PASS nope")
        ctx.reactor.advance(2)
        assert s.take() == b"-ERR [AUTH] Authentication failed\r\n"
    calls = ctx.threadpool.calls
    s.cmd(f"USER {ALICE}")
    # Answered at once, without the failure delay (as SMTP and IMAP do).
    assert s.cmd(f"PASS {PASSWORD}").startswith(b"-ERR [AUTH] Too many failed logins")
    assert ctx.threadpool.calls == calls  # the password was not even checked
    ctx.reactor.advance(ctx.config.auth.failure_window)
    s2 = Session(ctx)
    s2.take()
    assert s2.login() == b"+OK Logged in.\r\n"


def test_auth_plain(ctx):
    s = Session(ctx)
    s.take()
    assert s.cmd("AUTH") == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    assert s.cmd("AUTH CRAM-MD5") == b"-ERR Unsupported authentication mechanism.\r\n"
    assert s.cmd("AUTH PLAIN") == b"+ \r\n"
    assert s.cmd("*") == b"-ERR Authentication aborted by client.\r\n"
    assert s.cmd("AUTH PLAIN") == b"+ \r\n"
    assert s.cmd("!!notbase64") == b"-ERR Invalid base64 data in continued response.\r\n"
    # No logins as someone else: refused like a wrong password, after the delay.
    assert s.cmd("AUTH PLAIN " + plain("bob@example.test", ALICE, PASSWORD)) == b""
    ctx.reactor.advance(2)
    assert s.take() == b"-ERR [AUTH] Authentication failed\r\n"
    assert s.cmd("AUTH PLAIN") == b"+ \r\n"
    assert s.cmd(plain("", ALICE, PASSWORD)) == b"+OK Logged in.\r\n"
    s.close()
    s = Session(ctx)
    s.take()
    assert s.cmd("AUTH PLAIN " + plain(ALICE, ALICE, PASSWORD)) == b"+OK Logged in.\r\n"
    assert s.cmd("AUTH PLAIN " + plain(ALICE, ALICE, PASSWORD)) == b"-ERR Unknown command.\r\n"
    s.close()
    s = Session(ctx)
    s.take()
    s.cmd("AUTH PLAIN " + plain("", ALICE, "bad"))
    ctx.reactor.advance(2)
    assert s.take() == b"-ERR [AUTH] Authentication failed\r\n"


def test_cleartext_refused_from_remote_without_tls(ctx):
    s = Session(ctx, peer=REMOTE)
    s.take()
    caps = lines(s.cmd("CAPA"))
    assert b"USER" not in caps and b"SASL PLAIN LOGIN" not in caps and b"STLS" in caps
    refusal = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections\r\n"
    assert s.cmd(f"USER {ALICE}") == refusal
    assert s.cmd(f"PASS {PASSWORD}") == refusal
    assert s.cmd("AUTH PLAIN " + plain("", ALICE, PASSWORD)) == refusal
    assert s.cmd("AUTH") == b"+OK\r\n.\r\n"
    # After STLS the same client may log in.
    assert s.cmd("STLS") == b"+OK Begin TLS negotiation now.\r\n"
    assert s.transport.tls_started_with is ctx.tls
    caps = lines(s.cmd("CAPA"))
    assert b"USER" in caps and b"STLS" not in caps
    assert s.login() == b"+OK Logged in.\r\n"


def test_cleartext_never_and_always(tmp_path):
    ctx = make_ctx(tmp_path, cleartext="never")
    s = Session(ctx)  # loopback, but "never" means TLS only
    s.take()
    assert s.cmd(f"USER {ALICE}").startswith(b"-ERR [AUTH] Plaintext")
    s = Session(ctx, implicit_tls=True)
    s.take()
    assert s.login() == b"+OK Logged in.\r\n"
    ctx2 = make_ctx(tmp_path / "x", cleartext="always")
    s = Session(ctx2, peer=REMOTE)
    s.take()
    assert s.login() == b"+OK Logged in.\r\n"


def test_stls_errors_and_injection(ctx):
    s = Session(ctx, implicit_tls=True)
    s.take()
    assert b"STLS" not in s.cmd("CAPA")
    assert s.cmd("STLS") == b"-ERR TLS is already active.\r\n"
    s = Session(ctx, peer=REMOTE)
    s.take()
    # RFC 2595: commands sent in clear text after STLS in the same packet are dropped.
    assert (
        s.send(b"STLS\r\nUSER evil@example.test\r\nNOOP\r\n")
        == b"+OK Begin TLS negotiation now.\r\n"
    )
    assert s.proto._userIs is None
    assert s.cmd("NOOP") == b"+OK\r\n"
    s = Session(ctx)
    s.take()
    s.login()
    assert s.cmd("STLS") == b"-ERR Unknown command.\r\n"


def test_transaction_commands_need_login(ctx):
    s = Session(ctx)
    s.take()
    for c in ("STAT", "LIST", "RETR 1", "TOP 1 0", "UIDL", "DELE 1", "RSET", "APOP a b", "LAST"):
        assert s.cmd(c) == b"-ERR Unknown command.\r\n", c
    s = Session(ctx)
    s.take()
    assert s.cmd("PASS x") == b"-ERR No username given.\r\n"
    assert s.cmd("QUIT") == b"+OK Logging out.\r\n"
    assert s.transport.disconnecting


def test_too_many_bad_commands_disconnects(ctx):
    s = Session(ctx)
    s.take()
    for _ in range(ctx.config.limits.max_errors - 1):
        assert s.cmd("BOGUS") == b"-ERR Unknown command.\r\n"
    assert s.cmd("\xff\x00") == b"-ERR Unknown command.\r\n-ERR Too many invalid commands.\r\n"
    assert s.transport.disconnecting


def test_long_lines_get_err_not_a_crash(ctx):
    s = Session(ctx)
    s.take()
    assert s.send(b"NOOP " + b"x" * 9000 + b"\r\nNOOP\r\n") == b"-ERR Line too long.\r\n+OK\r\n"
    # A line too long for the buffer, arriving in pieces: one -ERR, then back in step.
    assert s.send(b"x" * 5000) == b""
    assert s.send(b"x" * 5000) == b"-ERR Line too long.\r\n"
    assert s.send(b"x" * 5000) == b""
    assert s.send(b"x\r\nNOOP\r\n") == b"+OK\r\n"
    assert not s.transport.disconnecting


def test_bare_lf_accepted(ctx):
    s = Session(ctx)
    s.take()
    assert s.send(b"NOOP\n") == b"+OK\r\n"


def test_timeout(ctx):
    s = Session(ctx)
    s.take()
    ctx.reactor.advance(ctx.config.limits.timeout - 1)
    assert s.cmd("NOOP") == b"+OK\r\n"
    ctx.reactor.advance(ctx.config.limits.timeout - 1)
    assert not s.transport.disconnecting
    ctx.reactor.advance(1)
    assert s.take() == b"-ERR Disconnected for inactivity.\r\n"
    assert s.transport.disconnecting


def test_connection_lost_during_login_frees_the_maildrop(ctx):
    s = Session(ctx)
    s.take()
    ctx.threadpool.hold = []
    s.cmd(f"USER {ALICE}")
    s.cmd(f"PASS {PASSWORD}")
    s.close()
    ctx.threadpool.hold, held = None, ctx.threadpool.hold
    for run in held:
        run()
    assert not ctx.pop3_locks.held(ALICE)


def test_message_removed_by_another_session(ctx):
    s = Session(ctx)
    s.take()
    s.login()
    ctx.store._folders[(ALICE, "INBOX")].messages.pop(0)
    assert s.cmd("RETR 1") == b"-ERR Message no longer exists.\r\n"
    assert s.cmd("RETR 2").startswith(b"+OK")


def test_large_message_streams_in_chunks(ctx):
    body = b"".join(b".line %06d\n" % i for i in range(60000))  # ~780 KB, every line a dot
    deliver(ctx, b"Subject: big\n\n" + body)
    s = Session(ctx)
    s.take()
    s.login()
    writes = []
    real = s.transport.write
    s.transport.write = lambda d: (writes.append(len(d)), real(d))
    reply = s.cmd("RETR 3")
    expected = crlf(b"Subject: big\n\n" + body)
    assert reply == b"+OK %d octets\r\n" % len(expected) + dot_stuff(expected) + b".\r\n"
    assert 5 < len(writes) < 30
    assert s.transport.producer is None  # unregistered when done
    assert s.cmd("NOOP") == b"+OK\r\n"


def test_login_is_logged_without_password(ctx):
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        s = Session(ctx)
        s.take()
        s.login()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    logins = [e for e in seen if e.get("log_format", "").startswith("pop3-login")]
    assert len(logins) == 1
    assert logins[0]["user"] == ALICE and logins[0]["client"] == "127.0.0.1"
    assert (logins[0]["result"], logins[0]["method"], logins[0]["tls"]) == ("Login", "PLAIN", False)
    assert logins[0]["log_level"] == LogLevel.info
    assert all(PASSWORD not in repr(e) for e in seen)


def test_maildrop_provides_twisted_interface(ctx):
    s = Session(ctx)
    s.take()
    s.login()
    mbox = s.proto.mbox
    verifyObject(IMailboxPOP3, mbox)
    assert isinstance(mbox, Maildrop)
    assert mbox.listMessages() == [len(crlf(MSG1)), len(crlf(MSG2))]
    mbox.deleteMessage(0)
    assert mbox.listMessages(0) == 0
    with pytest.raises(ValueError):
        mbox.getUidl(0)
    with pytest.raises(ValueError):
        mbox.listMessages(5)


def test_helpers():
    assert dot_stuff(b".a\r\n.b\r\nc.\r\n") == b"..a\r\n..b\r\nc.\r\n"
    assert dot_stuff(b".a", at_line_start=False) == b".a"
    assert terminator(b"x\r\n") == b".\r\n"
    assert terminator(b"x") == b"\r\n.\r\n"
    assert top_of(b"H: 1\r\n\r\na\r\nb\r\n", 1) == b"H: 1\r\n\r\na\r\n"
    assert top_of(b"H: 1\r\nno body", 3) == b"H: 1\r\nno body"
    from mailsrv.interfaces import MessageInfo

    assert uidl(MessageInfo(10, 1, frozenset(), 0), 0x5F00AB) == b"0000000A005F00AB"


def test_quit_flags_retrieved_messages_seen(ctx):
    s = Session(ctx)
    s.take()
    s.login()
    assert s.cmd("RETR 1").startswith(b"+OK")
    assert s.cmd("TOP 2 0").startswith(b"+OK")  # TOP is not reading the message
    # Meanwhile an IMAP session flags message 1; that change must survive.
    other = []
    ctx.store.open_folder(ALICE, "INBOX").addCallback(other.append)
    other[0].set_flags({1: {"\\Flagged"}})
    assert s.cmd("QUIT").startswith(b"+OK")
    flags = {m.info.uid: m.info.flags for m in ctx.store._folders[(ALICE, "INBOX")].messages}
    assert flags == {1: frozenset({"\\Seen", "\\Flagged"}), 2: frozenset()}


def test_no_flags_without_quit_and_none_for_deleted(ctx):
    s = Session(ctx)
    s.take()
    s.login()
    s.cmd("RETR 1")
    s.cmd("RETR 2")
    s.close()
    state = ctx.store._folders[(ALICE, "INBOX")]
    assert all(not m.info.flags for m in state.messages)
    s = Session(ctx)
    s.take()
    s.login()
    s.cmd("RETR 1")
    s.cmd("RETR 2")
    s.cmd("DELE 1")
    assert s.cmd("QUIT") == b"+OK Logging out, messages deleted.\r\n"
    assert [(m.info.uid, m.info.flags) for m in state.messages] == [(2, frozenset({"\\Seen"}))]


def test_pipelined_lines_wait_for_a_login_in_order(ctx):
    s = Session(ctx)
    s.take()
    data = (
        f"USER {ALICE}\r\nPASS wrong\r\nAUTH PLAIN\r\n{plain('', ALICE, PASSWORD)}\r\nSTAT\r\n"
    ).encode()
    assert s.send(data) == b"+OK\r\n"
    ctx.reactor.advance(2)
    assert s.take() == (
        b"-ERR [AUTH] Authentication failed\r\n+ \r\n+OK Logged in.\r\n"
        b"+OK 2 %d\r\n" % (len(crlf(MSG1)) + len(crlf(MSG2)))
    )


def test_stls_behind_a_login_drops_what_followed_it(ctx):
    s = Session(ctx)
    s.take()
    s.send(f"USER {ALICE}\r\nPASS wrong\r\nSTLS\r\nUSER evil@example.test\r\nNOOP\r\n".encode())
    ctx.reactor.advance(2)
    assert s.take() == b"-ERR [AUTH] Authentication failed\r\n+OK Begin TLS negotiation now.\r\n"
    assert s.proto._userIs is None
    assert s.cmd("NOOP") == b"+OK\r\n"


def test_a_flood_of_pipelined_commands_pauses_reading(ctx):
    s = Session(ctx)
    s.take()
    s.send(f"USER {ALICE}\r\nPASS wrong\r\n".encode() + b"NOOP\r\n" * 100)
    assert s.transport.producerState == "paused"
    ctx.reactor.advance(2)
    assert s.transport.producerState == "producing"
    assert s.take().count(b"+OK\r\n") == 100


class _FailingFile:
    """Gives one chunk of a big message, then a disk error."""

    def __init__(self, fail_at_first: bool = False):
        self.reads = 0
        self.fail_at_first = fail_at_first
        self.closed = False

    def read(self, n):
        self.reads += 1
        if self.fail_at_first or self.reads > 1:
            raise OSError("I/O error")
        return b"x" * (n - 2) + b"\r\n"

    def close(self):
        self.closed = True


@pytest.mark.parametrize("at_first", [True, False])
def test_disk_error_while_streaming(ctx, at_first):
    deliver(ctx, b"Subject: big\n\n" + b"y" * 300_000 + b"\n")
    s = Session(ctx)
    s.take()
    s.login()
    f = _FailingFile(at_first)
    s.proto.mbox.folder.open_message = lambda uid: f
    out = s.cmd("RETR 3")
    assert f.closed
    if at_first:  # nothing sent yet: an -ERR, and the session goes on
        assert (
            out
            == b"-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information.\r\n"
        )
        assert not s.transport.disconnecting
        assert s.cmd("NOOP") == b"+OK\r\n"
    else:  # half a message went out: only closing can tell the client
        assert out.startswith(b"+OK 3")
        assert not out.endswith(b".\r\n")
        assert s.transport.disconnecting
