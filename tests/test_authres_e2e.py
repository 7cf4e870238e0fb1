"""
End to end: SPF, DKIM and DMARC in a real ``twistd -n mailsrv`` whose
``[dns] nameservers`` is a real DNS server on loopback (twisted.names,
L{tests.authres_support}) serving the senders' SPF, DKIM and DMARC
records; mail comes over real SMTP sockets, and the Authentication-Results
field is read from the mbox on disk. One server with the defaults
(spf_reject false, dmarc_reject true), one with spf_reject true and
dmarc_reject false.
"""

from __future__ import annotations

import imaplib
import mailbox
import smtplib
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.trial import unittest

from tests.authres_support import SenderKey, arc_sealed, message, start_zone
from tests.e2e import PASSWORD, MailServer

ALICE = "alice@example.test"


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(port: int, sender: str, data: bytes, helo: str = "client.test") -> tuple[int, str]:
    """One transaction; the reply that ended it (MAIL's if refused, else the final one)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo(helo)
        code, text = s.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = s.rcpt(ALICE)
        assert code == 250, text
        code, text = s.data(data)
        return code, text.decode()


def stored(path: Path, subject: str) -> list[Any]:
    """The messages in the mbox at C{path} with C{subject}."""
    if not path.exists():
        return []
    box = mailbox.mbox(str(path), create=False)
    try:
        return [m for m in box if m["Subject"] == subject]
    finally:
        box.close()


def results_of(msg: Any) -> list[str]:
    """Every Authentication-Results field of C{msg}, unfolded."""
    return [" ".join(v.split()) for v in msg.get_all("Authentication-Results") or []]


class _Authentication(unittest.TestCase):
    """A mail server and the DNS server it asks, per class."""

    timeout = 120
    extra = ""
    key: SenderKey
    server: MailServer
    dns_port: int

    @classmethod
    def setUpClass(cls) -> None:
        cls.key = SenderKey()
        cls.dns_port = udp_port()
        cls.tmp = tempfile.TemporaryDirectory(prefix="authres-e2e-")
        config = f'[dns]\nnameservers = ["127.0.0.1:{cls.dns_port}"]\n[policy]\n{cls.extra}'
        cls.server = MailServer(Path(cls.tmp.name), extra=config)
        try:
            cls.server.add_user(ALICE)
            cls.server.start()
        except BaseException:
            cls.server.close()
            cls.tmp.cleanup()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.close()
        cls.tmp.cleanup()

    def setUp(self) -> None:
        from twisted.internet import reactor

        # The zone listens on the port the server was told, for this test only.
        port = start_zone(reactor, self.key, self.dns_port)
        self.addCleanup(port.stopListening)

    def deliver(self, sender: str, data: bytes, helo: str = "client.test") -> Any:
        return threads.deferToThread(send, self.server.ports["smtp"], sender, data, helo)

    def one(self, subject: str, folder: str = "INBOX") -> Any:
        path = self.server.inbox(ALICE).parent / folder
        [msg] = stored(path, subject)
        return msg

    def field(self, subject: str, folder: str = "INBOX") -> str:
        """The one Authentication-Results field of the stored message."""
        msg = self.one(subject, folder)
        [value] = results_of(msg)
        self.assertTrue(value.startswith("mx.example.test; "), value)
        return value


class DefaultPolicy(_Authentication):
    """spf_reject = false, dmarc_reject = true (the defaults)."""

    async def test_signed_mail_from_an_spf_host_passes_all(self) -> None:
        data = self.key.sign(message("Bob <bob@good.test>", "all pass"), "good.test")
        code, _ = await self.deliver("bob@good.test", data)
        self.assertEqual(code, 250)
        value = self.field("all pass")
        self.assertIn("spf=pass", value)
        self.assertIn("smtp.mailfrom=bob@good.test", value)
        self.assertIn("dkim=pass header.d=good.test header.s=sel header.b=", value)
        self.assertIn("dmarc=pass header.from=good.test", value)
        self.assertIn("arc=none", value)

    async def test_the_field_is_placed_below_our_received_field(self) -> None:
        data = self.key.sign(message("bob@good.test", "placed"), "good.test")
        await self.deliver("bob@good.test", data)
        names = [name.lower() for name, _ in self.one("placed").items()]
        first = names.index("received")
        self.assertEqual(names[first + 1], "authentication-results")

    async def test_spf_fail_is_reported_not_refused(self) -> None:
        # DKIM aligned with From: keeps DMARC passing; SPF fails for the envelope.
        data = self.key.sign(message("bob@good.test", "spf fail"), "good.test")
        code, _ = await self.deliver("bob@fail.test", data)
        self.assertEqual(code, 250)
        value = self.field("spf fail")
        self.assertIn("spf=fail", value)
        self.assertIn("smtp.mailfrom=bob@fail.test", value)
        self.assertIn("dmarc=pass", value)

    async def test_spf_softfail_none_and_temperror(self) -> None:
        for sender, subject, result in [
            ("bob@soft.test", "softfail", "spf=softfail"),
            ("bob@none.test", "none", "spf=none"),
            ("bob@broken.test", "temperror", "spf=temperror"),
        ]:
            data = self.key.sign(message("bob@good.test", subject), "good.test")
            code, text = await self.deliver(sender, data)
            self.assertEqual(code, 250, text)
            value = self.field(subject)
            self.assertIn(f"{result} ", value)
            self.assertIn(f"smtp.mailfrom={sender}", value)

    async def test_null_sender_is_checked_by_its_helo_name(self) -> None:
        # RFC 7208 2.4: MAIL FROM:<> uses the HELO identity.
        data = message("MAILER-DAEMON@good.test", "bounce")
        code, _ = await self.deliver("", data, helo="good.test")
        self.assertEqual(code, 250)
        value = self.field("bounce")
        self.assertIn("spf=pass", value)
        self.assertIn("smtp.helo=good.test", value)

    async def test_a_modified_body_fails_dkim(self) -> None:
        data = self.key.sign(message("bob@good.test", "modified"), "good.test")
        data = data.replace(b"Hello.", b"Hello, changed.")
        code, _ = await self.deliver("bob@good.test", data)
        self.assertEqual(code, 250)
        value = self.field("modified")
        self.assertIn("dkim=fail", value)
        self.assertIn("header.d=good.test", value)
        self.assertIn("dmarc=pass", value)  # SPF still aligned

    async def test_dmarc_reject_is_refused(self) -> None:
        data = message("bob@soft.test", "dmarc reject")
        code, text = await self.deliver("bob@soft.test", data)
        self.assertEqual((code, text), (550, "5.7.1 Email rejected per DMARC policy for soft.test"))
        self.assertEqual(stored(self.server.inbox(ALICE), "dmarc reject"), [])

    async def test_a_signature_of_another_domain_does_not_align(self) -> None:
        # other.test's SPF passes but From: is soft.test: not aligned, refused.
        data = self.key.sign(message("bob@soft.test", "unaligned"), "good.test")
        code, text = await self.deliver("bob@other.test", data)
        self.assertEqual(code, 550, text)

    async def test_dmarc_quarantine_files_into_junk(self) -> None:
        await threads.deferToThread(self._make_junk_folder)
        code, _ = await self.deliver("bob@quarantine.test", message("bob@quarantine.test", "q"))
        self.assertEqual(code, 250)
        self.assertEqual(stored(self.server.inbox(ALICE), "q"), [])
        value = self.field("q", folder="Junk")
        self.assertIn("dmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.test", value)

    def _make_junk_folder(self) -> None:
        m = imaplib.IMAP4("127.0.0.1", self.server.ports["imap"], timeout=30)
        try:
            m.login(ALICE, PASSWORD)  # the first login makes the special folders
            typ, _ = m.select("Junk")
            assert typ == "OK"
        finally:
            m.logout()

    async def test_authentication_results_from_outside_are_removed(self) -> None:
        forged = (
            "Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=bob@soft.test;\r\n"
            "\tdkim=pass header.d=soft.test\r\n"
            "Authentication-Results: elsewhere.test; dmarc=pass header.from=soft.test\r\n"
        )
        data = self.key.sign(message("bob@good.test", "forged", extra=forged), "good.test")
        code, _ = await self.deliver("bob@soft.test", data)
        self.assertEqual(code, 250)
        msg = self.one("forged")
        [value] = results_of(msg)  # ours alone
        self.assertIn("spf=softfail", value)
        self.assertNotIn("header.d=soft.test", value)
        self.assertNotIn(b"elsewhere.test", msg.as_bytes())

    async def test_an_arc_chain_is_verified_and_kept(self) -> None:
        data = arc_sealed(self.key, self.key.sign(message("bob@good.test", "arc"), "good.test"))
        code, _ = await self.deliver("bob@good.test", data)
        self.assertEqual(code, 250)
        self.assertIn("arc=pass", self.field("arc"))
        msg = self.one("arc")
        self.assertEqual(len(msg.get_all("ARC-Seal")), 1)
        self.assertEqual(len(msg.get_all("ARC-Authentication-Results")), 1)


class RejectOnSpf(_Authentication):
    """spf_reject = true, dmarc_reject = false."""

    extra = "spf_reject = true\ndmarc_reject = false\n"

    async def test_spf_fail_is_refused_at_mail(self) -> None:
        code, text = await self.deliver("bob@fail.test", message("bob@fail.test", "x"))
        # RFC 7372 3.2, RFC 7208 8.4
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith("5.7.23 SPF validation failed: fail.test"), text)

    async def test_spf_temperror_is_deferred_at_mail(self) -> None:
        code, text = await self.deliver("bob@broken.test", message("bob@broken.test", "x"))
        self.assertEqual(code, 451)  # RFC 7208 8.6
        self.assertTrue(text.startswith("4.7.24 "), text)

    async def test_spf_pass_and_softfail_are_taken(self) -> None:
        data = self.key.sign(message("bob@good.test", "taken"), "good.test")
        code, _ = await self.deliver("bob@good.test", data)
        self.assertEqual(code, 250)
        self.assertIn("spf=pass", self.field("taken"))

    async def test_dmarc_reject_is_only_reported(self) -> None:
        code, _ = await self.deliver("bob@soft.test", message("bob@soft.test", "reported"))
        self.assertEqual(code, 250)
        value = self.field("reported")
        self.assertIn("spf=softfail", value)
        self.assertIn("dmarc=fail (p=reject dis=reject) header.from=soft.test", value)
