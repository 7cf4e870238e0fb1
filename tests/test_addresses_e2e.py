"""
End to end: the address rules in a real ``twistd -n mailsrv`` and its relay
process, with the other domains' servers (an MX per domain in a real DNS
server, an ESMTP receiver at each) on loopback (L{tests.remote_world}):
forwarding with an SRS sender, bounces to SRS addresses sent back to the
original sender (and forged ones refused at RCPT), a 500-member list alias,
sub-addressing and postmaster with swaks, and the aliases file edited while
both processes run.

One server and one set of receivers for the module: each test looks only at
what it sent (its own subjects and addresses, the transactions after its
mark).
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import mailbox
import os
import re
import shutil
import smtplib
import ssl
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailsrv.outbound.relayer import RECIPIENTS_PER_SESSION
from tests.e2e import PASSWORD, MailServer
from tests.remote_world import RemoteWorld, Transaction, wait_until

HOSTNAME = "mx.example.test"  # MailServer's server.hostname: the default srs_domain
DAVE = "dave@sender.test"
ALICE = "alice@example.test"
ADMIN = "admin@example.test"
LOCAL_MEMBERS = [f"u{i}@example.test" for i in (1, 2, 3)]
REMOTE_DOMAINS = [f"remote{i}.test" for i in range(1, 6)]
REMOTE_MEMBERS = [f"m{n:03d}@{d}" for d in REMOTE_DOMAINS for n in range(100)]
LIST = "announce@example.test"
LIST_ID = "Announcements <announce.example.test>"
# Each domain's MX at its own loopback address.
DOMAINS = {d: f"127.0.0.{i}" for i, d in enumerate([*REMOTE_DOMAINS, "sender.test"], start=2)}
SRS0 = re.compile(
    r"SRS0=(?P<hash>[A-Za-z0-9+/]{8})=(?P<stamp>[A-Za-z2-7]{2})=sender\.test=dave@"
    + re.escape(HOSTNAME)
)
WAIT = 30.0  # seconds to wait for a relayed copy
WATCH = 15.0  # seconds an aliases file change may take to be seen


def list_members() -> str:
    """The list alias in aliases(5) form: 10 members a line, continued by indentation."""
    members = REMOTE_MEMBERS + [m.split("@")[0] for m in LOCAL_MEMBERS]
    lines = [", ".join(members[i : i + 10]) for i in range(0, len(members), 10)]
    return f"{LIST}: " + ",\n\t".join(lines) + "\n"


ALIASES = (
    "# forwarded to other servers\n"
    "fwd@example.test: carol@remote1.test\n"
    "fwd-gone@example.test: nosuchuser@remote2.test\n" + list_members()
)

ADDRESSES = (
    "[addresses]\n"
    'aliases = "aliases"\n'
    f'postmaster = "{ADMIN}"\n'
    f'lists = {{ "{LIST}" = "{LIST_ID}" }}\n'
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with RemoteWorld(tmp_path_factory.mktemp("world"), DOMAINS) as w:
        yield w


@pytest.fixture(scope="module")
def server(tmp_path_factory, world):
    base = tmp_path_factory.mktemp("server")
    (base / "aliases").write_text(ALIASES)
    srv = MailServer(
        base,
        domains=("example.test", "second.test"),
        extra=world.relay_config() + ADDRESSES,
    )
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(srv.add_user, [ALICE, ADMIN, *LOCAL_MEMBERS]))
        srv.start()
        # The relay process has read the aliases file once it relays.
        wait_until(lambda: "relayer started" in log(srv), WAIT, "the relay process", srv.output)
        yield srv
    finally:
        srv.close()


# --- helpers ---------------------------------------------------------------------


def log(srv: MailServer) -> str:
    """The server's whole log, with the relay process's lines it writes."""
    return (srv.base / "server.log").read_text(errors="replace")


def message(subject: str, sender: str = DAVE, body: str = "Hello.\r\n") -> str:
    return (
        f"From: {sender}\r\n"
        f"To: someone@example.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@test>\r\n"
        "\r\n" + body
    )


def mx_send(srv: MailServer, sender: str, rcpts: list[str], data: str) -> dict:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
        s.ehlo("client.sender.test")
        return s.sendmail(sender, rcpts, data)


def submit(srv: MailServer, sender: str, rcpts: list[str], data: str) -> dict:
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
        s.ehlo("client.test")
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo("client.test")
        s.login(ALICE, PASSWORD)
        return s.sendmail(sender, rcpts, data)


def copies(srv: MailServer, user: str, subject: str) -> list[bytes]:
    """The messages in C{user}'s INBOX whose Subject is C{subject}, as stored."""
    path = srv.inbox(user)
    if not path.exists():
        return []
    box = mailbox.mbox(str(path), create=False)
    try:
        found = [box.get_bytes(k) for k in box.keys()]
    finally:
        box.close()
    return [m for m in found if f"\nSubject: {subject}\n".encode() in m]


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def arrived(world: RemoteWorld, mark: int, **match) -> list[Transaction]:
    """The transactions after C{mark} whose fields equal C{match}."""
    return [
        t for t in world.transactions(mark) if all(getattr(t, k) == v for k, v in match.items())
    ]


def queue_empty(srv: MailServer) -> bool:
    return "Mail queue is empty" in srv.cli("queue", "list").stdout


def forged(address: str) -> str:
    """C{address} with the first character of its SRS hash changed (not just its case)."""
    m = SRS0.fullmatch(address)
    assert m is not None, address
    i = m.start("hash")
    new = "B" if address[i].lower() == "a" else "A"
    return address[:i] + new + address[i + 1 :]


# --- forwarding and SRS ------------------------------------------------------------


@pytest.fixture(scope="module")
def forwarded(server, world) -> Transaction:
    """A message from dave@sender.test to fwd@example.test, as remote1.test's MX took it."""
    mark = world.mark()
    body = "First line.\r\n.a line with a leading dot\r\nLast line.\r\n"
    refused = mx_send(server, DAVE, ["fwd@example.test"], message("forwarded", body=body))
    assert refused == {}
    (t,) = wait_until(
        lambda: arrived(world, mark, domain="remote1.test"),
        WAIT,
        "the forwarded copy",
        server.output,
    )
    return t


class TestForwarding:
    def test_forwarded_copy_has_an_srs_sender(self, forwarded: Transaction) -> None:
        assert SRS0.fullmatch(forwarded.sender), forwarded.sender
        assert forwarded.recipients == ["carol@remote1.test"]
        assert b"\nSubject: forwarded\n" in forwarded.data
        assert forwarded.data.endswith(
            b"\n\nFirst line.\n.a line with a leading dot\nLast line.\n"
        ), forwarded.data
        msg = parse(forwarded.data)
        assert msg["From"] == DAVE
        ours = [r for r in msg.get_all("Received", []) if f"by {HOSTNAME} (mailsrv)" in r]
        assert len(ours) == 1, msg.get_all("Received")
        assert ours[0].startswith("from client.sender.test"), ours[0]

    def test_bounce_to_the_srs_address_reaches_the_original_sender(
        self, server: MailServer, world: RemoteWorld, forwarded: Transaction
    ) -> None:
        mark = world.mark()
        dsn = (
            "From: MAILER-DAEMON@remote1.test\r\n"
            "To: " + forwarded.sender + "\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n'
            "\r\n"
            "--b1\r\n"
            "Content-Type: text/plain\r\n\r\n"
            "carol's mailbox is full.\r\n"
            "--b1\r\n"
            "Content-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.remote1.test\r\n\r\n"
            "Final-Recipient: rfc822; carol@remote1.test\r\n"
            "Action: failed\r\n"
            "Status: 5.2.2\r\n"
            "--b1--\r\n"
        )
        assert mx_send(server, "", [forwarded.sender], dsn) == {}
        (t,) = wait_until(
            lambda: arrived(world, mark, domain="sender.test"), WAIT, "the bounce", server.output
        )
        assert (t.sender, t.recipients) == ("", [DAVE])
        assert b"carol's mailbox is full." in t.data
        assert parse(t.data).get_content_type() == "multipart/report"

    def test_srs_address_in_another_case_still_reaches_the_sender(
        self, server: MailServer, world: RemoteWorld, forwarded: Transaction
    ) -> None:
        """A relay on the way back lower-cased the address: hashes compare without case."""
        mark = world.mark()
        data = message("lower-case srs", sender="MAILER-DAEMON@remote1.test")
        assert mx_send(server, "", [forwarded.sender.lower()], data) == {}
        (t,) = wait_until(
            lambda: arrived(world, mark, domain="sender.test"), WAIT, "the bounce", server.output
        )
        assert (t.sender, t.recipients) == ("", [DAVE])
        assert b"\nSubject: lower-case srs\n" in t.data

    def test_forged_srs_address_is_refused_at_rcpt(
        self, server: MailServer, world: RemoteWorld, forwarded: Transaction
    ) -> None:
        mark = world.mark()
        fake = forged(forwarded.sender)
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
            s.ehlo("client.remote1.test")
            assert s.mail("")[0] == 250
            code, text = s.rcpt(fake)
            assert (code, text[:5]) == (550, b"5.1.1"), (code, text)
            # The same transaction to a genuine alias: only that copy leaves.
            assert s.rcpt("fwd@example.test")[0] == 250
            assert s.data(message("forged srs", sender="x@remote1.test"))[0] == 250
        (t,) = wait_until(
            lambda: arrived(world, mark, domain="remote1.test"), WAIT, "the sentinel copy"
        )
        assert t.recipients == ["carol@remote1.test"]
        wait_until(lambda: queue_empty(server), WAIT, "an empty queue", server.output)
        assert world.transactions(mark) == [t]

    def test_refused_forward_bounces_back_to_the_original_sender(
        self, server: MailServer, world: RemoteWorld
    ) -> None:
        """remote2.test refuses the forwarded copy: the DSN to its SRS sender reaches dave."""
        mark = world.mark()
        assert mx_send(server, DAVE, ["fwd-gone@example.test"], message("gone")) == {}
        (t,) = wait_until(
            lambda: arrived(world, mark, domain="sender.test"), WAIT, "the DSN", server.output
        )
        assert (t.sender, t.recipients) == ("", [DAVE])
        report = parse(t.data)
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload(1).get_payload()
        assert status[1]["Final-Recipient"] == "rfc822; nosuchuser@remote2.test"
        assert status[1]["Status"] == "5.1.1"
        assert b"Subject: gone" in t.data  # the original's headers come back
        assert arrived(world, mark, domain="remote2.test") == []  # refused at RCPT there
        # The relayer sent its DSN to the copy's SRS sender; routing sent that on to dave.
        notified = re.findall(
            r"sender failed notification to <([^>]*)> \(\w+\) for <nosuchuser@remote2.test>",
            log(server),
        )
        assert len(notified) == 1 and SRS0.fullmatch(notified[0]), notified
        wait_until(lambda: queue_empty(server), WAIT, "an empty queue", server.output)


# --- a list alias --------------------------------------------------------------------


class TestListAlias:
    def check_list(
        self, server: MailServer, world: RemoteWorld, mark: int, subject: str, sender
    ) -> None:
        """Every member got one copy of C{subject}, with the List-Id field."""
        # The relayer's transactions for a domain's 100 members: as many as it
        # has RECIPIENTS_PER_SESSION recipients each.
        sizes = [
            min(RECIPIENTS_PER_SESSION, 100 - i) for i in range(0, 100, RECIPIENTS_PER_SESSION)
        ]

        def all_arrived() -> list[Transaction]:
            found = [t for t in world.transactions(mark) if t.domain in REMOTE_DOMAINS]
            got = sum(len(t.recipients) for t in found)
            return found if got >= len(REMOTE_MEMBERS) else []

        found = wait_until(all_arrived, WAIT, "every remote copy", server.output)
        wait_until(lambda: queue_empty(server), WAIT, "an empty queue", server.output)
        found = world.transactions(mark)  # none more after the queue emptied
        counts: dict[str, int] = {}
        for t in found:
            for r in t.recipients:
                counts[r] = counts.get(r, 0) + 1
        assert counts == dict.fromkeys(REMOTE_MEMBERS, 1)
        for domain in REMOTE_DOMAINS:
            mine = [t for t in found if t.domain == domain]
            assert sorted((len(t.recipients) for t in mine), reverse=True) == sizes
        for t in found:
            assert sender(t.sender), t.sender
            msg = parse(t.data)
            assert msg["Subject"] == subject
            assert msg.get_all("List-Id") == [LIST_ID]
        for user in LOCAL_MEMBERS:
            (copy,) = copies(server, user, subject)
            assert parse(copy).get_all("List-Id") == [LIST_ID]
        # The remote copies were one queue file per remote domain.
        accepted = re.findall(rf"accepted \S+ .*to=<{LIST}> .* queued=(\S+)", log(server))
        assert len(accepted[-1].split(",")) == len(REMOTE_DOMAINS), accepted[-1]

    def test_list_from_outside(self, server: MailServer, world: RemoteWorld) -> None:
        mark = world.mark()
        assert mx_send(server, DAVE, [LIST], message("list from outside")) == {}
        # Forwarded copies: the sender's domain is not ours, the SRS address is.
        self.check_list(server, world, mark, "list from outside", SRS0.fullmatch)

    def test_list_from_a_local_user_by_submission(
        self, server: MailServer, world: RemoteWorld
    ) -> None:
        mark = world.mark()
        data = message("list from alice", sender=ALICE)
        assert submit(server, ALICE, [LIST], data) == {}
        # Our own domain's sender is kept: our SPF record covers it.
        self.check_list(server, world, mark, "list from alice", lambda s: s == ALICE)


# --- sub-addressing and postmaster, with swaks ----------------------------------------


def swaks(srv: MailServer, sender: str, rcpt: str, subject: str) -> None:
    program = shutil.which("swaks")
    if program is None:
        pytest.skip("swaks is not installed")
    result = subprocess.run(
        [
            program,
            "--server",
            f"127.0.0.1:{srv.ports['smtp']}",
            "--helo",
            "client.sender.test",
            "--from",
            sender,
            "--to",
            rcpt,
            "--header",
            f"Subject: {subject}",
            "--timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250" in result.stdout.split("~> DATA")[-1], result.stdout


def imap_subjects(srv: MailServer, user: str, folder: str) -> list[str]:
    m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
    try:
        m.login(user, PASSWORD)
        typ, exists = m.select(folder, readonly=True)
        assert typ == "OK", exists
        if exists == [b"0"]:
            return []
        typ, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK", data
        return [parse(item[1])["Subject"] for item in data if isinstance(item, tuple)]
    finally:
        m.logout()


class TestSubaddressAndPostmaster:
    def test_detail_files_into_the_folder_it_names(self, server: MailServer) -> None:
        if shutil.which("swaks") is None:
            pytest.skip("swaks is not installed")
        m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
        try:
            m.login(ALICE, PASSWORD)
            assert m.create("lists")[0] == "OK"
        finally:
            m.logout()
        swaks(server, DAVE, "alice+lists@example.test", "for the lists folder")
        swaks(server, DAVE, "alice+nofolder@example.test", "no such folder")
        assert imap_subjects(server, ALICE, "lists") == ["for the lists folder"]
        inbox = imap_subjects(server, ALICE, "INBOX")
        assert "for the lists folder" not in inbox
        assert inbox.count("no such folder") == 1  # no folder of that name: the INBOX

    def test_postmaster_and_abuse_of_a_second_domain_reach_the_admin(
        self, server: MailServer
    ) -> None:
        swaks(server, "<>", "postmaster@second.test", "to the postmaster")
        swaks(server, "<>", "abuse@second.test", "to abuse")
        for subject in ("to the postmaster", "to abuse"):
            (copy,) = copies(server, ADMIN, subject)
            assert copy.startswith(b"Return-Path: <>\n"), copy[:200]


# --- the aliases file edited while the server runs --------------------------------------


def rewrite(path: Path, text: str) -> None:
    """Replace C{path} whole, as an editor or a config tool does (write, rename)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def rcpt_reply(srv: MailServer, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
        s.ehlo("client.sender.test")
        s.mail(DAVE)
        return s.rcpt(rcpt)[0]


class TestAliasesFileEdited:
    def test_mx_and_relay_follow_the_new_file(self, server: MailServer, world: RemoteWorld) -> None:
        late, send_as = "late@example.test", "alice-late@example.test"
        assert rcpt_reply(server, late) == 550
        assert rcpt_reply(server, send_as) == 550
        reads = log(server).count("aliases: read ")
        rewrite(
            server.base / "aliases",
            ALIASES + f"{late}: carol@remote3.test\n{send_as}: alice\n",
        )
        # The MX: the new alias is taken at RCPT.
        wait_until(
            lambda: rcpt_reply(server, late) == 250, WATCH, "the MX to take the alias", every=0.25
        )
        # The relay process read it too (its log lines come through the server's log).
        wait_until(
            lambda: log(server).count("aliases: read ") >= reads + 2,
            WATCH,
            "both processes to read the file",
            server.output,
        )
        # A DSN to a send-as alias added now: the relay process routes it to alice.
        data = message("from the new alias", sender=send_as)
        assert submit(server, send_as, ["nosuchuser@remote3.test"], data) == {}
        (dsn,) = wait_until(
            lambda: copies(server, ALICE, "Undelivered Mail Returned to Sender"),
            WAIT,
            "the DSN in alice's INBOX",
            server.output,
        )
        report = parse(dsn)
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload(1).get_payload()
        assert status[1]["Final-Recipient"] == "rfc822; nosuchuser@remote3.test"
        wait_until(lambda: queue_empty(server), WAIT, "an empty queue", server.output)
