"""RFC 3464 bounces, parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
import io

from mailsrv.outbound.dsn import DELAYED, FAILED, build_dsn, read_headers
from mailsrv.outbound.queue import Envelope, Recipient

HEADERS = b"From: Alice <alice@example.test>\nTo: bob@remote.test\nSubject: Lunch\n"


def _envelope():
    r1 = Recipient(
        "bob@remote.test",
        "failed",
        1,
        "5.1.1",
        "550 5.1.1 <bob@remote.test>: no such user",
        "mx.remote.test",
        1_700_000_100.0,
    )
    r2 = Recipient(
        "carol@null.test",
        "failed",
        1,
        "5.1.10",
        "Domain null.test does not accept mail (null MX, RFC 7505)",
        "",
        1_700_000_100.0,
    )
    r3 = Recipient(
        "dave@remote.test",
        "pending",
        1,
        "4.2.0",
        "450 4.2.0 mailbox busy",
        "mx.remote.test",
        1_700_000_100.0,
    )
    return Envelope(
        "0123ABCD", "alice@example.test", [r1, r2, r3], 1_700_000_000.0, 1_700_000_000.0
    )


def _parse(data: bytes):
    assert b"\r" not in data  # LF line ends, like every message in the store and queue
    return email.message_from_bytes(data, policy=email.policy.compat32)


def test_failed_dsn_structure():
    env = _envelope()
    data = build_dsn(
        hostname="mail.example.test",
        envelope=env,
        recipients=env.recipients[:2],
        action=FAILED,
        original_headers=HEADERS,
        now=1_700_000_200.0,
    )
    msg = _parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "alice@example.test"
    assert "MAILER-DAEMON@mail.example.test" in msg["From"]
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_payload(decode=True).decode()
    assert (
        "<bob@remote.test>: host mx.remote.test said: 550 5.1.1 <bob@remote.test>: no such user"
        in text
    )
    assert "<carol@null.test>: Domain null.test does not accept mail (null MX" in text
    assert "dave@remote.test" not in text

    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: no such user"
    assert bob["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:15:00 GMT"
    assert carol["Status"] == "5.1.10"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"].startswith("X-mailsrv; Domain null.test")

    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_payload().replace("\r\n", "\n").strip() == HEADERS.decode().strip()


def test_delayed_dsn():
    env = _envelope()
    data = build_dsn(
        hostname="mail.example.test",
        envelope=env,
        recipients=[env.recipients[2]],
        action=DELAYED,
        original_headers=HEADERS,
        now=1_700_014_400.0,
        retry_until=1_700_432_000.0,
    )
    msg = _parse(data)
    assert msg["Subject"].startswith("Delayed Mail")
    human, status, _ = msg.get_payload()
    assert "WARNING ONLY" in human.get_payload()
    _, dave = status.get_payload()
    assert dave["Action"] == "delayed"
    assert dave["Status"] == "4.2.0"
    assert dave["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 GMT"


def test_multiline_reply_and_8bit_headers_stay_well_formed():
    env = _envelope()
    env.recipients[0].reply = "550-5.7.1 first line\n550 5.7.1 second line"
    data = build_dsn(
        hostname="h",
        envelope=env,
        recipients=env.recipients[:1],
        action=FAILED,
        original_headers="Subject: Grüße\n".encode(),
        now=0.0,
    )
    msg = _parse(data)
    _, bob = msg.get_payload(1).get_payload()
    assert bob["Diagnostic-Code"] == "smtp; 550-5.7.1 first line 550 5.7.1 second line"
    assert "Grüße" in msg.get_payload(2).get_payload(decode=True).decode()


def test_read_headers_stops_at_the_blank_line():
    f = io.BytesIO(HEADERS + b"\nbody line\n")
    assert read_headers(f) == HEADERS
    assert read_headers(io.BytesIO(b"A: b\n" * 100), limit=50) == b"A: b\n" * 10
