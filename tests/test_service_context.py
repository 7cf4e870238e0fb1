"""
The composition root: build_context builds every shared part once, into a
frozen, typed ServerContext, and building the services from it changes
nothing in it.
"""

from __future__ import annotations

import dataclasses

import pytest
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mailsrv.auth.throttle import LoginThrottle
from mailsrv.config import DEFAULT_CONFIG, Config, parse
from mailsrv.filter.learn import TrainingQueue
from mailsrv.filter.spamd import SpamdFilter
from mailsrv.filter.step import FilterStep
from mailsrv.filter.trainers import SpamdTrainer
from mailsrv.imap.server import imap_factory
from mailsrv.interfaces import IMailStore, IOutboundQueue, IPasswordDatabase
from mailsrv.outbound.queue import OutboundQueue
from mailsrv.pop3 import MaildropLocks
from mailsrv.service import ServerContext, ThreadPoolService, build_context, serve
from mailsrv.tls import ServerTLS


@pytest.fixture
def ctx(tmp_path) -> ServerContext:
    """The context of a server on the built-in default configuration, data in tmp_path."""
    return build_context(parse(DEFAULT_CONFIG, "<default>", tmp_path), MemoryReactorClock())


def parts(ctx: ServerContext) -> dict[str, object]:
    return {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}


def test_every_part_is_built_and_typed(ctx, tmp_path):
    assert isinstance(ctx.config, Config)
    assert ctx.config.server.data_dir == tmp_path / "data"
    assert IReactorTime.providedBy(ctx.reactor)
    assert isinstance(ctx.threadpool, ThreadPool)
    assert verifyObject(IMailStore, ctx.store)
    assert verifyObject(IPasswordDatabase, ctx.passwords)
    assert isinstance(ctx.portal, Portal)
    assert isinstance(ctx.tls, ServerTLS)
    assert isinstance(ctx.throttle, LoginThrottle)
    assert isinstance(ctx.queue, OutboundQueue)
    assert verifyObject(IOutboundQueue, ctx.queue)
    assert isinstance(ctx.pop3_locks, MaildropLocks)
    assert ctx.dkim is None  # no [dkim] keys: nothing is signed
    assert ctx.filter is None  # no [filter] configured: no spam filter step
    assert ctx.training is None  # no [filter] learn: no training from IMAP
    assert ctx.greylist is None  # greylisting is off by default
    optional = ("dkim", "filter", "training", "greylist")
    assert all(value is not None for name, value in parts(ctx).items() if name not in optional)


def test_a_filter_is_built_from_the_config(tmp_path):
    text = DEFAULT_CONFIG + '[filter]\nspamd = "127.0.0.1:7830"\non_failure = "defer"\n'
    ctx = build_context(parse(text, "<test>", tmp_path), MemoryReactorClock())
    assert isinstance(ctx.filter, FilterStep)
    assert isinstance(ctx.filter.client, SpamdFilter)
    assert (ctx.filter.client.port, ctx.filter.on_failure, ctx.filter.timeout) == (
        7830,
        "defer",
        30,
    )


def test_training_is_built_from_the_config(tmp_path):
    text = DEFAULT_CONFIG + '[filter]\nspamd = "127.0.0.1:7830"\nlearn = true\ntimeout = "9s"\n'
    ctx = build_context(parse(text, "<test>", tmp_path), MemoryReactorClock())
    assert isinstance(ctx.training, TrainingQueue)
    assert isinstance(ctx.training.trainer, SpamdTrainer)
    assert (ctx.training.trainer.port, ctx.training.timeout) == (7830, 9)
    assert imap_factory(ctx).training is ctx.training  # the IMAP hook's queue


def test_the_context_is_frozen(ctx):
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.queue = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.pop3_locks = MaildropLocks()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.anything_new = 1  # type: ignore[attr-defined]


def test_building_the_services_changes_nothing_in_the_context(ctx):
    before = parts(ctx)
    top = serve(ctx)
    assert parts(ctx) == before
    assert all(parts(ctx)[name] is value for name, value in before.items())
    # Every listener of the default configuration, the relay process beside them.
    (users,) = [s for s in top if isinstance(s, ThreadPoolService)]
    names = {s.name for s in users if s.name}
    assert "outbound" in names
    for listener, descriptions in ctx.config.listen.items():
        assert {f"{listener} {d}" for d in descriptions} <= names


def _innermost(factory):
    """The protocol factory inside the gate and TLS wrappers of a listener."""
    while hasattr(factory, "wrappedFactory"):
        factory = factory.wrappedFactory
    return factory


def test_pop3_listeners_share_the_context_maildrop_locks(ctx):
    top = serve(ctx)
    (users,) = [s for s in top if isinstance(s, ThreadPoolService)]
    factories = [s.factory for s in users if s.name and s.name.startswith("pop3")]
    assert len(factories) == 2
    locks = [_innermost(f).locks for f in factories]
    assert locks == [ctx.pop3_locks, ctx.pop3_locks]
    assert all(lock is ctx.pop3_locks for lock in locks)
