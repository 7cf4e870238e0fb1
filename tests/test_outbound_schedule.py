"""The retry schedule: a pure function of (attempts, created, now), driven by a Clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mailsrv.config import parse
from mailsrv.outbound.schedule import RetrySchedule

S = RetrySchedule(retry_min=300, retry_max=3600, max_lifetime=5 * 86400, delay_warning=4 * 3600)


def test_delay_doubles_from_min_to_max():
    assert [S.delay(n) for n in range(1, 8)] == [300, 600, 1200, 2400, 3600, 3600, 3600]
    assert S.delay(0) == 0
    assert S.delay(10_000) == 3600


def test_from_config_defaults_are_postfix_like():
    s = RetrySchedule.from_config(parse("").relay)
    assert (s.retry_min, s.retry_max, s.max_lifetime, s.delay_warning) == (300, 3600, 432000, 14400)


def test_a_message_walked_through_its_life_with_a_clock():
    clock = Clock()
    clock.advance(1_000_000)
    created = clock.seconds()
    attempts, times = 0, []
    while True:
        attempts += 1  # an attempt fails now
        nxt = S.next_attempt(attempts, created, clock.seconds())
        if nxt is None:
            break
        times.append(nxt - created)
        clock.advance(nxt - clock.seconds())
    # 5 min, 10, 20, 40, then hourly, and one last try exactly at the 5-day mark
    assert times[:5] == [300, 900, 2100, 4500, 8100]
    assert times[-1] == 5 * 86400
    assert clock.seconds() == created + 5 * 86400
    assert all(b - a <= 3600 for a, b in zip(times, times[1:], strict=False))
    assert len(times) == 4 + (5 * 86400 - 4500) // 3600 + 1


def test_expired_and_warning():
    assert not S.expired(0, 5 * 86400 - 1)
    assert S.expired(0, 5 * 86400)
    assert S.next_attempt(3, 0, 5 * 86400) is None
    assert not S.should_warn(0, 4 * 3600 - 1, False)
    assert S.should_warn(0, 4 * 3600, False)
    assert not S.should_warn(0, 4 * 3600, True)  # once only
    assert not RetrySchedule(300, 3600, 86400, 0).should_warn(0, 10**6, False)  # disabled


@given(
    attempts=st.integers(min_value=1, max_value=10_000),
    created=st.floats(min_value=0, max_value=2e9),
    age=st.floats(min_value=0, max_value=10 * 86400),
)
def test_next_attempt_is_in_the_future_and_within_lifetime(attempts, created, age):
    now = created + age
    nxt = S.next_attempt(attempts, created, now)
    if age >= S.max_lifetime:
        assert nxt is None
    else:
        assert nxt is not None
        assert now < nxt <= created + S.max_lifetime + 1e-6
        assert nxt - now <= S.retry_max + 1e-6
