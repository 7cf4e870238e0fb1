"""
Why the server cannot start, said in one line that names the setting, its
value and the config file, instead of a traceback; and the start-up checks
that find such problems before a client would.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from types import TracebackType
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IPushProducer, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.atomic import make_dirs
from mailsrv.auth.passwd import PasswordFile
from mailsrv.config import Config, endpoint_port
from mailsrv.fdlimit import raise_open_files_limit
from mailsrv.interfaces import IMailStore
from mailsrv.outbound.process import logs_to_stdout
from mailsrv.store.restored import MARK, renew_after_restore
from mailsrv.store.upgrade import OldNames, SpellingCollision, check_user_names


class StartupError(Exception):
    """A setting the server cannot start with: C{key} = C{value} in the file C{path}."""

    def __init__(self, path: str, key: str, value: object, reason: str) -> None:
        super().__init__(path, key, value, reason)
        self.path = path
        self.key = key
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        where = "the built-in default configuration" if self.path == "<default>" else self.path
        return f'{self.key} = "{self.value}" in {where}: {self.reason}'


def os_reason(e: OSError, value: object = None) -> str:
    """An OS error as an administrator reads it: the text, and the file unless it is C{value}."""
    text = e.strerror or str(e)
    if e.filename and str(e.filename) != str(value):
        return f"{text}: {e.filename}"
    return text


def make_data_dirs(config: Config) -> None:
    """Create the data folders and check that this process can write there."""
    folders = (config.server.data_dir, config.mail_dir, config.index_dir, config.spool_dir)
    try:
        for d in folders:
            make_dirs(d)
        # Root passes permission checks, not a read-only file system: try.
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=config.spool_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        data_dir = config.server.data_dir
        raise StartupError(config.path, "server.data_dir", data_dir, os_reason(e, data_dir))


def upgrade_data(config: Config) -> None:
    """
    Before the store opens anything: folders an older version named with
    another spelling of their user's address end start-up, with the
    commands that settle them (L{mailsrv.store.upgrade}), as do two
    password-file lines that are now one user: serving the new name would
    hide the user's mail. Folders under an old spelling of nobody are logged.
    A data folder restored from a backup gets new UIDVALIDITYs
    (L{mailsrv.store.restored}).
    """
    passwd = config.auth.passwd_file
    try:
        orphans = check_user_names(config.server.data_dir, PasswordFile(passwd))
    except SpellingCollision as e:
        raise StartupError(config.path, "auth.passwd_file", passwd, str(e))
    except OldNames as e:
        raise StartupError(config.path, "server.data_dir", config.server.data_dir, str(e))
    for orphan in orphans:
        Logger().warn("{orphan}", orphan=orphan)
    _renew_restored(config)


def _renew_restored(config: Config) -> None:
    """The restore step: new UIDVALIDITYs if the data folder holds a backup's mark."""
    data_dir = config.server.data_dir
    try:
        renewed = renew_after_restore(data_dir, config.index_dir)
    except (OSError, sqlite3.Error) as e:
        reason = os_reason(e, data_dir) if isinstance(e, OSError) else str(e)
        raise StartupError(
            config.path,
            "server.data_dir",
            data_dir,
            f"renewing UIDVALIDITY after a restore: {reason}",
        )
    if renewed is not None:
        Logger().info(
            "data folder restored from a backup ({mark} in {data_dir}): {count} folders got a new"
            " UIDVALIDITY (RFC 3501 2.3.1.1: UIDs given since the backup are given again);"
            " IMAP and POP3 clients download them once again",
            mark=MARK,
            data_dir=str(data_dir),
            count=renewed,
        )


class StartGate:
    """
    Holds the listening ports unread until start-up work is done: they are
    bound at the usual time (a port below 1024 before privileges are dropped,
    a port in use still ends start-up at once), but connections wait in the
    kernel's backlog and no session starts before L{open}.
    """

    def __init__(self) -> None:
        self.is_open = False
        self._held: list[IPushProducer] = []
        self._waiting: list[Callable[[], object]] = []

    def hold(self, port: Any) -> Any:
        """Pause C{port} (an L{IListeningPort}) until the gate opens."""
        producer = IPushProducer(port, None)
        if not self.is_open and producer is not None:
            producer.pauseProducing()
            self._held.append(producer)
        return port

    def open(self) -> None:
        """Let the held ports accept connections (those not stopped meanwhile)."""
        self.is_open = True
        held, self._held = self._held, []
        for producer in held:
            producer.resumeProducing()
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            call()

    def when_open(self, call: Callable[[], object]) -> None:
        """Call C{call} once the held ports accept (at once if they do already)."""
        if self.is_open:
            call()
        else:
            self._waiting.append(call)


@implementer(IStreamServerEndpoint)
class GatedEndpoint:
    """An endpoint whose listening port waits for a L{StartGate}."""

    def __init__(self, endpoint: IStreamServerEndpoint, gate: StartGate) -> None:
        self.endpoint = endpoint
        self.gate = gate

    def listen(self, protocolFactory: Any) -> defer.Deferred:
        return self.endpoint.listen(protocolFactory).addCallback(self.gate.hold)


class RecoveryService(service.Service):
    """
    At start-up, before the listeners accept (L{StartGate}): finish the mbox
    rewrites a crash interrupted (L{IMailStore.recover_pending}), on the
    store's thread pool, so other programs see whole files at once.
    """

    log = Logger()

    def __init__(self, store: IMailStore, gate: StartGate) -> None:
        self.store = store
        self.gate = gate

    def startService(self) -> None:
        super().startService()
        d = defer.maybeDeferred(self.store.recover_pending)

        def failed(f: Any) -> None:
            self.log.failure("start-up recovery failed", f)

        d.addErrback(failed).addBoth(lambda _: self.gate.open())


class StartupGuard(service.MultiService):
    """
    The server's top service: a listener that cannot listen (port in use,
    no permission for a port below 1024) ends start-up with a L{StartupError}
    naming its C{listen} key, instead of a traceback. C{run_as}: the uid and
    gid twistd switches to once every port is bound (L{mailsrv.privileges}),
    set on the application it joins unless twistd's C{--uid} says otherwise.
    """

    log = Logger()

    def __init__(self, config: Config, run_as: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.run_as = run_as

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        process = service.IProcess(parent, None)
        if self.run_as is not None and process is not None:
            # twistd's --uid and --gid, when given, still come first.
            if process.uid is None:
                process.uid = self.run_as[0]
            if process.gid is None:
                process.gid = self.run_as[1]

    def privilegedStartService(self) -> None:
        raise_open_files_limit(self.config.policy.max_connections)  # before any port opens
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            error = self.listen_error(e)
            if not logs_to_stdout():  # else the line on standard error is enough
                self.log.critical("cannot start: {error}", error=str(error))
            raise error from None

    def listen_error(self, e: CannotListenError) -> StartupError:
        socket_error = e.socketError
        reason = os_reason(socket_error) if isinstance(socket_error, OSError) else str(socket_error)
        for name, descriptions in self.config.listen.items():
            for description in descriptions:
                if endpoint_port(description) == e.port:
                    return StartupError(self.config.path, f"listen.{name}", description, reason)
        return StartupError(self.config.path, "listen", f"{e.interface}:{e.port}", reason)


def report_startup_errors() -> None:
    """
    Make a L{StartupError} that ends the process print one line on standard
    error, not a traceback. twistd lets an error of the start-up propagate
    (after removing its pid file and telling a daemon's parent), so the
    process's last word is the place for it.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> Any:
        if isinstance(value, StartupError):
            err = sys.__stderr__ or sys.stderr
            print(f"mailsrv: cannot start: {value}", file=err, flush=True)
            return None
        return previous(kind, value, tb)

    sys.excepthook = hook
