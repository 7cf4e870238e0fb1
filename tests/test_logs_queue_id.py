"""
One queue id per message in a real server's log, from intake to the relay
process's delivery line, the id first on each line (Postfix's shape).
"""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

from tests.e2e import PASSWORD, MailServer

USER = "alice@example.test"


def test_one_id_from_intake_to_delivery(tmp_path: Path) -> None:
    server = MailServer(tmp_path)
    server.add_user(USER)
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
            s.ehlo("client.test")
            s.login(USER, PASSWORD)
            s.mail(USER)
            s.rcpt("bob@example.net")
            code, reply = s.data(b"Message-ID: <m1@client.test>\r\nSubject: hi\r\n\r\nhello\r\n")
        assert code == 250, reply
        match = re.search(rb"queued as (\S+)", reply)
        assert match, reply
        qid = match.group(1).decode()
    finally:
        server.close()
    text = (tmp_path / "server.log").read_text(errors="replace")
    lines = [line.split("] ", 1)[1] for line in text.splitlines() if "] " in line]
    assert f"{qid}: client=unknown[127.0.0.1], sasl_username={USER}" in lines, text
    assert f"{qid}: message-id=<m1@client.test>" in lines, text
    assert any(
        line.startswith(f"{qid}: from=<{USER}>, size=") and "nrcpt=1" in line for line in lines
    ), text
    # The relay process's line (no DNS here: the domain is not found).
    delivered = [line for line in lines if line.startswith(f"{qid}: to=<bob@example.net>, relay=")]
    assert len(delivered) == 1 and "status=bounced" in delivered[0], text
