"""
The lines Postfix's smtpd writes about each SMTP connection, in its shapes:
C{connect from NAME[IP]}, C{Anonymous TLS connection established from
NAME[IP]: TLSv1.3 with cipher ... (256/256 bits)} once a handshake
completes, and C{disconnect from NAME[IP] ehlo=1 mail=1 rcpt=0/1 ...
commands=3/4} at the end (per command, how many succeeded out of how many
were given; one number when all succeeded). NAME is the client's
forward-confirmed reverse DNS name, or C{unknown}.
"""

from __future__ import annotations

from typing import Any

from mailsrv.logsafe import SafeLogger
from mailsrv.smtp.received import tls_description

# Replies that leave a command under way (DATA's go-ahead, an AUTH challenge).
_INTERMEDIATE = frozenset({334, 354})


class SessionLog:
    """Counts one session's commands and writes its connect, TLS and disconnect lines."""

    log = SafeLogger()

    def __init__(self, client: str, client_name: str | None) -> None:
        self.client = client
        self.client_name = client_name or "unknown"
        self._given: dict[str, int] = {}  # by command, in the order first given
        self._ok: dict[str, int] = {}
        self._pending: str | None = None  # the command whose reply comes next

    def connected(self) -> None:
        self.log.info(
            "connect from {client_name}[{client}]",
            client_name=self.client_name,
            client=self.client,
        )

    def tls_established(self, transport: Any) -> None:
        """The TLS handshake on C{transport} completed."""
        description = tls_description(transport)
        if description is None:
            return
        self.log.info(
            "Anonymous TLS connection established from {client_name}[{client}]: {tls}",
            client_name=self.client_name,
            client=self.client,
            tls=description.removeprefix("using "),
        )

    def command(self, verb: bytes) -> None:
        """The client gave the command C{verb} (a known one)."""
        name = verb.decode("ascii", "replace").lower()
        self._given[name] = self._given.get(name, 0) + 1
        self._pending = name

    def replied(self, code: int) -> None:
        """A reply with C{code} went out: the final one decides the command's success."""
        name = self._pending
        if name is None or code in _INTERMEDIATE:
            return
        self._pending = None
        if code < 400:
            self._ok[name] = self._ok.get(name, 0) + 1

    def disconnected(self) -> None:
        counts = []
        for name, given in self._given.items():
            ok = self._ok.get(name, 0)
            counts.append(f"{name}={given}" if ok == given else f"{name}={ok}/{given}")
        given = sum(self._given.values())
        ok = sum(self._ok.values())
        counts.append(f"commands={given}" if ok == given else f"commands={ok}/{given}")
        self.log.info(
            "disconnect from {client_name}[{client}] {counts}",
            client_name=self.client_name,
            client=self.client,
            counts=" ".join(counts),
            commands=dict(self._given),
            succeeded=dict(self._ok),
        )
