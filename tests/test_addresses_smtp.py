"""
The address rules over SMTP (L{mailsrv.smtp.delivery} and the routing step):
what RCPT accepts and refuses on the MX and on submission, where each copy
goes after DATA (one per user, one queue file per kind of relayed copy, SRS
senders, List-Id, sub-address folders), send-as, and the relayer's way back
for a bounce to an SRS address.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from mailsrv import routing
from mailsrv.addresses.aliases import AliasTable
from mailsrv.addresses.resolver import AddressRules, AddressSettings
from mailsrv.addresses.srs import SRSRewriter
from mailsrv.config import parse
from mailsrv.interfaces import PasswordDatabaseError
from mailsrv.localdelivery import LocalDelivery
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.routing import Mailbox, Relay
from mailsrv.smtp.delivery import IncomingMessage
from mailsrv.spool import BytesSource
from mailsrv.store.mbox import MboxMailStore
from mailsrv.store.memory import MemoryMailStore
from tests.store_contract import SyncReactor, SyncThreadPool

from .test_smtp_helpers import (
    PASSWORD,
    FakeQueue,
    Passwords,
    Session,
    _result,
    make_context,
    read_inbox,
)

ALICE, BOB = "alice@example.test", "bob@example.test"
SRS_DOMAIN = "mx.example.test"
DOMAINS = frozenset({"example.test", "other.test"})
ALIASES = """\
sales: alice
me: alice
both: alice, bob
team: alice, bob, carol@remote.test
outside: dave@remote.test, Erin@far.test
staff: alice, bob, carol@remote.test
quiet: bob, carol@remote.test
loop1: loop2
loop2: loop1
"john doe": bob
"""
LISTS = {"staff@example.test": "Staff <staff.example.test>", "quiet@example.test": ""}


def rules_for(tmp_path: Path, reactor: Any, aliases: str = ALIASES) -> AddressRules:
    path = tmp_path / "aliases"
    path.write_text(aliases)
    table = AliasTable(path, DOMAINS)
    assert table.problems == []
    settings = AddressSettings(
        domains=DOMAINS,
        postmaster=BOB,
        srs_domain=SRS_DOMAIN,
        lists=LISTS,
    )
    srs = SRSRewriter(b"s" * 32, SRS_DOMAIN, now=reactor.seconds)
    return AddressRules(settings, aliases=table, srs=srs)


class Server:
    """A server context with the address rules, a real queue and the in-memory store."""

    def __init__(self, tmp_path: Path, queue: bool = True, aliases: str = ALIASES) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_780_100_000.0)
        base = make_context(tmp_path / "data", reactor=self.reactor, queue=None)
        self.queue = OutboundQueue(base.config.queue_dir, self.reactor, None) if queue else None
        self.rules = rules_for(tmp_path, self.reactor, aliases)
        self.ctx = dataclasses.replace(base, queue=self.queue, addresses=self.rules)

    def mx(self) -> Session:
        s = Session(self.ctx)
        assert s.cmd("EHLO client.example")[-1].startswith("250 ")
        return s

    def submission(self, user: str = ALICE) -> Session:
        s = Session(self.ctx, submission=True, peer="127.0.0.1")
        s.cmd("EHLO client.example")
        token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
        assert s.cmd(f"AUTH PLAIN {token}") == ["235 2.7.0 Authentication successful"]
        return s

    def inbox(self, user: str) -> list[bytes]:
        return read_inbox(self.ctx, user)

    def queued(self) -> list[tuple[Any, bytes]]:
        """Each queue file: its envelope and its message."""
        store = QueueStore(self.ctx.config.queue_dir)
        out = []
        for qid in store.ids():
            env = store.load_envelope(qid)
            out.append((env, store.read_message(env)))
        return out


def send(s: Session, sender: str, rcpts: list[str], message: str) -> list[str]:
    """One transaction; the replies to RCPT (each) and to the final dot."""
    assert s.cmd(f"MAIL FROM:<{sender}>")[0].startswith("250 ")
    replies = [s.cmd(f"RCPT TO:<{r}>")[0] for r in rcpts]
    if not any(r.startswith("250 ") for r in replies):
        return replies
    assert s.cmd("DATA") == ["354 End data with <CR><LF>.<CR><LF>"]
    return replies + s.send(message.replace("\n", "\r\n") + ".\r\n")


MESSAGE = "From: carol@origin.test\nSubject: hello\n\nbody\n"


@pytest.fixture
def events():
    out: list[dict] = []
    globalLogPublisher.addObserver(out.append)
    yield out
    globalLogPublisher.removeObserver(out.append)


def logged(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events]


# --- RCPT on the MX --------------------------------------------------------------------


def test_rcpt_takes_aliases_and_refuses_unknown_addresses_without_backscatter(tmp_path):
    srv = Server(tmp_path)
    s = srv.mx()
    assert s.cmd("MAIL FROM:<carol@origin.test>") == ["250 2.1.0 Sender OK"]
    assert s.cmd("RCPT TO:<sales@example.test>") == ["250 2.1.5 Recipient OK"]
    assert s.cmd("RCPT TO:<Me@Example.test>") == ["250 2.1.5 Recipient OK"]
    assert s.cmd('RCPT TO:<"john doe"@example.test>') == ["250 2.1.5 Recipient OK"]
    assert s.codes("RCPT TO:<nobody@example.test>\r\n") == ["550 5.1.1"]
    assert s.codes("RCPT TO:<nobody+x@example.test>\r\n") == ["550 5.1.1"]
    assert s.codes("RCPT TO:<someone@remote.test>\r\n") == ["554 5.7.1"]  # never a relay
    s.cmd("RSET")
    s.cmd("MAIL FROM:<carol@origin.test>")
    assert s.codes("RCPT TO:<nobody@example.test>\r\n") == ["550 5.1.1"]
    assert s.codes("DATA\r\n")[0].startswith("554")
    assert srv.queued() == [] and srv.inbox(ALICE) == []


def test_an_alias_loop_is_refused_at_rcpt_and_logged(tmp_path, events):
    srv = Server(tmp_path)
    s = srv.mx()
    s.cmd("MAIL FROM:<carol@origin.test>")
    assert s.cmd("RCPT TO:<loop1@example.test>") == ["550 5.4.6 Alias expansion loop or too deep"]
    assert any("loop1@example.test" in line and "loop" in line for line in logged(events))
    assert srv.queued() == []


def test_a_forged_srs_address_is_refused_at_rcpt(tmp_path):
    srv = Server(tmp_path)
    genuine = srv.rules.forward_sender("carol@origin.test")
    local, _, domain = genuine.partition("@")
    parts = local.split("=")
    parts[1] = "AAAA" if parts[1] != "AAAA" else "BBBB"
    forged = "=".join(parts) + "@" + domain
    s = srv.mx()
    s.cmd("MAIL FROM:<>")
    assert s.cmd(f"RCPT TO:<{forged}>") == ["550 5.1.1 Invalid or expired SRS address"]
    assert s.codes("DATA\r\n")[0].startswith("554")
    assert srv.queued() == []


def test_a_bounce_to_a_genuine_srs_address_goes_back_to_the_original_sender(tmp_path):
    srv = Server(tmp_path)
    srs = srv.rules.forward_sender("Carol@origin.test")
    srv.reactor.advance(5 * 86400)
    replies = send(srv.mx(), "", [srs], "Subject: Undelivered Mail\n\nbounce\n")
    assert replies[0] == "250 2.1.5 Recipient OK"
    assert replies[1].startswith("250 2.0.0 ")
    [(env, _)] = srv.queued()
    assert env.sender == "" and [r.address for r in env.recipients] == ["Carol@origin.test"]


def test_postmaster_and_abuse_take_mail_from_the_null_sender(tmp_path):
    srv = Server(tmp_path)
    s = srv.mx()
    replies = send(
        s,
        "",
        ["postmaster@other.test", "abuse@example.test", "Postmaster"],
        "Subject: a report\n\nbody\n",
    )
    assert replies[:3] == ["250 2.1.5 Recipient OK"] * 3
    assert replies[3].startswith("250 2.0.0 Ok: queued as ")
    # Every one of them reaches the configured administrator: one copy.
    [data] = srv.inbox(BOB)
    assert data.startswith(b"Return-Path: <>\n")
    assert srv.queued() == []


# --- DATA: where the copies go ---------------------------------------------------------


def test_an_alias_with_local_and_remote_members(tmp_path):
    srv = Server(tmp_path)
    replies = send(srv.mx(), "carol@origin.test", ["team@example.test"], MESSAGE)
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    assert len(srv.inbox(ALICE)) == 1 and len(srv.inbox(BOB)) == 1
    [(env, data)] = srv.queued()
    assert [r.address for r in env.recipients] == ["carol@remote.test"]
    # Forwarded: an SRS sender of ours, which comes back to the original.
    assert env.sender.startswith("SRS0=") and env.sender.endswith("@" + SRS_DOMAIN)
    assert srv.rules.srs is not None
    assert srv.rules.srs.reverse(env.sender) == "carol@origin.test"
    assert b"Subject: hello\n" in data and b"List-Id" not in data


def test_an_alias_with_remote_members_only_is_forwarded_by_the_mx(tmp_path):
    srv = Server(tmp_path)
    replies = send(srv.mx(), "carol@origin.test", ["outside@example.test"], MESSAGE)
    assert replies == ["250 2.1.5 Recipient OK", replies[1]]
    assert replies[1].startswith("250 2.0.0 Ok: queued as ")
    [(env, _)] = srv.queued()
    assert [r.address for r in env.recipients] == ["dave@remote.test", "Erin@far.test"]
    assert env.sender.startswith("SRS0=")


def test_without_a_queue_an_alias_with_remote_members_is_tried_later(tmp_path):
    srv = Server(tmp_path, queue=False)
    s = srv.mx()
    s.cmd("MAIL FROM:<carol@origin.test>")
    assert s.codes("RCPT TO:<team@example.test>\r\n") == ["451 4.3.0"]
    assert s.cmd("RCPT TO:<sales@example.test>") == ["250 2.1.5 Recipient OK"]


def test_a_user_reached_by_an_alias_and_directly_gets_one_copy(tmp_path):
    srv = Server(tmp_path)
    replies = send(srv.mx(), "carol@origin.test", ["sales@example.test", ALICE], MESSAGE)
    assert replies[-1].startswith("250 2.0.0 ")
    assert len(srv.inbox(ALICE)) == 1
    assert srv.queued() == []


def test_a_remote_address_reached_twice_is_queued_once(tmp_path):
    # Directly and through an alias (forwarded), or through two aliases.
    srv = Server(tmp_path)
    s = srv.submission()
    replies = send(
        s,
        ALICE,
        ["carol@remote.test", "team@example.test", "quiet@example.test"],
        "From: alice@example.test\n\nhi\n",
    )
    assert replies[-1].startswith("250 2.0.0 ")
    queued = srv.queued()
    rcpts = [r.address for env, _ in queued for r in env.recipients]
    assert rcpts == ["carol@remote.test"]
    assert len(srv.inbox(ALICE)) == 1 and len(srv.inbox(BOB)) == 1


def test_the_envelope_keeps_the_address_given_for_an_alias(tmp_path, events):
    # The Received field's "for" and the log name the address the client
    # gave, not where an alias led: an alias's members are not disclosed.
    srv = Server(tmp_path)
    replies = send(srv.mx(), "carol@origin.test", ["Sales@example.test"], MESSAGE)
    assert replies[-1].startswith("250 2.0.0 ")
    [data] = srv.inbox(ALICE)
    assert b"for <Sales@example.test>" in data
    assert b"for <alice@example.test>" not in data
    [accepted] = [line for line in logged(events) if line.startswith("accepted ")]
    assert "to=<Sales@example.test>" in accepted


def test_a_users_own_address_keeps_its_stored_spelling(tmp_path, events):
    srv = Server(tmp_path)
    passwords = Passwords({"Alice.Smith@example.test": PASSWORD})
    passwords.lookup = lambda a: (  # type: ignore[method-assign]
        "Alice.Smith@example.test" if a.lower() == "alice.smith@example.test" else None
    )
    srv.ctx = dataclasses.replace(srv.ctx, passwords=passwords)
    replies = send(srv.mx(), "carol@origin.test", ["ALICE.SMITH@example.test"], MESSAGE)
    assert replies[-1].startswith("250 2.0.0 ")
    [accepted] = [line for line in logged(events) if line.startswith("accepted ")]
    assert "to=<Alice.Smith@example.test>" in accepted


def test_a_sub_address_is_filed_in_its_folder_when_there_is_one(tmp_path):
    srv = Server(tmp_path)
    _result(srv.ctx.store.create_folder(ALICE, "lists"))
    send(srv.mx(), "carol@origin.test", ["alice+lists@example.test"], MESSAGE)
    send(srv.mx(), "carol@origin.test", ["alice+other@example.test"], MESSAGE)
    folder = _result(srv.ctx.store.open_folder(ALICE, "lists"))
    assert len(folder.messages()) == 1
    folder.close()
    [data] = srv.inbox(ALICE)
    assert b"for <alice+other@example.test>" in data


@pytest.mark.parametrize("detail", ["lists", "Lists", "inbox", "nope", ".x", "a/b"])
def test_a_sub_address_on_the_mbox_store(tmp_path, detail):
    # The mbox store refuses a folder that does not exist: the INBOX then.
    srv = Server(tmp_path)
    store = MboxMailStore(tmp_path / "mail", tmp_path / "index", SyncReactor(), SyncThreadPool())
    srv.ctx = dataclasses.replace(srv.ctx, store=store)
    _result(store.create_folder(ALICE, "lists"))
    replies = send(srv.mx(), "carol@origin.test", [f"alice+{detail}@example.test"], MESSAGE)
    assert replies[-1].startswith("250 2.0.0 ")
    lists = _result(store.open_folder(ALICE, "lists"))
    assert len(lists.messages()) == (detail == "lists")
    lists.close()
    assert len(srv.inbox(ALICE)) == (detail != "lists")


def test_a_list_alias_adds_its_list_id_to_every_copy(tmp_path):
    srv = Server(tmp_path)
    router = routing.Router(
        is_local_domain=srv.ctx.config.is_local_domain,
        passwords=srv.ctx.passwords,
        queue=srv.queue,
        addresses=srv.rules,
    )
    assert router.resolve("staff@example.test", may_relay=False) == (
        Mailbox(ALICE, mailing_list="staff@example.test"),
        Mailbox(BOB, mailing_list="staff@example.test"),
        Relay("carol@remote.test", True, "staff@example.test"),
    )
    replies = send(srv.mx(), "carol@origin.test", ["staff@example.test"], MESSAGE)
    assert replies[-1].startswith("250 2.0.0 ")
    for data in srv.inbox(ALICE) + srv.inbox(BOB) + [m for _, m in srv.queued()]:
        assert data.count(b"List-Id:") == 1
        assert b"\nList-Id: Staff <staff.example.test>\n" in data
        # Below the Received field: the trace fields stay one block (RFC 5322 3.6.7).
        assert data.index(b"Received:") < data.index(b"List-Id:") < data.index(b"From:")
    [(env, _)] = srv.queued()
    assert env.sender.startswith("SRS0=")


def test_a_message_with_its_own_list_id_keeps_it(tmp_path):
    srv = Server(tmp_path)
    message = "List-Id: Theirs <theirs.origin.test>\n" + MESSAGE
    send(srv.mx(), "carol@origin.test", ["staff@example.test"], message)
    for data in srv.inbox(ALICE) + [m for _, m in srv.queued()]:
        assert data.count(b"List-Id:") == 1 and b"List-Id: Theirs" in data


def test_the_accepted_line_names_every_queue_file(tmp_path, events):
    # Forwarded copies and list copies are queue files of their own.
    srv = Server(tmp_path)
    replies = send(
        srv.mx(), "carol@origin.test", ["outside@example.test", "staff@example.test"], MESSAGE
    )
    assert replies[-1].startswith("250 2.0.0 ")
    queued = srv.queued()
    assert sorted(len(env.recipients) for env, _ in queued) == [1, 2]
    [accepted] = [line for line in logged(events) if line.startswith("accepted ")]
    for env, _ in queued:
        assert env.id in accepted


def test_a_list_is_one_queue_file_per_remote_domain(tmp_path):
    # Each remote domain of a list is queued (and retried, and bounced) on its own.
    srv = Server(tmp_path, aliases="big: alice, a@one.test, b@one.test, c@two.test\n")
    srv.rules.settings = dataclasses.replace(
        srv.rules.settings, lists={"big@example.test": "Big <big.example.test>"}
    )
    send(srv.mx(), "carol@origin.test", ["big@example.test"], MESSAGE)
    queued = sorted(sorted(r.address for r in env.recipients) for env, _ in srv.queued())
    assert queued == [["a@one.test", "b@one.test"], ["c@two.test"]]
    assert len(srv.inbox(ALICE)) == 1


def test_a_list_with_no_list_id_adds_none(tmp_path):
    srv = Server(tmp_path)
    send(srv.mx(), "carol@origin.test", ["quiet@example.test"], MESSAGE)
    for data in srv.inbox(BOB) + [m for _, m in srv.queued()]:
        assert b"List-Id" not in data


# --- submission: send-as ---------------------------------------------------------------


def test_an_alias_reaching_only_the_user_is_a_sender_it_may_use(tmp_path):
    srv = Server(tmp_path)
    s = srv.submission()
    replies = send(s, "me@example.test", ["dave@remote.test"], "From: me@example.test\n\nhi\n")
    assert replies[-1].startswith("250 2.0.0 ")
    [(env, _)] = srv.queued()
    assert env.sender == "me@example.test"  # kept, and not rewritten: it is ours


def test_an_alias_reaching_others_too_is_not(tmp_path):
    s = Server(tmp_path).submission()
    assert s.cmd("MAIL FROM:<both@example.test>") == [
        "553 5.7.1 Sender address not owned by authenticated user"
    ]
    assert s.codes("MAIL FROM:<bob@example.test>\r\n") == ["553 5.7.1"]


@pytest.mark.parametrize(
    "field",
    [
        "From: bob@example.test",
        "From: Alice <alice@example.test>, Bob <bob@example.test>",
        "From: both@example.test",
        "From: Alice <alice@example.test>,\n grp: bob@example.test;",
        # Fields that do not parse, hiding an address a mail program shows:
        "From: (\\) bob@example.test",
        "From: ,(,bob@example.test",
        "From: =?utf-8?q?bob=40example.test?= <alice@example.test>",
        '"bob@example.test" <alice@example.test>'.join(["From: ", ""]),
        # Longer than is kept: refused whole, never cut.
        "From: (" + "\n ".join(["A" * 990] * 18) + " ) bob@example.test",
    ],
)
def test_a_from_field_naming_another_is_refused_after_the_dot(tmp_path, field):
    srv = Server(tmp_path)
    s = srv.submission()
    replies = send(s, ALICE, ["bob@example.test", "dave@remote.test"], f"{field}\n\nhi\n")
    assert replies[-1] == "550 5.7.1 From: address not owned by authenticated user"
    assert srv.inbox(BOB) == [] and srv.queued() == []


@pytest.mark.parametrize(
    "field",
    [
        'From: "Alice" <alice@example.test>, grp:;',
        "From: undisclosed-recipients:;",
        "From: Me <me@example.test>",
        "From: alice+lists@Example.Test (me)",
    ],
)
def test_a_from_field_with_the_users_addresses_is_taken(tmp_path, field):
    srv = Server(tmp_path)
    replies = send(srv.submission(), ALICE, [BOB], f"{field}\n\nhi\n")
    assert replies[-1].startswith("250 2.0.0 ")
    assert len(srv.inbox(BOB)) == 1


class _BreakablePasswords(Passwords):
    """Passwords whose lookups fail (the file cannot be read) once C{broken}."""

    broken = False

    def lookup(self, address):
        if self.broken:
            raise PasswordDatabaseError("cannot read the password file")
        return super().lookup(address)


def test_a_sender_that_cannot_be_checked_now_is_tried_again_later(tmp_path):
    # The user database cannot be read: "try again" (451), never "not yours" (5xx).
    srv = Server(tmp_path)
    passwords = _BreakablePasswords({ALICE: PASSWORD, BOB: PASSWORD})
    srv.ctx = dataclasses.replace(srv.ctx, passwords=passwords)
    s = srv.submission()
    passwords.broken = True
    assert s.codes("MAIL FROM:<me@example.test>\r\n") == ["451 4.3.0"]
    assert s.cmd(f"MAIL FROM:<{ALICE}>") == ["250 2.1.0 Sender OK"]
    assert s.cmd("RCPT TO:<dave@remote.test>") == ["250 2.1.5 Recipient OK"]
    s.cmd("DATA")
    [reply] = s.send("From: me@example.test\r\n\r\nhi\r\n.\r\n")
    assert reply.startswith("451 4.3.0 ")
    assert srv.queued() == []


def test_submission_forwards_through_an_alias_with_the_users_sender(tmp_path):
    srv = Server(tmp_path)
    replies = send(
        srv.submission(), ALICE, ["outside@example.test"], "From: alice@example.test\n\nhi\n"
    )
    assert replies[-1].startswith("250 2.0.0 ")
    [(env, _)] = srv.queued()
    # A sender of our own domains is covered by our SPF record: not rewritten.
    assert env.sender == ALICE
    assert [r.address for r in env.recipients] == ["dave@remote.test", "Erin@far.test"]


# --- the relayer: a bounce to an SRS address goes back to the original sender -------------


def relay_side(tmp_path: Path, clock: Any) -> tuple[Any, OutboundQueue, AddressRules, Any]:
    """A relayer with the address rules; gone.test does not exist."""
    config = parse(f"""
[server]
hostname = "{SRS_DOMAIN}"
domains = ["example.test", "other.test"]
data_dir = "{tmp_path / "data"}"
""")
    queue = OutboundQueue(config.queue_dir, clock, None)
    store = MemoryMailStore(clock=clock.seconds)
    rules = rules_for(tmp_path, clock)
    resolver = _OneDomainGone()
    relayer = build_relayer(
        config,
        queue=queue,
        reactor=clock,
        threadpool=None,
        resolver=resolver,
        mailboxes=LocalDelivery(store),
        passwords=Passwords({ALICE: PASSWORD, BOB: PASSWORD}),
        addresses=rules,
    )
    return relayer, queue, rules, SimpleNamespace(store=store, resolver=resolver, config=config)


def test_a_dsn_to_a_sender_that_is_an_alias_of_several_is_dropped_not_kept_forever(
    tmp_path, events
):
    # The MX forwards mail whose (forged) sender is one of our list aliases
    # as it is (our own domain: no SRS); its bounce has nobody to go to.
    clock = MemoryReactorClock()
    clock.advance(1_780_100_000.0)
    relayer, queue, _, side = relay_side(tmp_path, clock)
    _result(queue.enqueue("both@example.test", ["dave@gone.test"], BytesSource(b"x\n\nbody\n")))
    _result(relayer.start())
    assert QueueStore(side.config.queue_dir).ids() == []
    assert read_inbox(side, ALICE) == [] and read_inbox(side, BOB) == []
    assert any("both@example.test" in line and "dropped" in line for line in logged(events))
    _result(relayer.stop())


class _OneDomainGone:
    """gone.test does not exist; other lookups time out (the copy stays queued)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolve(self, domain):
        self.asked.append(domain)
        if domain == "gone.test":
            return defer.fail(DeliveryError(True, "5.1.2", f"no such domain {domain}"))
        return defer.fail(DeliveryError(False, "4.4.3", f"MX lookup for {domain} timed out"))


def test_a_dsn_to_an_srs_sender_goes_to_the_original_sender(tmp_path):
    clock = MemoryReactorClock()
    clock.advance(1_780_100_000.0)
    relayer, queue, rules, side = relay_side(tmp_path, clock)
    srs_sender = rules.forward_sender("carol@origin.test")
    # A copy forwarded to an alias member at another server, which fails for good.
    first = _result(
        queue.enqueue(srs_sender, ["dave@gone.test"], BytesSource(b"Subject: fwd\n\nbody\n"))
    )
    _result(relayer.start())
    qs = QueueStore(side.config.queue_dir)
    [dsn] = [qs.load_envelope(q) for q in qs.ids()]
    assert dsn.id != first and dsn.sender == ""
    assert [r.address for r in dsn.recipients] == ["carol@origin.test"]
    assert b"dave@gone.test" in qs.read_message(dsn)
    assert side.resolver.asked == ["gone.test", "origin.test"]
    assert read_inbox(side, ALICE) == []
    _result(relayer.stop())


class _BobsMailboxFails(MemoryMailStore):
    """The in-memory store, with bob's mailbox on a disk that fails."""

    def deliver(self, user, source, sender, folder="INBOX"):
        if user == BOB:
            return defer.fail(OSError(5, "Input/output error"))
        return super().deliver(user, source, sender, folder)


def test_a_list_copy_retried_through_the_queue_keeps_its_list_id(tmp_path, events):
    # alice's copy is stored and carol's queued: bob's is queued for the
    # relayer to store later, as the list sent it.
    srv = Server(tmp_path)
    srv.ctx = dataclasses.replace(srv.ctx, store=_BobsMailboxFails(clock=srv.reactor.seconds))
    replies = send(srv.mx(), "carol@origin.test", ["staff@example.test"], MESSAGE)
    assert replies[-1].startswith("250 2.0.0 ")
    assert len(srv.inbox(ALICE)) == 1
    queued = {tuple(r.address for r in env.recipients): (env, m) for env, m in srv.queued()}
    assert set(queued) == {("carol@remote.test",), (BOB,)}
    env, data = queued[(BOB,)]
    assert env.sender == "carol@origin.test"  # stored here later: no SRS
    assert data.count(b"List-Id: Staff <staff.example.test>\n") == 1
    [accepted] = [line for line in logged(events) if line.startswith("accepted ")]
    assert queued[("carol@remote.test",)][0].id in accepted


class _FullQueue(FakeQueue):
    def enqueue(self, sender, recipients, source, *, smtputf8=False, queue_id=None):
        return defer.fail(OSError(errno.ENOSPC, "No space left on device"))


def test_a_local_retry_that_cannot_be_queued_is_tried_again_by_the_client(tmp_path):
    srv = Server(tmp_path)
    store = _BobsMailboxFails(clock=srv.reactor.seconds)
    srv.ctx = dataclasses.replace(srv.ctx, store=store, queue=_FullQueue())
    replies = send(srv.mx(), "carol@origin.test", ["both@example.test"], MESSAGE)
    # RFC 3463 4.3.1: the disk is full; alice's copy is there already.
    assert replies[-1] == "452 4.3.1 Insufficient system storage"


def test_two_users_a_looser_comparison_would_merge_each_get_a_copy(tmp_path):
    # The password file tells straße@ from strasse@; so does delivery.
    srv = Server(tmp_path)
    users = ["straße@example.test", "strasse@example.test"]
    message = IncomingMessage(
        srv.ctx,
        queue_id="X",
        sender="carol@origin.test",
        recipients=users,
        trace=b"",
        submission=False,
        client="c",
        routes=[Mailbox(u) for u in users],
    )
    for line in (b"Subject: two users", b"", b"body"):
        message.lineReceived(line)
    assert _result(message.eomReceived()) == "X"
    for u in users:
        assert len(read_inbox(srv.ctx, u)) == 1, u


def test_a_transaction_stops_expanding_big_aliases_past_its_budget(tmp_path):
    # Each RCPT of a big alias costs reactor time; a transaction of many of them
    # is told 452 4.5.3 (RFC 5321 4.5.3.1.10) once it has spent its budget.
    members = ", ".join(f"m{i}@remote.test" for i in range(9_000))
    srv = Server(tmp_path, aliases=f"big: alice, {members}\n")
    s = srv.mx()
    assert s.cmd("MAIL FROM:<carol@origin.test>")[0].startswith("250 ")
    codes = [s.cmd(f"RCPT TO:<big+{i}@example.test>")[0][:9] for i in range(7)]
    assert codes == ["250 2.1.5"] * 5 + ["452 4.5.3"] * 2
    assert s.cmd("RSET")[0].startswith("250 ")
    assert s.cmd("MAIL FROM:<carol@origin.test>")[0].startswith("250 ")
    assert s.cmd("RCPT TO:<big@example.test>")[0].startswith("250 ")
