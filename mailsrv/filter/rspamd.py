"""
A client of rspamd over its HTTP protocol: the message is POSTed to
C{/checkv2} as the body, the envelope in the fields rspamd reads (C{IP},
C{Helo}, C{From}, C{Rcpt}, C{User}, C{Queue-Id}); rspamd answers with JSON
whose C{action} and C{score} give the verdict.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mailsrv.filter.verdict import (
    ACCEPT,
    DEFER,
    JUNK,
    REJECT,
    Envelope,
    FilterError,
    IFilter,
    Thresholds,
    Verdict,
    header_field,
    status_fields,
)

# rspamd's actions (rspamd's "Actions and scores" page) -> ours.
ACTIONS = {
    "no action": ACCEPT,
    "greylist": DEFER,
    "soft reject": DEFER,
    "add header": JUNK,
    "rewrite subject": JUNK,
    "reject": REJECT,
}


def request_headers(envelope: Envelope) -> Headers:
    """The HTTP fields that tell rspamd the envelope."""
    h = Headers()
    h.addRawHeader(b"IP", envelope.client_ip.encode("ascii", "replace"))
    if envelope.helo:
        h.addRawHeader(b"Helo", envelope.helo.encode("ascii", "replace"))
    if envelope.client_name:
        h.addRawHeader(b"Hostname", envelope.client_name.encode("ascii", "replace"))
    h.addRawHeader(b"From", envelope.sender.encode("utf-8"))
    for rcpt in envelope.recipients:
        h.addRawHeader(b"Rcpt", rcpt.encode("utf-8"))
    if envelope.user:
        h.addRawHeader(b"User", envelope.user.encode("utf-8"))
    h.addRawHeader(b"Queue-Id", envelope.queue_id.encode("ascii", "replace"))
    return h


def parse_result(body: bytes, thresholds: Thresholds) -> Verdict:
    """The verdict in rspamd's JSON answer; L{FilterError} when it is not one."""
    try:
        result = json.loads(body)
        daemon_action = ACTIONS[result["action"]]
        score = float(result["score"])
        required = result.get("required_score")
        required = None if required is None else float(required)
    except (ValueError, KeyError, TypeError) as e:
        raise FilterError(f"not an rspamd answer: {e}")
    action = thresholds.action(score, daemon_action)
    symbols = sorted(result.get("symbols") or {})
    fields = status_fields(action in (JUNK, REJECT), score, required, symbols)
    fields += header_field("X-Rspamd-Action", str(result["action"]))
    messages = result.get("messages") or {}
    reason = messages.get("smtp_message", "") if isinstance(messages, dict) else ""
    return Verdict(action, fields, reason=str(reason), score=score)


@implementer(IFilter)
class RspamdFilter:
    """The spam filter step with rspamd at C{url} (its normal worker, port 11333)."""

    def __init__(self, reactor: Any, url: str, thresholds: Thresholds) -> None:
        self.agent = Agent(reactor)
        self.url = url.rstrip("/") + "/checkv2"
        self.thresholds = thresholds

    def check(self, message_source: Any, envelope: Envelope) -> defer.Deferred:
        """POST the message; fires with a L{Verdict}; cancelling drops the request."""
        f = message_source.open()
        d: Any = self.agent.request(
            b"POST",
            self.url.encode("ascii"),
            request_headers(envelope),
            FileBodyProducer(f),
        )

        def answered(response: Any) -> defer.Deferred:
            if response.code != 200:
                response.deliverBody(protocol.Protocol())
                raise FilterError(f"rspamd answered HTTP {response.code}")
            body = _Body()
            response.deliverBody(body)
            return body.done

        def closed(result: Any) -> Any:
            f.close()
            return result

        d.addCallback(answered)
        d.addCallback(parse_result, self.thresholds)
        d.addErrback(_unreachable)
        d.addBoth(closed)
        return d


class _Body(protocol.Protocol):
    """Collects a response body, at most 1 MiB (rspamd's answers are a few kB)."""

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size <= 1024 * 1024:
            self._parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._size > 1024 * 1024:
            self.done.errback(FilterError("rspamd's answer is over 1 MiB"))
        elif reason.check(ResponseDone):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


def _unreachable(failure: Failure) -> Failure:
    if failure.check(FilterError, defer.CancelledError):
        return failure
    raise FilterError(f"rspamd: {failure.getErrorMessage()}")
