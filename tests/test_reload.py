"""
Reload (L{mailsrv.reload}) in memory: which settings need a restart, what a
new context keeps and what it builds again, a listener whose new
connections get new settings while the ones accepted before keep theirs,
the connection gate's counts across new limits, the goodbye at a stop
reaching the sessions of earlier settings, and the relay process restarted
the way it stops.
"""

from __future__ import annotations

import gc
import weakref
from ipaddress import ip_address
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import error, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailsrv.config import DEFAULT_CONFIG, ConfigError, parse
from mailsrv.hangup import HangupService
from mailsrv.outbound.ipc import DRAIN_GRACE
from mailsrv.outbound.process import STOP_TIMEOUT, RelayProcessService
from mailsrv.policy.connections import ConnectionGate, ConnectionLimits, Verdict
from mailsrv.policy.listener import GateFactory, ListenerSettings
from mailsrv.policy.networks import NetworkList, parse_network
from mailsrv.reload import keep_restart_settings, next_context, read_config, restart_changes
from mailsrv.service import build_context, serve
from mailsrv.store.memory import MemoryMailStore
from tests.test_outbound_process import _FakeQueue, _ProcessReactor


def config_file(tmp_path: Path, text: str = DEFAULT_CONFIG) -> Path:
    path = tmp_path / "mailsrv.toml"
    path.write_text(text)
    return path


def changed(text: str, *edits: tuple[str, str]) -> str:
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    return text


HOSTNAME = ('hostname = "localhost"', 'hostname = "mx2.example.test"')


def test_listeners_and_data_folder_need_a_restart_and_keep_their_values(tmp_path):
    old = parse(DEFAULT_CONFIG, "mailsrv.toml", tmp_path)
    text = changed(
        DEFAULT_CONFIG,
        HOSTNAME,
        ('data_dir = "data"', 'data_dir = "elsewhere"'),
        ("tcp:2525:", "tcp:2526:"),
    )
    new = parse(text + "[policy]\ngreylist = true\n", "mailsrv.toml", tmp_path)
    assert restart_changes(old, new) == ["listen", "server.data_dir", "policy.greylist*"]
    kept = keep_restart_settings(old, new)
    assert kept.listen == old.listen
    assert kept.server.data_dir == old.server.data_dir
    assert kept.policy.greylist is False
    assert kept.server.hostname == "mx2.example.test"  # not a restart setting
    assert restart_changes(old, kept) == []


def test_the_metrics_listener_needs_a_restart(tmp_path):
    old = parse(DEFAULT_CONFIG, "mailsrv.toml", tmp_path)
    text = DEFAULT_CONFIG + '[metrics]\nlisten = ["tcp:9154:interface=127.0.0.1"]\n'
    new = parse(text, "mailsrv.toml", tmp_path)
    assert restart_changes(old, new) == ["metrics.listen"]
    assert keep_restart_settings(old, new).metrics == old.metrics


def test_the_syslog_settings_need_a_restart(tmp_path):
    old = parse(DEFAULT_CONFIG, "mailsrv.toml", tmp_path)
    new = parse(DEFAULT_CONFIG + "[log]\nsyslog = true\n", "mailsrv.toml", tmp_path)
    assert restart_changes(old, new) == ["log"]
    journal = parse(DEFAULT_CONFIG + "[log]\njournal = false\n", "mailsrv.toml", tmp_path)
    assert restart_changes(old, journal) == ["log"]


@pytest.fixture
def ctx(tmp_path):
    path = config_file(tmp_path, DEFAULT_CONFIG.replace("[listen]", "[policy]\n[listen]"))
    return build_context(parse(path.read_text(), str(path), tmp_path), MemoryReactorClock())


def test_a_new_context_keeps_the_state_and_builds_the_settings_again(ctx, tmp_path):
    path = tmp_path / "mailsrv.toml"
    path.write_text(
        changed(path.read_text(), HOSTNAME, ("[policy]\n", "[policy]\nmessages_per_hour = 5\n"))
    )
    loaded = read_config(path, ctx.config, ctx)
    assert loaded.restart == [] and loaded.changed
    new, restart = next_context(ctx, loaded)
    assert restart == []
    assert new.config.server.hostname == "mx2.example.test"
    assert new.config.policy.messages_per_hour == 5
    for part in ("threadpool", "store", "queue", "pop3_locks", "tls", "throttle", "greylist"):
        assert getattr(new, part) is getattr(ctx, part), part
    # Built again: the users (read anew), the aliases, the rate limits (their settings changed).
    for part in ("passwords", "portal", "addresses", "rates"):
        assert getattr(new, part) is not getattr(ctx, part), part
    again, _ = next_context(new, read_config(path, new.config, new))
    assert again.rates is new.rates  # unchanged settings: the counters are kept


def test_filter_learning_needs_a_restart_the_filter_itself_not(ctx, tmp_path):
    path = tmp_path / "mailsrv.toml"
    base = path.read_text()
    path.write_text(base + '[filter]\nspamd = "127.0.0.1:783"\n')
    new, restart = next_context(ctx, read_config(path, ctx.config, ctx))
    assert restart == [] and new.filter is not None and new.training is None
    path.write_text(base + '[filter]\nspamd = "127.0.0.1:783"\nlearn = true\n')
    again, restart = next_context(new, read_config(path, new.config, new))
    assert restart == ["filter.learn, rspamd_controller, rspamd_password, learn_command"]
    assert again.training is None  # until the restart


def test_a_config_that_does_not_load_names_every_problem(ctx, tmp_path):
    path = tmp_path / "mailsrv.toml"
    path.write_text(path.read_text() + '[limits]\nmax_message_size = "big"\n')
    with pytest.raises(ConfigError) as e:
        read_config(path, ctx.config, ctx)
    assert "max_message_size" in str(e.value)


class Recorder(protocol.Protocol):
    pass


def factory_of(name: str) -> protocol.Factory:
    f = protocol.Factory.forProtocol(Recorder)
    f.name = name  # type: ignore[attr-defined]
    return f


ADDR = IPv4Address("TCP", "192.0.2.1", 1234)


def test_a_connection_keeps_the_settings_it_was_accepted_under():
    clock = Clock()
    gate = ConnectionGate(clock, ConnectionLimits())
    listener = GateFactory(factory_of("old"), gate, "smtp", clock, "mx.example.test")
    listener.doStart()
    before = listener.buildProtocol(ADDR)
    old = listener.use(ListenerSettings(factory_of("new"), "mx2.example.test"))
    assert old.factory.name == "old"
    after = listener.buildProtocol(ADDR)
    for p in (before, after):
        assert p is not None
        p.makeConnection(StringTransport())
    assert before.inner.factory.name == "old"  # type: ignore[attr-defined]
    assert after.inner.factory.name == "new"  # type: ignore[attr-defined]
    assert listener.hostname == "mx2.example.test"
    listener.doStop()


def test_new_limits_and_networks_keep_the_counts_of_open_connections():
    clock = Clock()
    gate = ConnectionGate(clock, ConnectionLimits(max_connections_per_ip=5))
    watched = gate.allow, gate.deny
    for _ in range(2):
        assert gate.admit("smtp", "192.0.2.1") is Verdict.ADMIT
    deny = NetworkList((parse_network("198.51.100.0/24"),))
    gate.configure(ConnectionLimits(max_connections_per_ip=2), NetworkList(), deny)
    assert (gate.allow, gate.deny) == watched and gate.allow is watched[0]  # the watcher's lists
    assert gate.admit("smtp", "192.0.2.1") is Verdict.TOO_MANY  # the two open still count
    assert gate.admit("smtp", "198.51.100.7") is Verdict.DENIED
    gate.release("smtp", "192.0.2.1")
    assert gate.admit("smtp", "192.0.2.1") is Verdict.ADMIT


def test_the_goodbye_at_a_stop_reaches_the_sessions_of_earlier_settings(ctx, tmp_path):
    top = serve(ctx)
    hangup = next(s for s in top if isinstance(s, HangupService))
    reloader = hangup.reloader
    assert reloader is not None
    first = reloader.listeners
    smtp_gate = reloader.gates["smtp"]
    path = tmp_path / "mailsrv.toml"
    path.write_text(changed(path.read_text(), HOSTNAME))
    assert reloader._apply(read_config(path, ctx.config, ctx)) is True
    assert smtp_gate.hostname == "mx2.example.test"
    assert smtp_gate.settings is reloader.listeners.settings["smtp"]
    assert reloader.ctx.config.server.hostname == "mx2.example.test"
    # An SMTP session of the first settings still open: it hears the goodbye too.
    old_smtp = next(f for f in first.sessions if hasattr(f, "submission") and not f.submission)
    old_smtp.open_sessions.add(object())
    factories = reloader.session_factories()
    assert old_smtp in factories
    assert all(f in factories for f in reloader.listeners.sessions)
    assert len(factories) == len(reloader.listeners.sessions) + 1  # the others had no session
    old_smtp.open_sessions.clear()
    assert old_smtp not in reloader.session_factories()


class RelayRestartTests(unittest.TestCase):
    """The relay process restarted with new settings, the way it is stopped."""

    def setUp(self):
        self.reactor = _ProcessReactor()
        tmp = Path(self.mktemp())
        config = SimpleNamespace(
            queue_dir=tmp / "queue", source="old", path=str(tmp / "m.toml"), base_dir=tmp
        )
        self.ctx = SimpleNamespace(config=config, reactor=self.reactor, store=MemoryMailStore())
        self.service = RelayProcessService(self.ctx, _FakeQueue())
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_restart_stops_the_process_then_starts_one_with_the_new_settings(self):
        self.service.startService()
        (first,) = self.reactor.spawned
        first.answer(b"1")
        new_config = SimpleNamespace(**{**vars(self.ctx.config), "source": "new"})
        before = len(first.written)
        self.service.restart(SimpleNamespace(**{**vars(self.ctx), "config": new_config}))
        self.assertIn(b"Stop", b"".join(d for _, d in first.written[before:]))
        self.assertEqual(len(self.reactor.spawned), 1)  # not before the old one ended
        self.assertIsNone(self.service.proto)
        first.end(error.ProcessDone(0))
        self.assertEqual(len(self.reactor.spawned), 2)  # at once, no back-off
        second = self.reactor.spawned[1]
        second.answer(b"1")
        self.assertIn(b"new", b"".join(d for _, d in second.written))
        texts = [formatEvent(e) for e in self.events]
        self.assertFalse([t for t in texts if "relay process ended" in t])
        d = self.service.stopService()
        second.end(error.ProcessDone(0))
        self.successResultOf(d)

    def test_a_stop_during_the_restart_waits_for_the_old_process(self):
        self.service.startService()
        (first,) = self.reactor.spawned
        first.answer(b"1")
        self.service.restart(self.ctx)
        d = self.service.stopService()
        self.assertNoResult(d)
        first.end(error.ProcessDone(0))
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 1)  # none started once stopping

    def test_the_restart_lets_the_deliveries_under_way_finish_within_a_bound(self):
        self.service.startService()
        (first,) = self.reactor.spawned
        first.answer(b"1")
        before = len(first.written)
        self.service.restart(self.ctx)
        stop = b"".join(d for _, d in first.written[before:])
        self.assertIn(b"Stop", stop)
        self.assertIn(b"drain", stop)  # transactions under way finish (ipc.Stop)
        self.reactor.advance(STOP_TIMEOUT + 1)
        self.assertEqual(first.signals, [])  # not killed at a stop's timeout
        self.reactor.advance(DRAIN_GRACE)
        self.assertEqual(first.signals, ["KILL"])
        first.end(error.ProcessTerminated(signal=9))
        self.assertEqual(len(self.reactor.spawned), 2)
        second = self.reactor.spawned[1]
        second.answer(b"1")
        d = self.service.stopService()
        second.end(error.ProcessDone(0))
        self.successResultOf(d)


def test_the_factories_of_earlier_settings_are_freed_once_their_sessions_end(ctx, tmp_path):
    reloader = serve(ctx).services[0].reloader
    path = tmp_path / "mailsrv.toml"
    base = path.read_text()
    first = [weakref.ref(f) for f in reloader.listeners.sessions]
    held = reloader.listeners.sessions[0]
    held.open_sessions.add(object())  # a session of the first settings still open
    for n in range(5):
        path.write_text(changed(base, ('hostname = "localhost"', f'hostname = "h{n}.test"')))
        assert reloader._apply(read_config(path, reloader.ctx.config, reloader.ctx)) is True
    gc.collect()
    assert [r() for r in first if r() is not None] == [held]  # only the one with a session
    assert held in reloader.session_factories()
    held.open_sessions.clear()
    del held
    gc.collect()
    assert all(r() is None for r in first)
    assert len(reloader.session_factories()) == len(reloader.listeners.sessions)


def _users_and_aliases(tmp_path: Path):
    path = config_file(tmp_path, DEFAULT_CONFIG.replace("[listen]", "[policy]\n[listen]"))
    (tmp_path / "aliases").write_text("sales: alice@example.test\n")
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "passwd").write_text("alice@example.test:{PLAIN}x\n")
    ctx = build_context(parse(path.read_text(), str(path), tmp_path), MemoryReactorClock())
    assert ctx.addresses is not None and ctx.addresses.aliases is not None
    assert ctx.addresses.aliases.entries
    return path, ctx


@pytest.mark.parametrize(
    "damage, key",
    [
        (lambda t: (t / "aliases").write_bytes(b"sales: \xff\xfe\n"), "addresses.aliases"),
        (lambda t: (t / "aliases").unlink(), "addresses.aliases"),
        (lambda t: (t / "data" / "passwd").write_bytes(b"\xff\xfe:x\n"), "auth.passwd_file"),
        (
            lambda t: (t / "mailsrv.toml").write_text(
                (t / "mailsrv.toml").read_text() + '[auth]\npasswd_file = "passwd.new"\n'
            ),
            "auth.passwd_file",
        ),
    ],
    ids=["aliases not UTF-8", "aliases gone", "users not UTF-8", "users file not there"],
)
def test_users_or_aliases_the_reload_cannot_read_refuse_it(tmp_path, damage, key):
    path, ctx = _users_and_aliases(tmp_path)
    damage(tmp_path)
    with pytest.raises(ConfigError) as e:
        read_config(path, ctx.config, ctx)
    assert key in str(e.value)


def test_users_and_aliases_that_never_existed_are_no_reason_to_refuse(ctx, tmp_path):
    path = tmp_path / "mailsrv.toml"
    loaded = read_config(path, ctx.config, ctx)
    assert loaded.passwords is not None and loaded.passwords.users() == []


def test_new_allowed_networks_exempt_from_greylisting_too(tmp_path):
    policy = '[policy]\ngreylist = true\nallow = ["192.0.2.0/24"]\n'
    path = config_file(tmp_path, DEFAULT_CONFIG.replace("[listen]", policy + "[listen]"))
    ctx = build_context(parse(path.read_text(), str(path), tmp_path), MemoryReactorClock())
    reloader = serve(ctx).services[0].reloader
    assert ctx.greylist is not None
    path.write_text(path.read_text().replace("192.0.2.0/24", "198.51.100.0/24"))
    assert reloader._apply(read_config(path, ctx.config, ctx)) is True
    assert reloader.ctx.greylist is ctx.greylist  # its triplets are kept
    allowed = ctx.greylist.allowed_networks
    assert ip_address("198.51.100.7") in allowed and ip_address("192.0.2.7") not in allowed
    assert ip_address("198.51.100.7") in reloader.connections.allow  # as the gate's
