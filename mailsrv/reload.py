"""
Reload (SIGHUP, C{systemctl reload}): the config file, the users, the
aliases and the policy network lists are read again and serve every
connection accepted from then on; the sessions already open finish under the
settings they started with, as Postfix's daemons do after C{postfix reload}.

A config file that fails to load is refused: every problem is logged and the
settings in force stay. Settings that only a restart can change (the
listeners, the data folder, the account, the TLS file names, greylisting,
the verifier processes, the training of the spam filter) are named in the
log when they changed, and keep their old values until then. The parts of the server that hold state (the
store, the queue, the disk thread pool, the POP3 maildrop locks, the
greylist, the counters of limits whose settings did not change) are kept;
the parts built from settings are built again (L{next_context}).

The relay process reads its settings once, at its start: when the config
file changed, it is restarted the way it is stopped (the attempts under way
are recorded first), so that the queue stays consistent (see
L{mailsrv.outbound.process.RelayProcessService.restart}).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailsrv import settingsparts
from mailsrv.addresses.aliases import parse_aliases
from mailsrv.addresses.resolver import AddressRules, address_rules
from mailsrv.auth.passwd import PasswordFile, PasswordFileError
from mailsrv.authres.step import sender_authentication
from mailsrv.config import Config, ConfigError, load
from mailsrv.dkim.signer import DkimSigner, load_signer
from mailsrv.filter.step import build_filter
from mailsrv.policy.connections import (
    ConnectionGate,
    adopt,
    connection_limits,
    network_lists,
)
from mailsrv.policy.duplicates import build_duplicates
from mailsrv.policy.listener import GateFactory, ListenerSettings
from mailsrv.policy.networks import NetworkError, NetworkList
from mailsrv.startup import StartupError

if TYPE_CHECKING:
    from mailsrv.service import ServerContext

# The settings only a restart changes: (name in the log, its value in a Config).
_RESTART: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("listen", lambda c: dict(c.listen)),
    ("metrics.listen", lambda c: c.metrics.listen),
    ("log", lambda c: dict(c.raw.get("log", {}))),  # read once, when the log observers start
    ("server.data_dir", lambda c: c.server.data_dir),
    ("server.user", lambda c: c.server.user),
    ("server.group", lambda c: c.server.group),
    ("tls.certificate", lambda c: c.tls.certificate),
    ("tls.key", lambda c: c.tls.key),
    (
        "policy.greylist*",
        lambda c: tuple(
            (f.name, getattr(c.policy, f.name))
            for f in dataclasses.fields(c.policy)
            if f.name.startswith("greylist")
        ),
    ),
    ("policy.authentication_checks", lambda c: c.policy.authentication_checks),
    ("policy.authentication_workers", lambda c: c.policy.authentication_workers),
)


def restart_changes(old: Config, new: Config) -> list[str]:
    """The settings that changed from C{old} to C{new} and need a restart to take effect."""
    return [name for name, value in _RESTART if value(old) != value(new)]


def keep_restart_settings(old: Config, new: Config) -> Config:
    """C{new}, with the values of C{old} for every setting only a restart changes."""
    greylist = {f.name: getattr(old.policy, f.name) for f in dataclasses.fields(old.policy)}
    greylist = {k: v for k, v in greylist.items() if k.startswith("greylist")}
    return dataclasses.replace(
        new,
        listen=old.listen,
        metrics=old.metrics,
        server=dataclasses.replace(
            new.server,
            data_dir=old.server.data_dir,
            user=old.server.user,
            group=old.server.group,
        ),
        tls=old.tls,
        policy=dataclasses.replace(
            new.policy,
            authentication_checks=old.policy.authentication_checks,
            authentication_workers=old.policy.authentication_workers,
            **greylist,
        ),
    )


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What a reload read from disk (on the thread pool), before it is put in force."""

    config: Config  # the new settings, with the old values of the restart-only ones
    restart: list[str]  # the restart-only settings that changed
    changed: bool  # whether the config file's text changed
    addresses: AddressRules
    dkim: DkimSigner | None
    allow: NetworkList
    deny: NetworkList
    passwords: PasswordFile | None = None  # the users, read already


def read_config(path: Path | None, old: Config, ctx: ServerContext) -> Loaded:
    """
    Read the config file at C{path} (None: the built-in default, kept) and the
    files it names that a reload reads again: the aliases, the DKIM keys, the
    network lists. Blocking: for the thread pool. L{ConfigError} lists
    every problem found.
    """
    # The built-in default cannot have changed (and its relative paths
    # would follow the current folder): the files it names are read again.
    new = load(path) if path is not None else old
    restart = restart_changes(old, new)
    config = keep_restart_settings(old, new)
    try:
        allow, deny = network_lists(config.policy)
    except (NetworkError, OSError) as e:
        raise ConfigError(config.path, [f"[policy] network file: {e}"]) from e
    try:
        reactor: Any = ctx.reactor
        dkim = load_signer(config, lambda f: deferToThreadPool(reactor, ctx.threadpool, f))
    except StartupError as e:
        raise ConfigError(config.path, [f"{e.key}: {e.reason}"]) from e
    problems = _unusable_files(config, old, ctx)
    if problems:
        raise ConfigError(config.path, problems)
    passwords = PasswordFile(config.auth.passwd_file, ctx.reactor, ctx.threadpool)
    try:
        passwords.users()  # read now, on this thread
    except PasswordFileError as e:
        raise ConfigError(config.path, [f"auth.passwd_file: {e}"]) from e
    addresses = address_rules(config, ctx.reactor)
    return Loaded(
        config=config,
        restart=restart,
        changed=new.source != old.source,
        addresses=addresses,
        dkim=dkim,
        allow=allow,
        deny=deny,
        passwords=passwords,
    )


def _unusable_files(config: Config, old: Config, ctx: ServerContext) -> list[str]:
    """
    The users and aliases files that the settings in force can read but
    C{config} could not: put in force, they would make every user or alias
    unknown, and mail to them refused for good (RFC 5321 550). A file that is
    missing both before and after is not a problem (none yet).
    """
    problems = []
    users = config.auth.passwd_file
    if not users.exists() and old.auth.passwd_file.exists():
        problems.append(f"auth.passwd_file: {users}: no such file (the users would be unknown)")
    aliases = config.addresses.aliases
    before = ctx.addresses.aliases if ctx.addresses is not None else None
    if not parse_aliases(aliases).readable and (
        aliases.exists() or (before is not None and before.entries)
    ):
        why = "cannot read" if aliases.exists() else "no such file"
        problems.append(f"addresses.aliases: {aliases}: {why} (the aliases would be unknown)")
    return problems


def _same(old: Any, new: Any, *names: str) -> bool:
    return all(getattr(old, n) == getattr(new, n) for n in names)


def _learning(config: Config) -> tuple[object, ...] | None:
    """The [filter] settings the training from IMAP moves is built from."""
    f = config.filter
    if f is None:
        return None
    return (f.learn, f.rspamd_controller, f.rspamd_password, f.learn_command)


def next_context(ctx: ServerContext, loaded: Loaded) -> tuple[ServerContext, list[str]]:
    """
    The context new connections get after a reload to C{loaded}: the
    parts built from settings built again, the parts that hold state kept
    (limit counters too, when their settings did not change). Also returns
    the settings that still need a restart (beyond L{restart_changes}).
    """
    old, config = ctx.config, loaded.config
    reactor: Any = ctx.reactor
    pool = ctx.threadpool
    restart: list[str] = []

    def in_pool(f: Any, *a: Any) -> defer.Deferred:
        return deferToThreadPool(reactor, pool, f, *a)

    # A new password file object, read anew by the reload: a change hidden
    # by the file system's time granularity is seen too.
    passwords = loaded.passwords
    if passwords is None:
        passwords = PasswordFile(config.auth.passwd_file, reactor, pool)
    throttle = ctx.throttle
    same_auth = dataclasses.replace(
        config.auth, passwd_file=old.auth.passwd_file, cleartext=old.auth.cleartext
    )
    if throttle is None or same_auth != old.auth:
        throttle = settingsparts.login_throttle(config, reactor)
    rates = ctx.rates
    if rates is None or not _same(
        old.policy, config.policy, "messages_per_hour", "recipients_per_hour"
    ):
        rates = settingsparts.rate_limits(config, reactor)
    duplicates = ctx.duplicates
    if not _same(
        old.policy, config.policy, "duplicate_recipients", "duplicate_window", "mailing_lists"
    ):
        duplicates = build_duplicates(config.policy, reactor)
    authentication = ctx.authentication
    auth_same = _same(old.policy, config.policy, "spf_reject", "dmarc_reject") and _same(
        old, config, "dns"
    )
    if authentication is not None and not (
        auth_same and old.server.hostname == config.server.hostname
    ):
        # The verifier processes (their own resolver) live as long as the server.
        workers = authentication.workers
        if workers is not None and old.dns != config.dns:
            restart.append("dns (for the verifier processes)")
        authentication = sender_authentication(config, reactor, in_pool, workers)
    if _learning(old) != _learning(config):
        # The training queue (and its trainer) lives as long as the server.
        restart.append("filter.learn, rspamd_controller, rspamd_password, learn_command")
    quota = ctx.quota
    if quota is None or old.quota != config.quota:
        quota = settingsparts.quotas(config, in_pool)
    next_ctx = dataclasses.replace(
        ctx,
        config=config,
        passwords=passwords,
        portal=settingsparts.portal(config, passwords, reactor),
        throttle=throttle,
        addresses=loaded.addresses,
        dkim=loaded.dkim,
        filter=build_filter(config.filter, reactor) if old.filter != config.filter else ctx.filter,
        rates=rates,
        duplicates=duplicates,
        authentication=authentication,
        quota=quota,
    )
    return next_ctx, restart


@dataclasses.dataclass(frozen=True)
class Listeners:
    """What the listeners serve new connections with, built from one context."""

    settings: Mapping[str, ListenerSettings]  # listener name -> its settings
    sessions: Sequence[Any]  # the protocol factories, told goodbye at a stop


class Reloader:
    """
    Puts a new config in force (L{reload}). C{build} makes the listeners'
    settings from a context (L{mailsrv.service}); C{gates} are the factories
    of the listening ports, which stay; C{watched} are the other copies of
    the allowed networks ([policy] allow, allow_file: the greylist's), which a
    L{NetworkWatcher} looks at besides the gate's lists.
    """

    log = Logger()

    def __init__(
        self,
        ctx: ServerContext,
        build: Callable[[ServerContext], Listeners],
        listeners: Listeners,
        gates: Mapping[str, GateFactory],
        connections: ConnectionGate,
        network_watcher: Any = None,
        watched: Iterable[NetworkList] = (),
        alias_watcher: Any = None,
        relay: Any = None,
    ) -> None:
        self.ctx = ctx
        self.path = None if ctx.config.path == "<default>" else Path(ctx.config.path).absolute()
        self.build = build
        self.listeners = listeners
        self.gates = gates
        self.connections = connections
        self.network_watcher = network_watcher
        self.watched = list(watched)
        self.alias_watcher = alias_watcher
        self.relay = relay
        # The factories of earlier settings, for as long as a connection
        # (a session, or one still in its pregreet wait) holds them: a
        # reload leaves nothing behind once its sessions have ended.
        self.retired: weakref.WeakSet[Any] = weakref.WeakSet()

    def session_factories(self) -> list[Any]:
        """Every protocol factory that may have sessions open (for the goodbye at a stop)."""
        retired = [f for f in self.retired if len(getattr(f, "open_sessions", ())) > 0]
        return [*retired, *self.listeners.sessions]

    def reload(self) -> defer.Deferred:
        """
        Read the config file again and put it in force: fires with True, or
        with False when it was refused (the problems logged).
        """
        ctx = self.ctx
        reactor: Any = ctx.reactor
        d = deferToThreadPool(reactor, ctx.threadpool, read_config, self.path, ctx.config, ctx)
        return d.addCallbacks(self._apply, self._refused)

    def _refused(self, f: Any) -> bool:
        if f.check(ConfigError):
            for line in str(f.value).splitlines():
                self.log.error("SIGHUP: {problem}", problem=line)
        else:
            self.log.failure("SIGHUP: reading the configuration failed", f)
        self.log.error("SIGHUP: configuration refused; the settings read before stay in force")
        return False

    def _apply(self, loaded: Loaded) -> bool:
        ctx, restart = next_context(self.ctx, loaded)
        table = loaded.addresses.aliases
        if table is not None:
            for problem in table.problems:
                self.log.warn("aliases: {problem}", problem=problem)
        listeners = self.build(ctx)
        for name, gate in self.gates.items():
            settings = listeners.settings.get(name)
            if settings is not None:
                gate.use(settings)
        self.retired.update(self.listeners.sessions)
        self.listeners = listeners
        self.connections.configure(connection_limits(ctx.config.policy), loaded.allow, loaded.deny)
        for allowed in self.watched:
            adopt(allowed, loaded.allow)  # [policy] allow: the greylist's exemption too
        if self.network_watcher is not None:
            lists = [self.connections.allow, self.connections.deny, *self.watched]
            self.network_watcher.lists = [nl for nl in lists if nl.path is not None]
        if self.alias_watcher is not None and table is not None:
            self.alias_watcher.table = table
        self.ctx = ctx
        restart = loaded.restart + restart
        if restart:
            self.log.warn(
                "SIGHUP: changed settings that take effect only at a restart (the values "
                "read before stay until then): {settings}",
                settings=", ".join(restart),
            )
        if self.relay is not None and loaded.changed:
            if loaded.restart:
                self.log.warn("SIGHUP: the relay process keeps its settings until the restart")
            else:
                self.relay.restart(ctx)
        self.log.info(
            "SIGHUP: reloaded the configuration {path}, the users, the aliases and the "
            "network lists; open sessions finish under the settings they started with",
            path=str(self.path) if self.path is not None else "(built-in default)",
        )
        return True


__all__ = [
    "Listeners",
    "Loaded",
    "Reloader",
    "keep_restart_settings",
    "next_context",
    "read_config",
    "restart_changes",
]
