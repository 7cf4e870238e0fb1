"""The login throttle's bookkeeping stays small under a spray of addresses and accounts (task.Clock)."""

from __future__ import annotations

import tracemalloc

from twisted.internet import task

from mailsrv.auth.throttle import LoginThrottle

LONG = "a" * 300 + "@example.test"  # as long an account as is counted


def spray(throttle: LoginThrottle, hosts: list[str], accounts: list[str]) -> None:
    for host in hosts:
        for account in accounts:
            attempt = throttle.reserve(host, account)
            if attempt is not None:
                attempt.failed()


def test_memory_per_failure_is_a_hash_not_the_account():
    throttle = LoginThrottle(task.Clock(), max_failures=10, window=600)
    hosts = [f"10.0.{i >> 8}.{i & 255}" for i in range(2000)]
    accounts = [f"{i}{LONG}" for i in range(10)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        spray(throttle, hosts, accounts)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert throttle.tracked() == (2000, 20_000)
    assert used / 20_000 < 40, f"{used / 20_000:.0f} bytes a failure"  # was ~500


def test_each_client_keeps_at_most_the_limit():
    clock = task.Clock()
    throttle = LoginThrottle(clock, max_failures=3, window=600)
    for _ in range(5):
        spray(throttle, ["192.0.2.1"], [f"{i}{LONG}" for i in range(10)])
        clock.advance(1)
    assert throttle.tracked() == (1, 3)
    assert throttle.blocked("192.0.2.1")


def test_clients_that_never_return_are_forgotten():
    clock = task.Clock()
    throttle = LoginThrottle(clock, max_failures=10, window=600)
    spray(throttle, [f"198.51.100.{i}" for i in range(200)], ["x@example.test"] * 3)
    clock.advance(300)
    spray(throttle, ["203.0.113.1"], ["x@example.test"])
    assert throttle.tracked() == (201, 601)
    clock.advance(301)  # the spray is 601 s old, the last failure 301 s
    spray(throttle, ["203.0.113.2"], ["x@example.test"])
    assert throttle.tracked() == (2, 2)  # forgotten without being asked about
    assert not throttle.blocked("203.0.113.1")
    clock.advance(600)
    spray(throttle, ["203.0.113.3"], ["x@example.test"])
    assert throttle.tracked() == (1, 1)


def test_ipv6_clients_are_counted_by_their_64():
    throttle = LoginThrottle(task.Clock(), max_failures=3, window=600)
    spray(throttle, ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff:0:0:9"], ["u@x"])
    assert throttle.blocked("2001:db8:1:2:abcd::1")  # a new address, the same /64
    assert throttle.reserve("2001:DB8:1:2::77", "u@x") is None
    assert not throttle.blocked("2001:db8:1:3::1")  # the next /64
    spray(throttle, [f"2001:db8:5:6:{i:x}::1" for i in range(1000)], ["u@x"])
    assert throttle.tracked() == (2, 6)  # a spray from one /64 is one client


def test_ipv4_mapped_addresses_count_as_ipv4():
    throttle = LoginThrottle(task.Clock(), max_failures=2, window=600)
    spray(throttle, ["::ffff:192.0.2.7", "192.0.2.7"], ["u@x"])
    assert throttle.blocked("192.0.2.7")
    assert throttle.blocked("::ffff:192.0.2.7")
    assert not throttle.blocked("192.0.2.8")
