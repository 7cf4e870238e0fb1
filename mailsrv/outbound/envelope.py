"""
The envelope of a queued message: its sender, its recipients and where
each one's delivery stands, its times and attempts; stored as JSON in the
queue file (see L{mailsrv.outbound.queue} for the files).
"""

from __future__ import annotations

import itertools
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

PENDING = "pending"
SENT = "sent"
FAILED = "failed"


@dataclass
class Recipient:
    """One recipient of a queued message and where its delivery stands."""

    address: str
    state: str = PENDING  # pending | sent | failed
    attempts: int = 0
    status: str = ""  # RFC 3463 enhanced status of the last result, e.g. 5.1.1
    reply: str = ""  # the remote server's reply (code and text), or our reason
    remote: str = ""  # the remote host that gave it
    last_attempt: float = 0.0
    notified: bool = False  # a failure DSN has been sent for it


@dataclass
class Envelope:
    """The envelope of a queued message: what the relayer needs, as stored."""

    id: str
    sender: str  # '' for the null sender <>
    recipients: list[Recipient]
    created: float
    next_attempt: float
    attempts: int = 0
    last_error: str = ""
    warned: bool = False  # the "delayed" DSN has been sent
    size: int = 0
    # Received with SMTPUTF8 (RFC 6531 3.4): the message may need a next hop
    # that offers it. Absent from older queue files: False; written only when
    # True, so that a queue file of an ordinary message stays readable by the
    # version before (which knows no such key).
    smtputf8: bool = False
    # Keys this version does not know (written by a later one): kept as they
    # are and written back, never dropped.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Where the message starts in its queue file (not stored: the file's
    # first line gives it).
    offset: int = field(default=0, compare=False)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def to_dict(self) -> dict[str, Any]:
        """The envelope as plain JSON-able data (what L{to_json} writes)."""
        raw: dict[str, Any] = dict(self.extra)
        raw.update((name, getattr(self, name)) for name in _ENVELOPE_FIELDS)
        if not self.smtputf8:
            del raw["smtputf8"]
        raw["version"] = 1
        raw["recipients"] = [dict(vars(r)) for r in self.recipients]
        return raw

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, raw: Any, offset: int = 0) -> Envelope:
        if not isinstance(raw, dict):
            raise ValueError("an envelope is a JSON object")
        raw = dict(raw)
        raw.pop("version", None)
        raw.pop("offset", None)
        raw.pop("extra", None)
        known = {name: raw.pop(name) for name in (*_ENVELOPE_FIELDS, "recipients") if name in raw}
        known["recipients"] = [
            Recipient(**{k: v for k, v in r.items() if k in _RECIPIENT_FIELDS})
            for r in known["recipients"]
        ]
        return cls(**known, extra=raw, offset=offset)

    @classmethod
    def from_json(cls, data: bytes, offset: int = 0) -> Envelope:
        return cls.from_dict(json.loads(data), offset)


_ENVELOPE_FIELDS = (
    "id",
    "sender",
    "created",
    "next_attempt",
    "attempts",
    "last_error",
    "warned",
    "size",
    "smtputf8",
)


_RECIPIENT_FIELDS = frozenset(Recipient.__dataclass_fields__)


_sequence = itertools.count(secrets.randbits(24))


def new_queue_id(now: float) -> str:
    """A unique id that sorts by arrival: microseconds in hex, then a counter from a random start."""
    return f"{int(now * 1_000_000):014X}{next(_sequence) & 0xFFFFFF:06X}"
