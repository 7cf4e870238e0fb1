"""
What the sender authentication tests share: a sender's DKIM key made here
and messages signed with dkimpy as another server would sign them, and a
real twisted.names DNS server on loopback serving the SPF, DKIM and DMARC
records of the test domains (names under broken.test answer SERVFAIL).
"""

from __future__ import annotations

import base64
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.names import dns, server

from tests.test_outbound_support import MemoryAuthority

SELECTOR = "sel"
CLIENT = "127.0.0.1"


class SenderKey:
    """An RSA-2048 key of a sending domain, and its TXT record (RFC 6376 3.6.1)."""

    def __init__(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()

    def sign(self, message: bytes, domain: str) -> bytes:
        """C{message} with the DKIM-Signature field dkimpy makes for C{domain} first."""
        field = dkim.sign(
            message,
            SELECTOR.encode(),
            domain.encode(),
            self.private,
            canonicalize=(b"relaxed", b"simple"),
            include_headers=[b"from", b"to", b"subject"],
        )
        return field + message


def arc_sealed(key: SenderKey, data: bytes) -> bytes:
    """C{data} with the ARC set lists.test adds as it forwards it (RFC 8617 5.1)."""
    received = b"Authentication-Results: lists.test; dkim=pass header.d=good.test\r\n" + data
    sets = dkim.arc_sign(received, SELECTOR.encode(), b"lists.test", key.private, b"lists.test")
    return b"".join(sets) + received


def message(sender: str, subject: str, body: str = "Hello.\r\n", extra: str = "") -> bytes:
    """A plain message from C{sender} (CRLF line ends)."""
    return (
        f"From: {sender}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n{extra}\r\n{body}"
    ).encode()


def txt(value: str) -> Any:
    """A TXT record, cut into strings of at most 255 octets (RFC 1035 3.3.14)."""
    data = value.encode()
    return dns.Record_TXT(*[data[i : i + 255] for i in range(0, len(data), 255)], ttl=1)


def records(key: SenderKey) -> list[tuple[str, Any]]:
    """The zone: a domain per case, named for what its records make of a client on 127.0.0.1."""
    spf_pass = txt("v=spf1 ip4:127.0.0.0/8 -all")
    spf_fail = txt("v=spf1 ip4:192.0.2.1 -all")
    spf_soft = txt("v=spf1 ip4:192.0.2.1 ~all")
    return [
        # SPF pass, DKIM key, DMARC p=reject: a well-kept domain.
        ("good.test", spf_pass),
        (f"{SELECTOR}._domainkey.good.test", txt(key.record)),
        ("_dmarc.good.test", txt("v=DMARC1; p=reject")),
        # SPF fail (-all), p=reject.
        ("fail.test", spf_fail),
        ("_dmarc.fail.test", txt("v=DMARC1; p=reject")),
        # SPF softfail (~all), p=reject.
        ("soft.test", spf_soft),
        ("_dmarc.soft.test", txt("v=DMARC1; p=reject")),
        # SPF softfail, p=quarantine.
        ("quarantine.test", spf_soft),
        ("_dmarc.quarantine.test", txt("v=DMARC1; p=quarantine")),
        # No SPF record, no DMARC record (a name with an address only).
        ("none.test", dns.Record_A("192.0.2.9", ttl=1)),
        # A mailing list that seals what it forwards with ARC (RFC 8617).
        (f"{SELECTOR}._domainkey.lists.test", txt(key.record)),
        # SPF pass, DKIM key, p=reject: mail from here may be signed by good.test only.
        ("other.test", spf_pass),
        ("_dmarc.other.test", txt("v=DMARC1; p=reject")),
    ]


class _Broken(Exception):
    """A name of the zone that is made to fail."""


class _Authority(MemoryAuthority):
    """The test zone, where every name under broken.test fails (SERVFAIL)."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        if name.lower().endswith(b"broken.test"):
            return defer.fail(_Broken(name))
        return super()._lookup(name, cls, type, timeout)


class _Server(server.DNSServerFactory):
    """Answers SERVFAIL for the broken names without logging an error."""

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        if not failure.check(_Broken):
            return super().gotResolverError(failure, protocol, message, address)
        response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
        self.sendReply(protocol, response, address)


def start_zone(reactor: Any, key: SenderKey, port: int = 0) -> Any:
    """The DNS server on UDP 127.0.0.1:C{port} (0: any); stopListening to clean up."""
    factory = _Server(authorities=[_Authority("test", records(key))])
    factory.noisy = False
    udp = dns.DNSDatagramProtocol(controller=factory)
    udp.noisy = False
    return reactor.listenUDP(port, udp, interface="127.0.0.1")
