"""Unit tests for optimizely_odp_ext.retry: reply classification, Retry-After, backoff, window."""

from __future__ import annotations

import email.utils
import random
import time
from typing import Iterator, Optional

import pytest

from optimizely_odp_ext.retry import NETWORK_ERROR, RetryPolicy, Verdict, classify, parse_retry_after

NOW = 1_700_000_000.0  # a fixed wall-clock instant for HTTP-date tests


# ----------------------------------------------------------------- classify


@pytest.mark.parametrize("status", [200, 202, 204])
def test_2xx_is_delivered(status: int) -> None:
    assert classify(status, 1) is Verdict.DELIVERED
    assert classify(status, 10) is Verdict.DELIVERED


@pytest.mark.parametrize("status", [NETWORK_ERROR, 408, 429, 500, 502, 503, 504])
def test_retryable(status: int) -> None:
    assert classify(status, 1) is Verdict.RETRY
    assert classify(status, 50) is Verdict.RETRY


@pytest.mark.parametrize("status", [400, 413])
def test_400_and_413_split_a_batch_and_drop_a_single_event(status: int) -> None:
    assert classify(status, 2) is Verdict.SPLIT
    assert classify(status, 100) is Verdict.SPLIT
    assert classify(status, 1) is Verdict.DROP


@pytest.mark.parametrize("status", [401, 403, 404, 409, 415, 422])
def test_other_4xx_are_dropped_whatever_the_size(status: int) -> None:
    assert classify(status, 1) is Verdict.DROP
    assert classify(status, 20) is Verdict.DROP


def test_network_error_is_zero() -> None:
    assert NETWORK_ERROR == 0


# ----------------------------------------------------------------- parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), ("0.5", 0.5), ("  7 ", 7.0), ("0", 0.0), ("120", 120.0), ("-3", 0.0)],
)
def test_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, now_wall=NOW) == expected


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "5 seconds", "nan", "inf", "-inf", "1e999"])
def test_unreadable_is_none(value: Optional[str]) -> None:
    assert parse_retry_after(value, now_wall=NOW) is None


def test_http_date_in_the_future() -> None:
    value = email.utils.formatdate(NOW + 30, usegmt=True)
    assert parse_retry_after(value, now_wall=NOW) == 30.0


def test_http_date_with_fractional_now() -> None:
    value = email.utils.formatdate(NOW + 10, usegmt=True)
    assert parse_retry_after(value, now_wall=NOW + 0.25) == 9.75


def test_http_date_in_the_past_is_zero() -> None:
    value = email.utils.formatdate(NOW - 3600, usegmt=True)
    assert parse_retry_after(value, now_wall=NOW) == 0.0


def test_http_date_literal() -> None:
    # Wed, 21 Oct 2015 07:28:00 GMT == 1445412480
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now_wall=1445412480.0 - 12) == 12.0


# ----------------------------------------------------------------- RetryPolicy


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.base, policy.cap, policy.window, policy.retry_after_cap) == (0.5, 30.0, 300.0, 60.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 42])
def test_delays_lie_between_half_ceiling_and_ceiling(seed: int) -> None:
    policy = RetryPolicy(base=0.5, cap=30.0, rng=random.Random(seed))
    for attempt in range(1, 12):
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(20):
            delay = policy.delay(attempt)
            assert ceiling / 2 <= delay <= ceiling, (attempt, delay)


def test_same_seed_same_delays() -> None:
    first = RetryPolicy(rng=random.Random(7))
    second = RetryPolicy(rng=random.Random(7))
    assert [first.delay(a) for a in range(1, 9)] == [second.delay(a) for a in range(1, 9)]


def test_backoff_grows_exponentially_until_the_cap() -> None:
    policy = RetryPolicy(base=1.0, cap=8.0, rng=random.Random(3))
    # Ceilings 1, 2, 4, 8, 8, 8: each range lies strictly above the one before until the cap.
    lows = [min(8.0, 2.0 ** (a - 1)) / 2 for a in range(1, 7)]
    assert lows == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [policy.delay(a) for a in range(1, 7)]
    for delay, low in zip(delays, lows):
        assert low <= delay <= 2 * low
    assert max(policy.delay(1000) for _ in range(50)) <= 8.0
    assert min(policy.delay(1000) for _ in range(50)) >= 4.0


def test_attempt_zero_or_negative_is_treated_as_the_first() -> None:
    policy = RetryPolicy(base=2.0, cap=100.0, rng=random.Random(1))
    for attempt in (0, -5):
        assert 1.0 <= policy.delay(attempt) <= 2.0


def test_huge_attempt_does_not_overflow() -> None:
    policy = RetryPolicy(base=0.5, cap=30.0, rng=random.Random(1))
    assert 15.0 <= policy.delay(10**6) <= 30.0


def test_retry_after_is_honoured_with_small_jitter() -> None:
    policy = RetryPolicy(base=0.5, cap=1.0, retry_after_cap=60.0, rng=random.Random(5))
    for _ in range(20):
        delay = policy.delay(1, retry_after=12.0)
        # Honoured even above the backoff cap; jitter at most 10 % of base on top.
        assert 12.0 <= delay <= 12.05


def test_retry_after_is_capped() -> None:
    policy = RetryPolicy(base=0.5, retry_after_cap=3.0, rng=random.Random(5))
    for _ in range(20):
        assert 3.0 <= policy.delay(1, retry_after=3600.0) <= 3.05


def test_retry_after_zero() -> None:
    policy = RetryPolicy(base=0.5, rng=random.Random(5))
    assert 0.0 <= policy.delay(4, retry_after=0.0) <= 0.05


def test_expired() -> None:
    policy = RetryPolicy(window=10.0)
    assert not policy.expired(100.0, 100.0)
    assert not policy.expired(100.0, 109.999)
    assert policy.expired(100.0, 110.0)
    assert policy.expired(100.0, 500.0)


def test_zero_window_expires_at_once() -> None:
    assert RetryPolicy(window=0.0).expired(5.0, 5.0)


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set to UTC+5:30 (a POSIX TZ string: no tzdata needed)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
def test_http_date_with_gmt_does_not_depend_on_the_local_zone() -> None:
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now_wall=784111777.0 - 30) == 30.0


@pytest.mark.usefixtures("local_time_not_utc")
@pytest.mark.parametrize("value", ["Sun Nov  6 08:49:37 1994", "Sun, 06 Nov 1994 08:49:37 -0000"])
def test_http_date_without_a_zone_is_gmt(value: str) -> None:
    # Sun, 06 Nov 1994 08:49:37 GMT == 784111777
    assert parse_retry_after(value, now_wall=784111777.0 - 30) == 30.0
