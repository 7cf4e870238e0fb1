"""The routing step: where each recipient goes, decided in one place."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from mailsrv import replies, routing
from mailsrv.auth.passwd import PasswordFile
from mailsrv.config import parse
from mailsrv.localdelivery import LocalDelivery
from mailsrv.outbound.build import build_relayer
from mailsrv.outbound.errors import DeliveryError
from mailsrv.outbound.queue import OutboundQueue, QueueStore
from mailsrv.routing import Mailbox, Refused, Relay, Router
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore
from tests.test_smtp_helpers import (
    USERS,
    Passwords,
    Session,
    _result,
    make_context,
    read_inbox,
)

ALICE = USERS[0]


def is_local(domain: str) -> bool:
    return domain.lower().rstrip(".") in {"example.test", "other.test"}


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    path.write_text("Alice.Smith@example.test:{PLAIN}x\nbob@other.test:{PLAIN}y\n")
    return path


def router(passwd: Path, tmp_path: Path, queue: bool = True) -> Router:
    q = OutboundQueue(tmp_path / "queue", MemoryReactorClock(), None) if queue else None
    return Router(is_local_domain=is_local, passwords=PasswordFile(passwd), queue=q)


@pytest.mark.parametrize("may_relay", [False, True])
def test_a_local_user_goes_to_the_inbox_under_its_stored_spelling(passwd, tmp_path, may_relay):
    r = router(passwd, tmp_path)
    for address in (
        "Alice.Smith@example.test",
        "alice.smith@EXAMPLE.test",
        "ALICE.SMITH@example.test",
    ):
        assert r.route(address, may_relay=may_relay) == Mailbox("Alice.Smith@example.test", "INBOX")
    assert r.route("bob@other.test", may_relay=may_relay) == Mailbox("bob@other.test")


@pytest.mark.parametrize("may_relay", [False, True])
def test_an_unknown_local_user_is_refused_550(passwd, tmp_path, may_relay):
    route = router(passwd, tmp_path).route("carol@example.test", may_relay=may_relay)
    assert route == Refused(replies.NO_SUCH_USER)
    assert str(route.reply) == "550 5.1.1 No such user here"


def test_the_mx_never_relays(passwd, tmp_path):
    route = router(passwd, tmp_path).route("dave@remote.test", may_relay=False)
    assert route == Refused(replies.RELAY_DENIED)
    assert str(route.reply) == "554 5.7.1 Relay access denied"


def test_submission_relays_through_the_queue(passwd, tmp_path):
    route = router(passwd, tmp_path).route("Dave@Remote.test", may_relay=True)
    assert route == Relay("Dave@Remote.test")


def test_submission_without_a_queue_is_told_to_try_later(passwd, tmp_path):
    route = router(passwd, tmp_path, queue=False).route("dave@remote.test", may_relay=True)
    assert isinstance(route, Refused) and route.cause == "no outbound queue"
    assert str(route.reply) == "451 4.3.0 Relaying is not available, try again later"


@pytest.mark.parametrize("may_relay", [False, True])
def test_an_unreadable_password_file_is_a_local_error_not_no_such_user(passwd, tmp_path, may_relay):
    r = router(passwd, tmp_path)
    passwd.unlink()
    passwd.mkdir()  # as root, chmod 000 would not stop the read
    route = r.route("Alice.Smith@example.test", may_relay=may_relay)
    assert isinstance(route, Refused) and route.reply == replies.LOCAL_ERROR
    assert route.cause  # the reason, for the log only
    assert "passwd" not in str(route.reply)
    # Mail for other servers needs no lookup.
    assert r.route("dave@remote.test", may_relay=True) == Relay("dave@remote.test")


def test_the_relayers_local_deliveries_go_to_the_users_inbox():
    assert routing.queued_mailbox("Alice.Smith@example.test") == Mailbox(
        "Alice.Smith@example.test", "INBOX"
    )


def test_a_failed_local_copy_is_retried_through_the_queue():
    assert routing.retry_via_queue(Mailbox("Alice.Smith@example.test")) == Relay(
        "Alice.Smith@example.test"
    )


# --- SMTP intake takes its decisions from the routing step -----------------------------


class _PolicyRouter(Router):
    """What a later routing feature does: file into a folder, refuse with a policy reply."""

    def resolve(self, address, *, may_relay, budget=None):
        if address.startswith("blocked@"):
            return Refused(replies.Reply(550, "5.7.1", "Refused by policy"), cause="block list")
        routes = super().resolve(address, may_relay=may_relay, budget=budget)
        if isinstance(routes, Refused):
            return routes
        return tuple(Mailbox(r.user, "Lists") if isinstance(r, Mailbox) else r for r in routes)

    def route_queued(self, address):
        if address.startswith("blocked@"):
            return Refused(replies.Reply(550, "5.7.1", "Refused by policy"), cause="block list")
        route = super().route_queued(address)
        if isinstance(route, Mailbox):
            return Mailbox(route.user, "Lists")
        return route


def test_smtp_intake_delivers_where_the_routing_step_says():
    ctx = make_context()
    _result(ctx.store.create_folder(ALICE, "Lists"))
    s = Session(ctx)
    s.cmd("EHLO client.example")
    delivery = s.proto._delivery
    delivery.router = _PolicyRouter(
        is_local_domain=ctx.config.is_local_domain, passwords=ctx.passwords, queue=ctx.queue
    )
    assert s.cmd("MAIL FROM:<carol@remote.test>") == ["250 2.1.0 Sender OK"]
    assert s.cmd("RCPT TO:<blocked@example.test>") == ["550 5.7.1 Refused by policy"]
    assert s.cmd(f"RCPT TO:<{ALICE}>") == ["250 2.1.5 Recipient OK"]
    s.cmd("DATA")
    [reply] = s.send("Subject: routed\r\n\r\nbody\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    folder = _result(ctx.store.open_folder(ALICE, "Lists"))
    [info] = folder.messages()
    with folder.open_message(info.uid) as f:
        data = f.read()
    folder.close()
    assert data.startswith(b"Return-Path: <carol@remote.test>\r\nReceived: ")
    assert data.endswith(b"Subject: routed\r\n\r\nbody\r\n")
    assert read_inbox(ctx, ALICE) == []


# --- the relayer takes its decisions from the routing step too ---------------------------


def test_a_queued_recipient_is_routed_as_for_a_client_that_may_relay(passwd, tmp_path):
    r = router(passwd, tmp_path)
    assert r.route_queued("alice.smith@example.test") == Mailbox("Alice.Smith@example.test")
    assert r.route_queued("dave@remote.test") == Relay("dave@remote.test")


def test_a_queued_recipients_refusals_are_in_the_queues_words(passwd, tmp_path):
    route = router(passwd, tmp_path).route_queued("carol@example.test")
    assert route == Refused(replies.QUEUED_NO_SUCH_USER)
    assert str(route.reply) == "550 5.1.1 User unknown in local recipient table"
    passwd.unlink()
    passwd.mkdir()  # it cannot be read
    route = router(passwd, tmp_path).route_queued("alice.smith@example.test")
    assert isinstance(route, Refused) and route.cause
    assert str(route.reply) == "451 4.3.0 local user database unavailable"
    # Raised, as a DSN that cannot reach its sender now is: the cause is what is logged.
    error = routing.RefusedError(route)
    assert str(error) == route.cause and error.reply == route.reply and not error.permanent


def test_other_refusals_keep_their_reply(passwd, tmp_path):
    route = router(passwd, tmp_path, queue=False).route_queued("dave@remote.test")
    assert route == Refused(replies.RELAY_UNAVAILABLE, cause="no outbound queue")
    assert str(routing.RefusedError(route)) == "no outbound queue"


class _QueuedPolicyRouter(Router):
    """What a later routing feature does to queued mail: an alias, a policy refusal."""

    def route(self, address, *, may_relay):
        if address == "sales@example.test":
            return Mailbox(ALICE)
        if address.startswith("blocked@"):
            return Refused(replies.Reply(550, "5.7.1", "Refused by policy"), cause="block list")
        return super().route(address, may_relay=may_relay)


class _DownResolver:
    def __init__(self):
        self.asked = []

    def resolve(self, domain):
        self.asked.append(domain)
        return defer.fail(DeliveryError(False, "4.4.3", f"MX lookup for {domain} timed out"))


def test_the_relayer_delivers_where_the_routing_step_says(tmp_path):
    clock = MemoryReactorClock()
    config = parse(f"""
[server]
hostname = "mail.example.test"
domains = ["example.test"]
data_dir = "{tmp_path / "data"}"
""")
    queue = OutboundQueue(config.queue_dir, clock, None)
    store = MemoryMailStore(clock=clock.seconds)
    resolver = _DownResolver()
    relayer = build_relayer(
        config,
        queue=queue,
        reactor=clock,
        threadpool=None,
        resolver=resolver,
        mailboxes=LocalDelivery(store),
        router=_QueuedPolicyRouter(
            is_local_domain=config.is_local_domain, passwords=Passwords({}), queue=queue
        ),
    )
    _result(relayer.start())
    qid = _result(
        queue.enqueue(
            "",
            ["sales@example.test", "blocked@example.test", "bob@remote.test"],
            BytesSource(b"Subject: routed\n\nbody\n"),
        )
    )
    [data] = read_inbox(SimpleNamespace(store=store), ALICE)  # the alias, into alice's INBOX
    assert data.startswith(b"Return-Path: <>\nSubject: routed\n")
    env = QueueStore(config.queue_dir).load_envelope(qid)
    sales, blocked, bob = env.recipients
    assert (sales.state, sales.reply) == ("sent", "250 2.0.0 delivered to mailbox")
    assert (blocked.state, blocked.reply) == ("failed", "550 5.7.1 Refused by policy")
    assert bob.state == "pending" and resolver.asked == ["remote.test"]
    _result(relayer.stop())
