"""
POP3 USER/PASS logins are logged with the method Dovecot 2.3 logs for them:
a private Dovecot (tests/dovecot_peer.py, POP3 instead of IMAP) is sent a
wrong and a right USER/PASS, and the C{method=} of its pop3-login lines is
compared with ours for the same two logins.
"""

from __future__ import annotations

import poplib
import re
import time

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from tests import dovecot_peer
from tests.test_pop3_support import Session, make_ctx

REASON = dovecot_peer.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# Both servers' login lines: a failure ("auth failed") and a success ("Login:").
LOGIN_LINE = re.compile(r"pop3-login: (?:Info: )?(Login:|Disconnected.*auth failed).*method=(\w+)")


class _Pop3Dovecot(dovecot_peer.Dovecot):
    """The private Dovecot serving POP3 on its port instead of IMAP."""

    def launch(self) -> None:
        conf = self.dir / "dovecot.conf"
        text = conf.read_text()
        if "protocols = pop3" not in text:
            text = text.replace("protocols = imap", "protocols = pop3")
            text = text.replace("service imap-login {", "service pop3-login {")
            text = text.replace("inet_listener imap {", "inet_listener pop3 {")
            text = text.replace("inet_listener imaps {", "inet_listener pop3s {")
            conf.write_text(text + "pop3_uidl_format = %08Xu%08Xv\n")
        super().launch()


def _methods(lines: list[str]) -> list[tuple[str, str]]:
    found = []
    for line in lines:
        m = LOGIN_LINE.search(line)
        if m:
            found.append(("ok" if m[1] == "Login:" else "failed", m[2]))
    return found


def _dovecot_methods() -> list[tuple[str, str]]:
    peer = _Pop3Dovecot()
    try:
        peer.start(b"")
        for password in ("wrong", dovecot_peer.PASSWORD):
            c = poplib.POP3("127.0.0.1", peer.port, timeout=30)
            try:
                c.user(dovecot_peer.USER)
                c.pass_(password)
            except poplib.error_proto:
                pass
            c.quit()
        log = peer.dir / "log"
        deadline = time.monotonic() + 10
        while True:  # the login process writes its lines through the log process
            found = _methods(log.read_text().splitlines() if log.exists() else [])
            if len(found) >= 2 or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    finally:
        peer.stop()


def _our_methods(tmp_path) -> list[tuple[str, str]]:
    ctx = make_ctx(tmp_path)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        s = Session(ctx)
        s.take()
        s.login(password="wrong")
        ctx.reactor.advance(ctx.config.auth.failure_delay)
        s.close()
        s = Session(ctx)
        s.take()
        assert s.login().startswith(b"+OK")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    return _methods([formatEvent(e) for e in seen])


def test_user_pass_is_logged_as_dovecot_logs_it(tmp_path) -> None:
    theirs = _dovecot_methods()
    assert theirs == [("failed", "PLAIN"), ("ok", "PLAIN")], theirs
    assert _our_methods(tmp_path) == theirs
