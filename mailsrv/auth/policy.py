"""When a protocol may accept a password in clear text."""

from __future__ import annotations

import ipaddress

from twisted.internet.interfaces import ISSLTransport


def is_tls(transport) -> bool:
    """Whether the connection is encrypted (STARTTLS done, or implicit TLS)."""
    return ISSLTransport.providedBy(transport)


def is_loopback(transport) -> bool:
    """Whether the peer is on a loopback address (or a UNIX socket)."""
    peer = transport.getPeer()
    host = getattr(peer, "host", None)
    if host is None:
        return True  # UNIX sockets and in-memory transports
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def peer_host(transport) -> str:
    peer = transport.getPeer()
    return str(getattr(peer, "host", "local"))


def cleartext_allowed(policy: str, transport) -> bool:
    """
    Like Dovecot's disable_plaintext_auth: "always" allows passwords on any
    connection, "loopback" on TLS or loopback connections, "never" on TLS only.
    """
    if is_tls(transport) or policy == "always":
        return True
    return policy == "loopback" and is_loopback(transport)
