"""
SRS addresses are no open relay: on the MX, with no login, a forged SRS
address (a short hash guessed a character at a time, an SRS1 address with no
time stamp or an old one) is refused at RCPT, and an SRS address of ours takes
mail only from the null sender, as bounces and auto-replies are sent.
"""

from __future__ import annotations

import string

import srslib

from mailsrv.addresses.srs import HASH_LENGTH, SRSRewriter
from tests.test_addresses_smtp import MESSAGE, SRS_DOMAIN, Server, send

DAY = 86400
BASE64 = string.ascii_letters + string.digits + "+/"
BOUNCE = "From: MAILER-DAEMON@remote.test\nSubject: Undelivered Mail\n\nbounce\n"


def stamp(srv: Server) -> str:
    """Today's SRS day stamp on the server's clock."""
    return srslib.SRS(b"x").generate_ts(srv.reactor.seconds())


def rcpt_from_null_sender(srv: Server, address: str) -> str:
    """RCPT TO:<address> after MAIL FROM:<>, in a session of its own; the reply."""
    s = srv.mx()
    assert s.cmd("MAIL FROM:<>") == ["250 2.1.0 Sender OK"]
    [reply] = s.cmd(f"RCPT TO:<{address}>")
    s.close()
    return reply


def test_one_character_srs0_hashes_are_all_refused(tmp_path):
    # One of the 64 is our hash's first character (in some case).
    srv = Server(tmp_path)
    ts = stamp(srv)
    for c in BASE64:
        address = f"SRS0={c}={ts}=victim.example=anyone@{SRS_DOMAIN}"
        assert rcpt_from_null_sender(srv, address) == "550 5.1.1 Invalid or expired SRS address"
    assert srv.queued() == []


def test_one_character_srs1_hashes_are_all_refused(tmp_path):
    srv = Server(tmp_path)
    ts = stamp(srv)
    for c in BASE64:
        address = f"SRS1={c}=victim.example==abcd={ts}=victim.example=anyone@{SRS_DOMAIN}"
        assert rcpt_from_null_sender(srv, address) == "550 5.1.1 Invalid or expired SRS address"
    assert srv.queued() == []


def test_srs1_with_our_hash_but_no_time_stamp_is_refused(tmp_path):
    srv = Server(tmp_path)
    maker = srslib.SRS(b"s" * 32, hash_length=HASH_LENGTH)  # the server's secret
    address = maker.generate_srs1_address("victim.example", "=x", SRS_DOMAIN)
    assert rcpt_from_null_sender(srv, address) == "550 5.1.1 Invalid or expired SRS address"
    assert srv.queued() == []


def test_an_srs1_bounce_goes_to_the_first_hop_until_its_time_stamp_is_too_old(tmp_path):
    srv = Server(tmp_path)
    first_hop = SRSRewriter(b"a" * 32, "hop.test", now=srv.reactor.seconds)
    srs0 = first_hop.forward("carol@origin.test")
    srs1 = srv.rules.forward_sender(srs0)
    assert srs1.startswith("SRS1=") and srs1.endswith("@" + SRS_DOMAIN)

    srv.reactor.advance(20 * DAY)
    replies = send(srv.mx(), "", [srs1], BOUNCE)
    assert replies[0] == "250 2.1.5 Recipient OK" and replies[1].startswith("250 2.0.0 ")
    [(env, _)] = srv.queued()
    assert env.sender == "" and [r.address for r in env.recipients] == [srs0]

    srv.reactor.advance(DAY)
    assert rcpt_from_null_sender(srv, srs1) == "550 5.1.1 Invalid or expired SRS address"
    assert len(srv.queued()) == 1


def test_an_srs_address_takes_mail_only_from_the_null_sender(tmp_path):
    srv = Server(tmp_path)
    genuine = srv.rules.forward_sender("carol@origin.test")
    refusal = "550 5.7.1 SRS addresses take only bounces (MAIL FROM:<>)"
    s = srv.mx()
    assert s.cmd("MAIL FROM:<mallory@evil.test>") == ["250 2.1.0 Sender OK"]
    assert s.cmd(f"RCPT TO:<{genuine}>") == [refusal]
    # A forged one gets the same answer: no hash check to probe.
    assert s.cmd(f"RCPT TO:<SRS0=A=AA=victim.example=anyone@{SRS_DOMAIN}>") == [refusal]
    assert s.codes("DATA\r\n")[0].startswith("554")
    # Nor from a logged-in user.
    assert send(srv.submission(), "alice@example.test", [genuine], MESSAGE) == [refusal]
    assert srv.queued() == []
    # A bounce is taken.
    replies = send(srv.mx(), "", [genuine], BOUNCE)
    assert replies[0] == "250 2.1.5 Recipient OK" and replies[1].startswith("250 2.0.0 ")
    [(env, _)] = srv.queued()
    assert env.sender == "" and [r.address for r in env.recipients] == ["carol@origin.test"]
