"""Unit tests for optimizely_odp_ext._concurrency: the AIMD in-flight limit, on a fake clock; and the
senders (optimizely_odp_ext._senders) keeping to it, with a fake transport."""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Tuple

import pytest

from optimizely_odp_ext._batch import Target, _Batch
from optimizely_odp_ext._concurrency import AdaptiveConcurrency, pushes_back
from optimizely_odp_ext._senders import INITIAL_IN_FLIGHT, Senders
from optimizely_odp_ext._threads import Wake
from optimizely_odp_ext.event import Encoded
from optimizely_odp_ext.settings import make_options
from optimizely_odp_ext.transport import Reply


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def round_trip(control: AdaptiveConcurrency, clock: Clock, rtt: float, status: Callable[[int], int] = lambda i: 202,
               wanted: int = 1000) -> int:
    """One round: as many requests start as the limit lets (of ``wanted``), all answer after ``rtt``."""
    started = 0
    while started < wanted and control.try_acquire():
        started += 1
    clock.now += rtt
    for index in range(started):
        control.release(rtt, status(index))
    return started


def test_the_limit_grows_by_one_per_round_trip_while_rtt_stays_flat_up_to_the_ceiling() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=12, initial=4, clock=clock, slow_start=False)
    limits: List[int] = []
    for _ in range(20):
        round_trip(control, clock, 0.05)
        limits.append(control.limit)
    assert limits[0] == 4  # the first round only learns the RTT
    assert all(b - a in (0, 1) for a, b in zip(limits, limits[1:]))
    assert limits[-1] == 12
    assert max(limits) == 12  # never past the ceiling


def test_no_growth_when_the_senders_never_needed_the_limit() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=32, initial=4, clock=clock)
    for _ in range(20):
        assert round_trip(control, clock, 0.05, wanted=2) == 2
    assert control.limit == 4


@pytest.mark.parametrize("status", [429, 503, 500, 408, 0])
def test_back_pressure_multiplies_the_limit_by_point_nine(status: int) -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=32, initial=20, clock=clock)
    round_trip(control, clock, 0.05)  # learns the RTT; the window has not ended
    assert control.limit == 20
    round_trip(control, clock, 0.05, status=lambda i: status if i == 0 else 202)
    assert control.limit == 18  # one window, one decrease, however many replies pushed back in it
    round_trip(control, clock, 0.05, status=lambda i: status)
    assert control.limit == 16


def test_other_client_errors_do_not_push_back() -> None:
    assert [pushes_back(s) for s in (200, 202, 400, 401, 404, 413)] == [False] * 6
    assert [pushes_back(s) for s in (0, 408, 429, 500, 502, 503, 504)] == [True] * 7


def test_the_limit_never_drops_below_one() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=8, initial=2, clock=clock)
    for _ in range(10):
        round_trip(control, clock, 0.05, status=lambda i: 503)
    assert control.limit == 1
    assert control.try_acquire()
    assert not control.try_acquire()


def test_rising_latency_decreases_the_limit() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=64, initial=16, clock=clock)
    for _ in range(8):  # steady: a little jitter, so the deviation is small but not zero
        round_trip(control, clock, 0.050)
        round_trip(control, clock, 0.052)
    settled = control.limit
    round_trip(control, clock, 0.200)  # the link is saturating: RTT far past mean + 2.5 deviations
    round_trip(control, clock, 0.200)  # (the first slow reply closed the window before; this one is judged)
    assert control.limit == int(settled * 0.9)


def test_jitter_under_a_tenth_of_the_rtt_is_not_a_rise() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=64, initial=8, clock=clock, slow_start=False)
    for _ in range(4):  # perfectly flat: the deviation is zero
        round_trip(control, clock, 0.050)
    flat = control.limit
    for _ in range(4):
        round_trip(control, clock, 0.054)  # +8%: noise, no cut
    assert control.limit >= flat


def test_one_adjustment_per_window_however_many_replies() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=100, initial=10, clock=clock, slow_start=False)
    for _ in range(3):  # the first window opens, the second learns the RTT, the third grows
        round_trip(control, clock, 0.1)
    assert control.limit == 11
    # Replies that all come back within a tenth of the window: no further change until it ends.
    for _ in range(5):
        assert control.try_acquire()
    for _ in range(5):
        clock.now += 0.001
        control.release(0.1, 202)
    assert control.limit == 11


def test_try_acquire_never_lets_more_than_the_limit_in_flight() -> None:
    control = AdaptiveConcurrency(ceiling=5, initial=3)
    assert [control.try_acquire() for _ in range(5)] == [True, True, True, False, False]
    assert control.in_flight == 3
    control.release(0.01, 202)
    assert control.in_flight == 2
    assert control.try_acquire()


def test_a_ceiling_of_one_is_one_at_a_time() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=1, initial=4, clock=clock)
    for _ in range(10):
        assert round_trip(control, clock, 0.01) == 1
    assert control.limit == 1


@pytest.mark.parametrize("kwargs", [{"ceiling": 0}, {"ceiling": 4, "decrease_ratio": 1.0},
                                    {"ceiling": 4, "ewma_alpha": 0.0}, {"ceiling": 4, "deviation_scale": -1.0}])
def test_bad_parameters_are_refused(kwargs: Dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"ceiling|ratio"):
        AdaptiveConcurrency(**kwargs)  # type: ignore[arg-type]


def test_threads_sharing_one_controller_never_exceed_the_limit() -> None:
    control = AdaptiveConcurrency(ceiling=6, initial=6)
    lock = threading.Lock()
    peak = [0]
    live = [0]

    def sender() -> None:
        for _ in range(2000):
            if not control.try_acquire():
                continue
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            with lock:
                live[0] -= 1
            control.release(0.001, 202)

    threads = [threading.Thread(target=sender, name=f"test-sender-{n}") for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert 1 <= peak[0] <= 6
    assert control.in_flight == 0


def test_slow_start_doubles_per_round_trip_until_the_first_decrease_then_grows_by_one() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=40, initial=2, clock=clock)
    limits: List[int] = []
    for _ in range(5):
        round_trip(control, clock, 0.05)
        limits.append(control.limit)
    assert limits == [2, 2, 4, 8, 16]  # the window opens, learns the RTT, then doubles
    round_trip(control, clock, 0.05, status=lambda i: 429 if i == 0 else 202)
    assert control.limit == 14  # 16 x 0.9, and slow start is over
    for _ in range(4):
        round_trip(control, clock, 0.05)
    assert 14 < control.limit <= 18  # one at a time now, only in windows no slower than the mean
    assert control.limit <= 40


def test_slow_start_stops_at_the_ceiling_and_on_rising_latency() -> None:
    clock = Clock()
    control = AdaptiveConcurrency(ceiling=10, initial=4, clock=clock)
    for _ in range(6):
        round_trip(control, clock, 0.05)
    assert control.limit == 10
    round_trip(control, clock, 0.5)
    assert control.limit == 9


# ----------------------------------------------------------------- wired into the senders


class _CountingTransport:
    """Answers ``status`` after ``delay`` seconds (a barrier-free sleep standing in for the network's
    round trip, which is what the limit measures) and records how many requests overlapped."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.status = 202
        self.lock = threading.Lock()
        self.live = 0
        self.peaks: List[int] = []

    def send(self, url: str, api_key: str, body: bytes, timeout: Tuple[float, float]) -> Reply:
        with self.lock:
            self.live += 1
            self.peaks.append(self.live)
        time.sleep(self.delay)
        with self.lock:
            self.live -= 1
        return Reply(self.status, None, "")

    def close(self) -> None:
        pass


def _run_batches(senders: Senders, wake: Wake, count: int) -> None:
    """Submits ``count`` batches and takes their replies as the worker does: woken by each (bounded)."""
    target = Target("http://127.0.0.1:9", "key", "http://127.0.0.1:9/v3/events")
    for i in range(count):
        senders.submit(_Batch([Encoded(b"{}", f"id-{i}")], target))
    taken, deadline = 0, time.monotonic() + 60
    while taken < count and time.monotonic() < deadline:
        if senders.take() is None:
            wake.wait(1.0)
        else:
            taken += 1
    assert taken == count


def _sender_threads(senders: Senders) -> int:
    return sum(1 for t in senders._threads if t.is_alive())


def test_senders_send_fewer_at_once_after_push_back_and_never_more_than_max_in_flight() -> None:
    transport = _CountingTransport(delay=0.02)
    options = make_options(api_host="https://api.zaius.com", api_key="k" * 12, max_in_flight=8)
    wake = Wake()
    senders = Senders(options, lambda _options: transport, wake)
    senders.start()
    try:
        assert senders.limit() == INITIAL_IN_FLIGHT  # 4 to begin with, and as many threads
        assert _sender_threads(senders) == INITIAL_IN_FLIGHT
        _run_batches(senders, wake, 64)  # flat round trips, the senders want more: slow start
        grown = senders.limit()  # 8 on a quiet machine; load can make a window look slower
        assert grown <= 8
        assert max(transport.peaks) <= 8
        assert _sender_threads(senders) <= 8  # started as the limit grew, never past max_in_flight
        transport.status = 503
        _run_batches(senders, wake, 48)  # push-back, window after window
        cut = senders.limit()
        assert cut < grown
        transport.status = 202
        transport.peaks.clear()
        _run_batches(senders, wake, 8)  # handed over all at once: only the limit goes on the wire together
        assert max(transport.peaks) <= senders.limit() + 1  # +1: the limit may grow within the round
        assert max(transport.peaks) < 8
    finally:
        senders.stop()


def test_sender_threads_start_as_the_limit_grows_and_never_past_it() -> None:
    # Four threads to begin with; one more per batch handed over while every thread has one, as long
    # as the adaptive limit is above the threads (the limit is set here, not learnt: see the tests
    # of AdaptiveConcurrency for how it grows).
    gate = threading.Event()

    class Gated(_CountingTransport):
        def send(self, url: str, api_key: str, body: bytes, timeout: Tuple[float, float]) -> Reply:
            gate.wait(30)
            return super().send(url, api_key, body, timeout)

    transport = Gated(delay=0.0)
    options = make_options(api_host="https://api.zaius.com", api_key="k" * 12, max_in_flight=8)
    wake = Wake()
    senders = Senders(options, lambda _options: transport, wake)
    senders.start()
    target = Target("http://127.0.0.1:9", "key", "http://127.0.0.1:9/v3/events")
    try:
        for i in range(6):  # more batches than threads, with the limit at 4: no thread more
            senders.submit(_Batch([Encoded(b"{}", f"a-{i}")], target))
        assert _sender_threads(senders) == INITIAL_IN_FLIGHT
        senders._control._limit = 6  # grown (as slow start does after flat round trips)
        for i in range(6):
            senders.submit(_Batch([Encoded(b"{}", f"b-{i}")], target))
        assert _sender_threads(senders) == 6  # up to the limit, as batches wait for a thread
        senders._control._limit = 8
        senders.submit(_Batch([Encoded(b"{}", "c-0")], target))
        assert _sender_threads(senders) == 7  # one per hand-over
    finally:
        gate.set()
        senders.stop()
