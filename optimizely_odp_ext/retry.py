"""When to retry a batch, and how long to wait: backoff with jitter, Retry-After, the retry window.

ODP answers 202 for an accepted batch. Network errors, timeouts, 5xx, 408 and 429 may succeed later;
400 and 413 mean something inside the batch is wrong, so the batch is split until the offending
event is alone; every other 4xx (401, 403, 404, ...) will not succeed on retry.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import math
import random
import time
from typing import Optional

from typing_extensions import Final

NETWORK_ERROR: Final = 0


class Verdict(enum.Enum):
    """What to do with a batch after one attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    SPLIT = "split"
    DROP = "drop"


def classify(status: int, batch_len: int) -> Verdict:
    """Classifies one reply for a batch of ``batch_len`` events.

    Args:
        status: The HTTP status, or :data:`NETWORK_ERROR` (0) when no reply arrived.
        batch_len: How many events the batch holds.

    Returns:
        The verdict. A 400 or 413 for a single event is a :attr:`Verdict.DROP`.
    """
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status == NETWORK_ERROR or status in (408, 429) or status >= 500:
        return Verdict.RETRY
    if status in (400, 413):
        return Verdict.SPLIT if batch_len > 1 else Verdict.DROP
    return Verdict.DROP


def parse_retry_after(value: Optional[str], now_wall: Optional[float] = None) -> Optional[float]:
    """Parses a ``Retry-After`` header: delta-seconds or an HTTP date.

    Args:
        value: The header's value, or None.
        now_wall: The current wall-clock time (``time.time()``), for HTTP dates; tests pass it.

    Returns:
        Seconds to wait (never negative), or None when absent or unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 7231: the asctime and "-0000" forms are GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        # An HTTP date is wall-clock by definition; this is the one place time.time() belongs.
        seconds = when.timestamp() - (time.time() if now_wall is None else now_wall)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class RetryPolicy:
    """Exponential backoff with equal jitter, capped, honouring Retry-After, inside a retry window.

    Args:
        base: The first backoff, in seconds.
        cap: The largest backoff, in seconds.
        window: How long after a batch's first attempt it may still be retried, in seconds.
        retry_after_cap: The longest ``Retry-After`` honoured, in seconds.
        rng: The random source (tests seed it).
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        window: float = 300.0,
        retry_after_cap: float = 60.0,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.window = window
        self.retry_after_cap = retry_after_cap
        self._rng = rng or random.Random()

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """The wait before retry number ``attempt`` (1 for the first retry).

        Args:
            attempt: How many attempts have failed so far (at least 1).
            retry_after: The server's ``Retry-After``, in seconds, when it sent one.

        Returns:
            Seconds to wait.
        """
        if retry_after is not None:
            # Small jitter on top so that many clients told the same thing do not return together.
            return float(min(retry_after, self.retry_after_cap) + self._rng.uniform(0, 0.1 * self.base))
        ceiling = min(self.cap, self.base * (2 ** min(max(attempt - 1, 0), 30)))
        return float(ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    def expired(self, first_attempt: float, now: float) -> bool:
        """Whether a batch first tried at ``first_attempt`` (monotonic) is past its window."""
        return now - first_attempt >= self.window
