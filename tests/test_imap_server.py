"""Protocol tests of the IMAP server on a StringTransport over the memory store."""

from __future__ import annotations

import base64
import re

import pytest
from twisted.mail import imap4
from zope.interface.verify import verifyObject

from mailsrv.imap.account import Account, SessionMailbox, subscriptions_path
from tests.test_imap_harness import USER, Harness

SIMPLE = (
    b"From: Ann Example <ann@example.test>\nTo: bob@example.test\nSubject: Hello there\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <m1@example.test>\n\nhello\nworld\n"
)
MULTI = (
    b"From: c@example.test\nSubject: parts\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="B1"\n\n'
    b"preamble\n--B1\nContent-Type: text/plain; charset=utf-8\n\nfirst part\n"
    b"--B1\nContent-Type: message/rfc822\n\nSubject: inner\nFrom: d@example.test\n\ninner body\n"
    b"--B1\nContent-Type: multipart/alternative; boundary=B2\n\n--B2\nContent-Type: text/html\n\n<p>x</p>\n"
    b"--B2--\n--B1--\n"
)


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def logged_in(h):
    c = h.connect()
    c.login()
    return c


def test_greeting_capabilities(h):
    c = h.connect()
    assert c.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1")
    for cap in (
        b"LITERAL+",
        b"UIDPLUS",
        b"MOVE",
        b"IDLE",
        b"SPECIAL-USE",
        b"ID",
        b"ENABLE",
        b"AUTH=PLAIN",
    ):
        assert cap in c.greeting


def test_logindisabled_on_clear_remote_connection(h):
    c = h.connect(host="192.0.2.7")
    assert b"LOGINDISABLED" in c.greeting and b"AUTH=PLAIN" not in c.greeting
    out = c.cmd(b"a LOGIN alice@example.test secret")
    assert out.startswith(b"a NO [PRIVACYREQUIRED]")
    out = c.cmd(b"b AUTHENTICATE PLAIN")
    assert out.startswith(b"b NO [PRIVACYREQUIRED]")


def test_login_failure_and_throttle(h):
    c = h.connect()
    for i in range(3):
        assert c.cmd(f"a{i} LOGIN alice@example.test wrong".encode()).startswith(
            f"a{i} NO [AUTHENTICATIONFAILED]".encode()
        )
    out = c.cmd(b'b LOGIN alice@example.test "secret"')
    assert out.startswith(b"b NO [UNAVAILABLE]")


def test_authenticate_plain_with_and_without_initial_response(h):
    token = base64.b64encode(b"\0alice@example.test\0secret")
    c = h.connect()
    assert c.cmd(b"a AUTHENTICATE PLAIN " + token).startswith(b"a OK")
    c2 = h.connect()
    assert c2.cmd(b"a AUTHENTICATE PLAIN") == b"+ \r\n"
    assert c2.cmd(token).startswith(b"a OK")
    c3 = h.connect()
    c3.cmd(b"a AUTHENTICATE PLAIN")
    assert c3.cmd(b"*").startswith(b"a BAD")


def test_special_folders_created_and_listed(h):
    c = logged_in(h)
    out = c.cmd(b'l LIST "" "*"')
    assert b'* LIST (\\HasNoChildren \\Sent) "/" Sent' in out
    assert b'* LIST (\\HasNoChildren \\Trash) "/" Trash' in out
    assert b'* LIST (\\HasNoChildren \\Junk) "/" Junk' in out
    assert b"\\Archive" in out and b"\\Drafts" in out
    assert b'* LIST (\\Noselect) "/" ""' in c.cmd(b'l LIST "" ""')
    # subscribed by default, persisted in a file
    out = c.cmd(b'l LSUB "" "*"')
    assert b'LSUB () "/" Sent' in out and b'LSUB () "/" INBOX' in out
    assert "Sent" in subscriptions_path(h.config.server.data_dir, USER).read_text()


def test_wrong_state_unknown_and_bad_syntax(h):
    c = h.connect()
    assert c.cmd(b"a SELECT INBOX") == b"a BAD Command not valid in this state\r\n"
    assert c.cmd(b"a FLURB") == b"a BAD Unknown command\r\n"
    c.login()
    assert c.cmd(b"a FETCH 1 FLAGS").startswith(b"a BAD")
    c.select()
    assert c.cmd(b"b FETCH 1 (FLAGS").startswith(b"b BAD")
    assert c.cmd(b"b SEARCH (FLAGGED").startswith(b"b BAD")
    assert c.cmd(b"b FETCH 5 FLAGS").startswith(b"b BAD")
    assert c.cmd(b'b LOGIN "x').startswith(b"b BAD")
    assert c.cmd(b"n NOOP") == b"n OK NOOP completed\r\n"


def test_too_many_bad_commands_disconnects(h):
    c = h.connect()
    out = b""
    for i in range(h.config.limits.max_errors):
        out += c.cmd(b"x%d BOGUS" % i)
    assert b"* BYE Too many invalid commands" in out
    assert c.transport.disconnecting


def test_huge_line_gets_bad_and_session_continues(h):
    c = logged_in(h)
    out = c.send(b"t1 LIST " + b"x" * 100_000 + b"\r\n")
    out += c.cmd(b"n NOOP")
    assert b"t1 BAD Command line too long" in out
    assert b"n OK NOOP" in out


def test_select_examine_and_status(h):
    h.deliver(SIMPLE)
    h.deliver(SIMPLE)
    c = logged_in(h)
    out = c.select()
    assert b"* 2 EXISTS" in out and b"[UIDNEXT 3]" in out and b"[READ-WRITE]" in out
    assert b"[UNSEEN 1]" in out
    assert b"[PERMANENTFLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen \\*)]" in out
    out = c.cmd(b"e EXAMINE INBOX")
    assert b"e OK [READ-ONLY]" in out and b"[PERMANENTFLAGS ()]" in out
    assert c.cmd(b"s STORE 1 +FLAGS (\\Seen)").startswith(b"s NO [READ-ONLY]")
    out = c.cmd(b"st STATUS INBOX (MESSAGES UNSEEN UIDNEXT UIDVALIDITY RECENT)")
    assert re.search(
        rb"\* STATUS INBOX \(MESSAGES 2 UNSEEN 2 UIDNEXT 3 UIDVALIDITY \d+ RECENT 0\)", out
    )
    assert c.cmd(b"st STATUS Nope (MESSAGES)").startswith(b"st NO [NONEXISTENT]")
    # RFC 7162 3.2.11: the mailbox selected before is closed, and the client told so
    assert c.cmd(b"x SELECT Nope").startswith(b"* OK [CLOSED] Previous mailbox closed.\r\nx NO")


def test_create_delete_rename_and_refused_names(h):
    c = logged_in(h)
    assert c.cmd(b"c CREATE Work/Projects/").startswith(b"c OK")
    out = c.cmd(b'l LIST "" "Work*"')
    assert b'\\HasChildren) "/" Work' in out and b'"/" Work/Projects' in out
    assert b'"/" Work\r\n' in c.cmd(b'l LIST "" "%"')
    assert c.cmd(b"r RENAME Work/Projects Work/Done").startswith(b"r OK")
    assert b"Work/Done" in c.cmd(b'l LIST "" "*"')
    for bad in (b'"../etc"', b'"a/../../b"', b'"/abs"', b'".hidden"', b'"x\\\\y"'):
        assert c.cmd(b"c CREATE " + bad).startswith(b"c NO"), bad
    assert c.cmd(b"c CREATE INBOX").startswith(b"c NO")
    assert c.cmd(b"d DELETE INBOX").startswith(b"d NO")
    assert c.cmd(b"d DELETE Work/Done").startswith(b"d OK")
    assert c.cmd(b"d DELETE Nope").startswith(b"d NO")


def test_subscribe_unsubscribe_persist(h):
    c = logged_in(h)
    c.cmd(b"c CREATE Lists")
    assert c.cmd(b"s SUBSCRIBE Lists").startswith(b"s OK")
    c2 = logged_in(h)
    assert b'"/" Lists' in c2.cmd(b'l LSUB "" "*"')
    assert c2.cmd(b"u UNSUBSCRIBE Lists").startswith(b"u OK")
    assert b"Lists" not in c2.cmd(b'l LSUB "" "*"')


def test_fetch_summary_and_size_matches_body(h):
    h.deliver(SIMPLE)
    c = logged_in(h)
    c.select()
    out = c.cmd(b"f FETCH 1 (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)")
    size = int(re.search(rb"RFC822.SIZE (\d+)", out).group(1))
    assert size == len(SIMPLE.replace(b"\n", b"\r\n"))
    assert (
        b'ENVELOPE ("Mon, 1 Jan 2024 10:00:00 +0000" "Hello there" (("Ann Example" NIL "ann" "example.test"))'
        in out
    )
    assert b'INTERNALDATE "14-Nov-2023 22:13:20 +0000"' in out
    out = c.cmd(b"g FETCH 1 BODY.PEEK[]")
    assert b"BODY[] {%d}\r\n" % size in out
    assert SIMPLE.replace(b"\n", b"\r\n") in out
    assert b"\\Seen" not in out


def test_fetch_body_sets_seen(h):
    h.deliver(SIMPLE)
    c = logged_in(h)
    c.select()
    out = c.cmd(b"f FETCH 1 BODY[TEXT]")
    # \Recent: the session is the first to see the message (RFC 3501 2.3.2)
    assert b"BODY[TEXT] {14}\r\nhello\r\nworld\r\n FLAGS (\\Seen \\Recent))" in out
    assert b"FLAGS (\\Seen \\Recent)" in c.cmd(b"f FETCH 1 FLAGS")


def test_fetch_sections_of_multipart(h):
    h.deliver(MULTI)
    c = logged_in(h)
    c.select()
    out = c.cmd(b"f FETCH 1 (BODYSTRUCTURE)")
    # RFC 2046 5.1.1: the line end before "--B1" is the delimiter's: no line feed left.
    assert b'("TEXT" "PLAIN" ("charset" "utf-8") NIL NIL "7BIT" 10 0' in out
    assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT"' in out
    assert b'"ALTERNATIVE"' in out and b'"MIXED"' in out
    out = c.cmd(
        b"f FETCH 1 (BODY.PEEK[1] BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] BODY.PEEK[3.1] BODY.PEEK[1.MIME])"
    )
    assert b"BODY[1] {10}\r\nfirst part" in out
    assert b"BODY[2.HEADER] {40}\r\nSubject: inner\r\nFrom: d@example.test\r\n\r\n" in out
    assert b"BODY[2.TEXT] {10}\r\ninner body" in out
    assert b"BODY[3.1] {8}\r\n<p>x</p>" in out
    assert b"BODY[1.MIME] {43}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" in out
    out = c.cmd(
        b"f FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (From MIME-Version Content-Type)] BODY.PEEK[]<0.4>)"
    )
    assert (
        b"BODY[HEADER.FIELDS.NOT (From MIME-Version Content-Type)] {18}\r\nSubject: parts\r\n\r\n"
        in out
    )
    assert b"BODY[]<0> {4}\r\nFrom" in out
    assert b"BODY[9] NIL" in c.cmd(b"f FETCH 1 BODY.PEEK[9]")


def test_fetch_broken_mime_never_crashes(h):
    broken = (
        b'Content-Type: multipart/mixed; boundary="Z"\n\n--Z\nContent-Type: text/plain\n\nno end'
    )
    h.deliver(broken)
    h.deliver(b"Content-Type: multipart/mixed\n\nno boundary\n")
    h.deliver(b"garbage without header end")
    c = logged_in(h)
    c.select()
    out = c.cmd(b"f FETCH 1:3 (BODYSTRUCTURE ENVELOPE RFC822.SIZE BODY.PEEK[1])")
    assert out.count(b"FETCH (") == 3 and out.endswith(b"f OK FETCH completed\r\n")


def test_store_flags_and_keywords(h):
    h.deliver(SIMPLE)
    c = logged_in(h)
    c.select()
    out = c.cmd(b"s STORE 1 +FLAGS (\\Flagged $Important)")
    # RFC 3501 7.2.6: the new keyword is announced before a FETCH shows it
    assert out.startswith(
        b"* FLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen $Important)\r\n"
        b"* OK [PERMANENTFLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen $Important \\*)]"
        b" Flags permitted\r\n* 1 FETCH (FLAGS ($Important \\Flagged \\Recent))\r\n"
    )
    out = c.cmd(b"s UID STORE 1 -FLAGS.SILENT (\\Flagged)")
    assert out == b"s OK STORE completed\r\n"
    assert b"FLAGS ($Important \\Recent)" in c.cmd(b"f FETCH 1 FLAGS")
    assert c.cmd(b"s STORE 1 +FLAGS (\\Bogus)").startswith(b"s BAD")
    assert c.cmd(b"s STORE 1 TWIDDLE (\\Seen)").startswith(b"s BAD")


def test_expunge_close_and_uid_expunge(h):
    for _ in range(4):
        h.deliver(SIMPLE)
    c = logged_in(h)
    c.select()
    c.cmd(b"s STORE 1:3 +FLAGS.SILENT (\\Deleted)")
    out = c.cmd(b"x UID EXPUNGE 2")
    assert out == b"* 2 EXPUNGE\r\nx OK EXPUNGE completed\r\n"
    out = c.cmd(b"x EXPUNGE")
    assert out == b"* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nx OK EXPUNGE completed\r\n"
    c.cmd(b"s STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert c.cmd(b"c CLOSE") == b"c OK CLOSE completed\r\n"
    assert b"MESSAGES 0" in c.cmd(b"st STATUS INBOX (MESSAGES)")


def test_expunge_and_close_honour_flags_cleared_by_another_session(h):
    for _ in range(3):
        h.deliver(SIMPLE)
    a = logged_in(h)
    a.select()
    b = logged_in(h)
    b.select()
    a.cmd(b"s STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    b.cmd(b"s UID STORE 1 -FLAGS.SILENT (\\Deleted)")
    out = a.cmd(b"x EXPUNGE")
    assert out == b"* 1 FETCH (FLAGS (\\Recent))\r\n* 2 EXPUNGE\r\nx OK EXPUNGE completed\r\n"
    a.cmd(b"s UID STORE 3 +FLAGS.SILENT (\\Deleted)")
    b.cmd(b"n NOOP")
    b.cmd(b"s UID STORE 3 -FLAGS.SILENT (\\Deleted)")
    assert a.cmd(b"c CLOSE") == b"c OK CLOSE completed\r\n"
    out = b.cmd(b"f UID FETCH 1:* (FLAGS)")
    assert b"UID 1 " in out and b"UID 3 " in out and b"UID 2 " not in out


def test_search_keys(h):
    h.deliver(SIMPLE)
    h.deliver(MULTI)
    h.deliver(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\nFrom: x@example.test\n\nbody\n")
    c = logged_in(h)
    c.select()
    c.cmd(b"s STORE 2 +FLAGS (\\Flagged)")
    cases = {
        b"ALL": b"1 2 3",
        b"FLAGGED": b"2",
        b"UNFLAGGED": b"1 3",
        b"SUBJECT hello": b"1",
        b'FROM "ann example"': b"1",
        b"BODY world": b"1",
        b"TEXT inner": b"2",
        b"HEADER Message-ID m1": b"1",
        b"OR FLAGGED SUBJECT hello": b"1 2",
        b"NOT FLAGGED": b"1 3",
        b"(LARGER 100 SMALLER 1000)": b"1 2",
        b"2:3 UNFLAGGED": b"3",
        b"UID 1,3": b"1 3",
        b"SENTSINCE 1-Jan-2024": b"1",
        b"SENTBEFORE 1-Jan-2024": b"",
        b"ON 14-Nov-2023": b"1 2 3",
        b"KEYWORD $x": b"",
        b"CHARSET UTF-8 SUBJECT gr\xc3\xbc\xc3\x9fe": b"3",
    }
    for query, want in cases.items():
        out = c.cmd(b"q SEARCH " + query)
        assert out.startswith(b"* SEARCH" + (b" " + want if want else b"") + b"\r\n"), (query, out)
    # a literal search string (non-ASCII), synchronizing and LITERAL+
    out = c.cmd(b"q SEARCH CHARSET UTF-8 SUBJECT {7}")
    assert out == b"+ Ready for literal data\r\n"
    assert c.send("grüße\r\n".encode()).startswith(b"* SEARCH 3\r\n")
    assert c.cmd("q UID SEARCH SUBJECT {7+}\r\ngrüße".encode()).startswith(b"* SEARCH 3\r\n")
    assert c.cmd(b"q SEARCH CHARSET KOI8-R SUBJECT x").startswith(b"q NO [BADCHARSET")
    assert c.cmd(b"q SEARCH FROBNICATE").startswith(b"q BAD")


def test_append_with_flags_date_and_appenduid(h):
    c = logged_in(h)
    msg = b"Subject: appended\r\n\r\nbody\r\n"
    out = c.cmd(b'a APPEND Drafts (\\Draft \\Seen) "05-Mar-2024 12:30:00 +0100" {%d}' % len(msg))
    assert out.startswith(b"+ ")
    out = c.send(msg + b"\r\n")
    m = re.match(rb"a OK \[APPENDUID (\d+) 1\] APPEND completed", out)
    assert m, out
    c.select("Drafts")
    out = c.cmd(b"f FETCH 1 (FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])")
    assert b"FLAGS (\\Draft \\Seen \\Recent)" in out
    assert b'INTERNALDATE "05-Mar-2024 11:30:00 +0000"' in out
    assert b"RFC822.SIZE %d" % len(msg) in out and msg in out
    assert c.cmd(b"a APPEND Nope {1+}\r\nx").startswith(b"a NO [TRYCREATE]")


def test_append_literal_plus_into_selected_sends_exists(h):
    c = logged_in(h)
    c.select()
    out = c.cmd(b"a APPEND INBOX {12+}\r\nSubject: x\r\n")
    assert b"* 1 EXISTS" in out and b"a OK [APPENDUID" in out


def test_huge_literal_refused_without_buffering(h):
    c = logged_in(h)
    out = c.cmd(b"a APPEND INBOX {200000}")
    assert out == b"a NO [TOOBIG] Message too big\r\n"
    # LITERAL+: the octets are read and dropped, the session goes on
    out = c.send(b"b APPEND INBOX {200000+}\r\n" + b"x" * 200000 + b"\r\nn NOOP\r\n")
    assert out == b"b NO [TOOBIG] Message too big\r\nn OK NOOP completed\r\n"
    assert c.cmd(b"l LOGIN {999999}").startswith(b"l BAD")


def test_copy_and_move_with_copyuid(h):
    h.deliver(SIMPLE)
    h.deliver(MULTI)
    c = logged_in(h)
    c.select()
    c.cmd(b"s STORE 2 +FLAGS.SILENT (\\Flagged)")
    out = c.cmd(b"c COPY 1:2 Archive")
    assert re.match(rb"c OK \[COPYUID \d+ 1:2 1:2\] COPY completed", out), out
    assert c.cmd(b"c COPY 1 Nope").startswith(b"c NO [TRYCREATE]")
    out = c.cmd(b"m UID MOVE 2 Trash")
    assert re.search(
        rb"\* OK \[COPYUID \d+ 2 1\] Moved\r\n\* 2 EXPUNGE\r\nm OK MOVE completed", out
    ), out
    c.select("Archive")
    out = c.cmd(b"f FETCH 2 (FLAGS RFC822.SIZE)")
    assert b"\\Flagged" in out
    assert b"RFC822.SIZE %d" % len(MULTI.replace(b"\n", b"\r\n")) in out


def test_other_session_changes_and_idle(h):
    h.deliver(SIMPLE)
    h.deliver(SIMPLE)
    a = logged_in(h)
    a.select()
    b = logged_in(h)
    b.select()
    assert a.cmd(b"i IDLE") == b"+ idling\r\n"
    h.deliver(SIMPLE)
    assert a.read() == b"* 3 EXISTS\r\n* 3 RECENT\r\n"  # a was the first to see 1 and 2
    b.cmd(b"s STORE 1 +FLAGS (\\Deleted)")
    assert a.read() == b"* 1 FETCH (FLAGS (\\Deleted \\Recent))\r\n"
    b.cmd(b"x EXPUNGE")
    assert a.read() == b"* 1 EXPUNGE\r\n* 2 EXISTS\r\n"
    assert a.cmd(b"DONE") == b"i OK IDLE terminated\r\n"
    # a session not idling hears of changes at NOOP
    h.deliver(SIMPLE)
    # (3 went to a, in its IDLE: b is the first to see only the new one)
    assert b.cmd(b"n NOOP") == b"* 3 EXISTS\r\n* 1 RECENT\r\nn OK NOOP completed\r\n"


def test_pipelined_commands_answered_in_order(h):
    h.deliver(SIMPLE)
    c = logged_in(h)
    out = c.send(b"s SELECT INBOX\r\nf FETCH 1 FLAGS\r\nn NOOP\r\n")
    assert out.index(b"s OK") < out.index(b"f OK") < out.index(b"n OK")


def test_namespace_id_enable_unselect(h):
    c = logged_in(h)
    assert b'* NAMESPACE (("" "/")) NIL NIL' in c.cmd(b"n NAMESPACE")
    assert b'* ID ("name" "mailsrv"' in c.cmd(b'i ID ("name" "test")')
    assert c.cmd(b"e ENABLE X-UNKNOWN") == b"* ENABLED\r\ne OK ENABLE completed\r\n"
    c.select()
    assert c.cmd(b"u UNSELECT") == b"u OK UNSELECT completed\r\n"
    assert c.cmd(b"f FETCH 1 FLAGS").startswith(b"f BAD")


def test_logout_calls_avatar_logout(h):
    c = logged_in(h)
    account = c.proto.account
    out = c.cmd(b"z LOGOUT")
    assert out == b"* BYE Nice talking to you\r\nz OK LOGOUT successful\r\n"
    c.proto.connectionLost(None)
    assert account.logged_out


def test_interfaces_verified(h):
    c = logged_in(h)
    c.select()
    account = c.proto.account
    assert isinstance(account, Account)
    verifyObject(imap4.IAccount, account)
    assert isinstance(c.proto.mbox, SessionMailbox)


class _SlowTransport:
    """Wraps a StringTransport: pauses the registered producer past a buffer limit."""


def test_big_fetch_streams_with_flow_control(h):
    big = b"Subject: big\n\n" + (b"y" * 99 + b"\n") * 20000  # 2 MB
    h.deliver(big)
    c = logged_in(h)
    c.select()
    t = c.transport
    writes = []
    original = t.write

    def write(data):
        writes.append(len(data))
        original(data)
        if t.producer is not None and len(t.value()) > 300_000:
            t.producer.pauseProducing()

    t.write = write
    out = c.cmd(b"f FETCH 1 BODY.PEEK[]")
    assert b"f OK" not in out and 300_000 <= len(out) < 700_000
    assert max(writes) <= 256 * 1024 + 100  # never one huge write
    # the session is not stuck: resuming delivers the rest
    while t.producer is not None:
        t.producer.resumeProducing()
        out += c.read()
    out += c.read()
    expected = big.replace(b"\n", b"\r\n")
    assert out.startswith(b"* 1 FETCH (BODY[] {%d}\r\n" % len(expected))
    assert expected in out and out.endswith(b")\r\nf OK FETCH completed\r\n")


def test_idle_times_out(h):
    c = logged_in(h)
    c.select()
    c.cmd(b"i IDLE")
    h.clock.advance(h.config.imap.idle_timeout + 1)
    assert b"* BYE" in c.read()
    assert c.transport.disconnecting


def test_unauthenticated_timeout(h):
    c = h.connect()
    h.clock.advance(h.config.limits.timeout + 1)
    assert b"* BYE" in c.read()


def test_utf7_names_and_rename_inbox(h):
    h.deliver(SIMPLE)
    c = logged_in(h)
    assert c.cmd(b"c CREATE &AMk-t&AOk-").startswith(b"c OK")  # "été"
    assert b'"/" &AMk-t&AOk-' in c.cmd(b'l LIST "" "*"')
    assert c.cmd(b"r RENAME INBOX Old").startswith(b"r OK")
    assert b"MESSAGES 1" in c.cmd(b"s STATUS Old (MESSAGES)")
    assert b"MESSAGES 0" in c.cmd(b"s STATUS INBOX (MESSAGES)")
    assert c.cmd(b"s STATUS INBOX (BOGUS)").startswith(b"s BAD")


def test_starttls_not_offered_without_tls_transport(h):
    c = h.connect()
    assert b"STARTTLS" not in c.greeting
    assert c.cmd(b"t STARTTLS").startswith(b"t BAD")


def test_search_body_of_big_message_streams(h, monkeypatch):
    import mailsrv.imap.commands.selected as server

    monkeypatch.setattr(server, "SEARCH_WHOLE_UP_TO", 1000)
    big = b"Subject: big\n\n" + b"abcdefghij\n" * 300_000 + b"Needle In Haystack\n"
    h.deliver(big)
    h.deliver(SIMPLE)
    c = logged_in(h)
    c.select()
    assert c.cmd(b"s SEARCH BODY haystack").startswith(b"* SEARCH 1\r\n")
    assert c.cmd(b"s SEARCH TEXT hello").startswith(b"* SEARCH 2\r\n")
    assert c.cmd(b"s SEARCH TEXT NEEDLE").startswith(b"* SEARCH 1\r\n")


def test_fetch_overlapping_and_uid_sets_each_message_once_in_order(h):
    for n in range(6):
        h.deliver(b"Subject: %d\n\nx\n" % n)
    c = logged_in(h)
    c.select()

    def seqs(out: bytes) -> list[int]:
        return [int(line.split()[1]) for line in out.split(b"\r\n") if line.startswith(b"* ")]

    assert seqs(c.cmd(b"f FETCH 5,1:2,2,6:4 FLAGS")) == [1, 2, 4, 5, 6]
    assert seqs(c.cmd(b"f FETCH 1:* FLAGS")) == [1, 2, 3, 4, 5, 6]
    assert seqs(c.cmd(b"f UID FETCH 2:3,7:*,1 FLAGS")) == [1, 2, 3, 6]
    assert seqs(c.cmd(b"f UID FETCH 100:* FLAGS")) == [6]  # RFC 3501 6.4.8: * is the last
    assert seqs(c.cmd(b"f UID FETCH 100:150,7:8 FLAGS")) == []
