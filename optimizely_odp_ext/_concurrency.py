"""Adaptive request concurrency: how many requests may be in flight, learnt from the replies.

Over a slow link a fixed number of requests in flight caps throughput at about
``in_flight x batch / RTT``. This controller follows Vector's adaptive request concurrency
(``src/sinks/util/adaptive_concurrency/controller.rs``), an AIMD loop on round-trip times:

* every reply's RTT (each attempt timed on its own, retries included) goes into the current window's
  mean; once per window (one past mean RTT long) the window is judged against the past, an
  exponentially weighted mean of the windows' RTTs and of their absolute deviation;
* **additive increase**: +1 when the limit was reached during the window (the senders wanted more),
  nothing pushed back, and the window's RTT was no worse than the past mean;
* **multiplicative decrease**: x ``decrease_ratio`` (0.9, rounded down, at least 1) when a reply
  pushed back (429, 503 and other 5xx, 408, a timeout or a network error) or the window's RTT rose past
  the mean plus ``deviation_scale`` (2.5) deviations, or a tenth of the mean if more (a deviation learnt
  from a few flat windows is near zero, and jitter would otherwise count as a rise);
* the limit stays within ``1 .. ceiling``; ``ceiling`` is the user's ``max_in_flight``;
* **slow start** (TCP's, not Vector's; on by default): until the first decrease the limit doubles per
  window instead of growing by one, as long as the window's RTT stays within the mean plus
  ``deviation_scale`` deviations. ``benchmarks/adaptive_bench.py`` showed +1 per round trip too slow
  for a burst of a few seconds at 50 ms.

Pure logic with an injectable clock; thread-safe (every sender reports to one controller). It does not
send, wait or retry: back-pressure and retries stay where they are (the scheduler and retry policy).
``Senders`` (``_senders.py``) keeps to it, starting at 4 (or ``max_in_flight`` if lower) with slow start.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

__all__ = ["AdaptiveConcurrency", "pushes_back"]


def pushes_back(status: int) -> bool:
    """Whether a reply says "slow down": network error or timeout (0), 408, 429 or any 5xx."""
    return status == 0 or status in (408, 429) or status >= 500


class AdaptiveConcurrency:
    """The in-flight limit for one destination, adjusted once per round trip.

    Args:
        ceiling: The most requests ever in flight (``max_in_flight``).
        initial: The limit to start from (clamped to ``1 .. ceiling``).
        clock: Seconds, monotonic (tests pass a fake one).
        decrease_ratio: The factor applied on back-pressure.
        ewma_alpha: Weight of the newest window in the past mean and deviation.
        deviation_scale: How many deviations above the past mean count as rising latency.
        slow_start: Double the limit per window until the first decrease.
    """

    def __init__(self, ceiling: int, initial: int = 1, *, clock: Callable[[], float] = time.monotonic,
                 decrease_ratio: float = 0.9, ewma_alpha: float = 0.4, deviation_scale: float = 2.5,
                 slow_start: bool = True) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        if not 0.0 < decrease_ratio < 1.0 or not 0.0 < ewma_alpha <= 1.0 or deviation_scale < 0:
            raise ValueError("decrease_ratio in (0, 1), ewma_alpha in (0, 1], deviation_scale >= 0")
        self._ceiling = ceiling
        self._limit = min(max(initial, 1), ceiling)
        self._clock = clock
        self._decrease = decrease_ratio
        self._alpha = ewma_alpha
        self._scale = deviation_scale
        self._lock = threading.Lock()
        self._in_flight = 0
        self._past_mean: Optional[float] = None
        self._past_deviation = 0.0
        self._window_sum = 0.0
        self._window_count = 0
        self._window_end: Optional[float] = None
        self._reached_limit = False
        self._pushed_back = False
        self._slow_start = slow_start

    @property
    def limit(self) -> int:
        """Requests that may be in flight now."""
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def past_rtt(self) -> Optional[float]:
        """The weighted mean RTT of past windows (None before the first window ends)."""
        return self._past_mean

    def try_acquire(self) -> bool:
        """Takes a slot for one request if the limit allows it; notes when the limit held a request back.

        Returns:
            True when the request may start (then :meth:`release` must follow, once).
        """
        with self._lock:
            if self._in_flight >= self._limit:
                self._reached_limit = True
                return False
            self._in_flight += 1
            if self._in_flight >= self._limit:
                self._reached_limit = True
            return True

    def release(self, rtt: Optional[float], status: int) -> None:
        """Gives the slot back with what the request came to.

        Args:
            rtt: Seconds from sending to the reply (None when the attempt did not reach the network).
            status: The reply's status, 0 for a network error or timeout.
        """
        with self._lock:
            self._in_flight = max(self._in_flight - 1, 0)
            if pushes_back(status):
                self._pushed_back = True
            elif rtt is not None and rtt >= 0:
                self._window_sum += rtt
                self._window_count += 1
            now = self._clock()
            if self._window_end is None:
                self._window_end = now + (rtt or 0.0)
            elif now >= self._window_end:
                self._adjust(now)

    def _adjust(self, now: float) -> None:
        """Judges the window that just ended and starts the next one (under the lock)."""
        current = self._window_sum / self._window_count if self._window_count else None
        past = self._past_mean
        # A deviation learnt from a few flat windows is near zero: jitter under a tenth of the RTT is not a rise.
        rising = (current is not None and past is not None
                  and current > past + max(self._scale * self._past_deviation, 0.1 * past))
        if self._pushed_back or rising:
            self._limit = max(int(self._limit * self._decrease), 1)
            self._slow_start = False
        elif current is not None and past is not None and self._reached_limit and self._limit < self._ceiling:
            if self._slow_start:
                self._limit = min(self._limit * 2, self._ceiling)
            elif current <= past:
                self._limit += 1
        if current is not None:
            if past is None:
                self._past_mean = current
            else:
                self._past_deviation += self._alpha * (abs(current - past) - self._past_deviation)
                self._past_mean = past + self._alpha * (current - past)
        self._window_end = now + (self._past_mean or 0.0)
        self._window_sum, self._window_count = 0.0, 0
        self._reached_limit = self._in_flight >= self._limit
        self._pushed_back = False
