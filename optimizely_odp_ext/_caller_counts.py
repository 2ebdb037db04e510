"""What the caller's side of a manager counts: calls refused before queueing, and events dropped
because the queue was full. A component that owns its state, written by callers only, on rare paths.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any, Deque, Dict, List

from ._batch import _Item
from ._stats import REFUSE_REASONS
from .event import Pending

_WARN_EVERY = 10.0  # seconds between two "queue full" (or "still failing", "spool full") warnings


class CallerCounts:
    """What the caller's side counts, on rare paths only, under its own lock: calls refused before
    queueing, and events dropped because the queue was full (kept for the worker to report them to
    ``on_outcome``). The worker and ``stats()`` read the counts; only callers write them."""

    __slots__ = ("_capacity", "_last_warning", "_lock", "_logger", "_report", "_since_warning", "overflowed", "popped",
                 "refused", "to_report")

    def __init__(self, capacity: int, logger: Any, report: bool) -> None:
        """
        Args:
            capacity: The queue's capacity (for the warning).
            logger: Where the "queue is full" warning goes.
            report: Whether ``on_outcome`` is to hear of the drops.
        """
        self._capacity = capacity
        self._logger = logger
        self._report = report
        # Re-entrant: our SIGTERM handler may close (and count) inside a caller that holds it.
        self._lock = threading.RLock()
        self.overflowed = 0  # accepted, then dropped as queue_full
        self.popped = 0  # drop_oldest: events that left the queue from the caller's side
        self.refused: Dict[str, int] = dict.fromkeys(REFUSE_REASONS, 0)
        self.to_report: Deque[Pending] = collections.deque()  # on_outcome only: dropped, not reported yet
        self._since_warning = 0
        self._last_warning = -_WARN_EVERY

    def remake(self) -> None:
        """Green primitives for a process patched since (see ManagerState._remake_primitives)."""
        self._lock = threading.RLock()

    def refuse(self, reason: str) -> None:
        """Counts one call refused before queueing (one of :data:`REFUSE_REASONS`)."""
        with self._lock:
            self.refused[reason] += 1

    def overflow(self, queue: Deque[_Item], pending: Pending, drop_oldest: bool) -> bool:
        """Counts the drop a full ``queue`` makes. Returns True when ``pending`` may still be appended
        (``drop_oldest``: the oldest event was taken out in its place)."""
        now = time.monotonic()
        with self._lock:
            self.overflowed += 1
            self._since_warning += 1
            make_room = drop_oldest
            dropped_event = pending
            if make_room:
                try:
                    dropped_event = queue.popleft()[0]
                    self.popped += 1
                except IndexError:
                    # Everything waiting is already with the worker (read from the spool, or
                    # encoded): nothing older to drop here, so the new event is the one dropped.
                    make_room = False
            if self._report:
                self.to_report.append(dropped_event)
            if now - self._last_warning >= _WARN_EVERY:
                dropped, self._since_warning = self._since_warning, 0
                self._last_warning = now
                self._logger.warning(f"ODP event queue is full ({self._capacity} events); dropped {dropped} "
                                     f"{'oldest' if make_room else 'new'} event(s) since the last warning.")
        return make_room

    def take_report(self) -> List[Pending]:
        """The dropped events ``on_outcome`` has not heard of yet (the worker, or the close's finisher)."""
        dropped: List[Pending] = []
        with contextlib.suppress(IndexError):
            while True:
                dropped.append(self.to_report.popleft())
        return dropped
