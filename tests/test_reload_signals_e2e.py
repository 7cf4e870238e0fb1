"""
SIGHUP at awkward moments, end to end with a real ``twistd -n mailsrv``: a
SIGHUP that comes while the server stops (its sessions told goodbye, the
relay process and the store making their last writes) must not kill it
with the signal's default action; a storm of SIGHUPs while mail
comes in loses and duplicates nothing.
"""

from __future__ import annotations

import imaplib
import signal
import smtplib

from tests.e2e import PASSWORD
from tests.test_hangup import wait_for_log
from tests.test_reload_e2e import ALICE, edit, message, server


def test_a_sighup_while_stopping_lets_the_stop_finish(tmp_path):
    with server(tmp_path) as srv:
        assert srv.proc is not None
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)
        imap.login(ALICE, PASSWORD)
        srv.proc.send_signal(signal.SIGTERM)
        wait_for_log(srv, r"Received SIGTERM")
        srv.proc.send_signal(signal.SIGHUP)  # the stop takes a second or two
        assert srv.proc.wait(30) == -signal.SIGTERM, srv.output()  # not -SIGHUP
        assert "Server Shut Down." in srv.output_all()
        assert imap.readline().startswith(b"* BYE")
        imap.shutdown()


def test_a_storm_of_sighups_while_mail_comes_in_loses_and_duplicates_nothing(tmp_path):
    with server(tmp_path) as srv:
        assert srv.proc is not None
        sent = 0
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as smtp:
            edit(srv, "[policy]\n", "[policy]\nmessages_per_hour = 1000\n")
            for n in range(10):
                edit(srv, f"messages_per_hour = {1000 + n}", f"messages_per_hour = {1001 + n}")
                for _ in range(3):
                    srv.proc.send_signal(signal.SIGHUP)
                    smtp.sendmail("bob@sender.test", [ALICE], message(300))
                    sent += 1
        wait_for_log(srv, r"SIGHUP: reloaded the configuration")
        assert srv.proc.poll() is None, srv.output()
        assert srv.inbox(ALICE).read_bytes().count(b"Subject: big") == sent
        assert "configuration refused" not in srv.output_all()
        assert srv.stop() == -signal.SIGTERM, srv.output()  # twistd's exit after a SIGTERM
        assert "Server Shut Down." in srv.output_all()
