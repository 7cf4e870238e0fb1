"""
The L{IMessageTrainer}s: how each spam filter is taught one message.

  - rspamd: the message POSTed to its controller worker (port 11334, not
    the normal worker's 11333) at C{/learnspam} or C{/learnham}, with the
    controller's password in the C{Password} field (rspamd's "Controller
    HTTP endpoints"; what C{rspamc learn_spam} does). rspamd answers 200
    when learnt; an error JSON (C{{"error": ...}}) otherwise, with 208 when
    the message was learnt before.
  - spamd: a C{TELL} request of the spamc protocol (SPAMC/1.5, spamd's
    PROTOCOL file) with C{Message-class: spam|ham} and C{Set: local}:
    Bayes learning, as C{spamc -L spam|ham} does. spamd must run with
    C{--allow-tell}; it answers C{DidSet: local} when it learnt, nothing
    when it knew the message already.
  - a command: the message on its standard input, C{MESSAGE_CLASS=spam|ham}
    and C{USER_NAME} in its environment, and any argument C{{class}}
    replaced by C{spam} or C{ham} (C{["/usr/bin/sa-learn", "--{class}"]});
    exit status 0 is learnt.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mailsrv.filter.learn import IMessageTrainer, TrainingQueue
from mailsrv.filter.verdict import FilterError

RSPAMD_CONTROLLER_PORT = 11334
_MAX_ANSWER = 64 * 1024


@implementer(IMessageTrainer)
class RspamdTrainer:
    """rspamd's controller at C{url} (e.g. C{http://127.0.0.1:11334}), with C{password}."""

    def __init__(self, reactor: Any, url: str, password: str | None) -> None:
        self.agent = Agent(reactor)
        self.url = url.rstrip("/")
        self.password = password

    def learn(self, message: bytes, message_class: str, user: str) -> defer.Deferred:
        headers = Headers()
        if self.password is not None:
            headers.addRawHeader(b"Password", self.password.encode("utf-8"))
        url = f"{self.url}/learn{message_class}".encode("ascii")
        d = self.agent.request(b"POST", url, headers, FileBodyProducer(io.BytesIO(message)))

        def answered(response: Any) -> defer.Deferred:
            body = _Answer()
            response.deliverBody(body)
            return body.done.addCallback(_rspamd_outcome, response.code)

        d.addCallback(answered)
        d.addErrback(_unreachable, "rspamd controller")
        return d


class _Answer(protocol.Protocol):
    """Collects a response body, its first 64 KiB (rspamd's answers are a line of JSON)."""

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size < _MAX_ANSWER:
            self._parts.append(data)
            self._size += len(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


def _rspamd_outcome(body: bytes, code: int) -> str:
    try:
        answer = json.loads(body[:_MAX_ANSWER])
    except ValueError:
        answer = {}
    if code == 200:
        return "learnt"
    message = str(answer.get("error", "")) if isinstance(answer, dict) else ""
    if code == 208:  # rspamd: "<id> has been already learned as spam, ignore it"
        return "already learnt"
    raise FilterError(f"rspamd answered HTTP {code} {message[:200]}".rstrip())


def tell_request(message: bytes, message_class: str, user: str | None) -> bytes:
    """A spamc TELL request (SPAMC/1.5) that learns C{message} as C{message_class}."""
    head = (
        "TELL SPAMC/1.5\r\n"
        f"Message-class: {message_class}\r\n"
        "Set: local\r\n"
        f"Content-length: {len(message)}\r\n"
    )
    if user:
        head += f"User: {user}\r\n"
    return head.encode("ascii", "replace") + b"\r\n" + message


def parse_tell_response(data: bytes) -> str:
    """The outcome of a whole spamd answer to TELL; L{FilterError} if it is an error."""
    head = data.partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith(b"SPAMD/"):
        raise FilterError(f"not a spamd answer: {lines[0][:80]!r}")
    if status[1] != b"0":  # EX_OK; else a sysexits code (69: TELL not allowed)
        raise FilterError(f"spamd error: {b' '.join(status[1:])[:120]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"didset" and b"local" in value.lower():
            return "learnt"
    return "already learnt"


class _TellProtocol(protocol.Protocol):
    """One TELL request: the request out, spamd's answer in until it closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.done: defer.Deferred = defer.Deferred()
        self._data: list[bytes] = []
        self._size = 0

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self._size < _MAX_ANSWER:
            self._data.append(data)
            self._size += len(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        try:
            self.done.callback(parse_tell_response(b"".join(self._data)))
        except FilterError:
            self.done.errback()


@implementer(IMessageTrainer)
class SpamdTrainer:
    """SpamAssassin's spamd at C{host}:C{port}, started with C{--allow-tell}."""

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port

    def learn(self, message: bytes, message_class: str, user: str) -> defer.Deferred:
        proto = _TellProtocol(tell_request(message, message_class, user))
        connecting: Any = connectProtocol(
            TCP4ClientEndpoint(self.reactor, self.host, self.port), proto
        )

        def cancel(d: defer.Deferred) -> None:
            connecting.cancel()
            transport: Any = proto.transport
            if transport is not None:
                transport.abortConnection()

        result: defer.Deferred = defer.Deferred(cancel)
        connecting.addCallback(lambda p: p.done)
        connecting.addErrback(_unreachable, "spamd")
        connecting.chainDeferred(result)
        return result


class _LearnProcess(protocol.ProcessProtocol):
    """One run of the learn command: the message in, its exit status out."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.done: defer.Deferred = defer.Deferred(self._cancel)
        self._err = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.message)
        transport.closeStdin()

    def errReceived(self, data: bytes) -> None:
        if len(self._err) < 4096:
            self._err += data

    def processEnded(self, reason: Failure) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, error.ProcessDone):
            self.done.callback("learnt")
            return
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        first = self._err.decode("utf-8", "replace").strip().partition("\n")[0][:200]
        how = f"killed by signal {signal}" if code is None else f"exited {code}"
        self.done.errback(FilterError(f"learn command {how}: {first}".rstrip(": ")))

    def _cancel(self, d: defer.Deferred) -> None:
        try:
            transport: Any = self.transport
            transport.signalProcess("KILL")
        except (error.ProcessExitedAlready, AttributeError):
            pass


@implementer(IMessageTrainer)
class CommandTrainer:
    """An external learn command (C{argv}), see the module docstring."""

    def __init__(self, reactor: Any, argv: tuple[str, ...]) -> None:
        self.reactor = reactor
        self.argv = argv

    def learn(self, message: bytes, message_class: str, user: str) -> defer.Deferred:
        proc = _LearnProcess(message)
        argv = [a.replace("{class}", message_class) for a in self.argv]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "MESSAGE_CLASS": message_class,
            "USER_NAME": user,
        }
        try:
            self.reactor.spawnProcess(proc, argv[0], argv, env=env)
        except OSError as e:
            return defer.fail(FilterError(f"cannot run {argv[0]}: {e}"))
        return proc.done


def _unreachable(failure: Failure, who: str) -> Failure:
    if failure.check(FilterError, defer.CancelledError):
        return failure
    raise FilterError(f"{who}: {failure.getErrorMessage()}")


def build_trainer(config: Any, reactor: Any) -> IMessageTrainer | None:
    """The trainer a L{mailsrv.config.FilterConfig} with C{learn = true} names, or None."""
    if config is None or not config.learn:
        return None
    if config.learn_command is not None:
        return CommandTrainer(reactor, config.learn_command)
    if config.rspamd is not None:
        return RspamdTrainer(reactor, config.rspamd_controller, config.rspamd_password)
    if config.spamd is not None:
        host, port = config.spamd
        return SpamdTrainer(reactor, host, port)
    return None


def training_queue(config: Any, reactor: Any, store: Any, run: Any) -> TrainingQueue | None:
    """The L{TrainingQueue} of a L{mailsrv.config.FilterConfig}, or None when it does not learn."""
    trainer = build_trainer(config, reactor)
    if trainer is None:
        return None
    return TrainingQueue(trainer, store, run, reactor, config.timeout)
