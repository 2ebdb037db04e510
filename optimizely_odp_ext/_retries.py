"""Batches waiting for another attempt, and whether ODP is failing: a component of the worker.

It owns the retry heap (by due time, then by arrival) and the outage state: since when deliveries
fail, the last "still failing" warning, and whether the one probe an outage allows is in flight.
The worker (or the close's finisher) calls it under the ledger only.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, List, Optional, Tuple

from ._batch import _Batch
from ._caller_counts import _WARN_EVERY


class Retries:
    """The retry heap and the outage it may be part of."""

    __slots__ = ("_heap", "_last_warning", "_seq", "failing_since", "probe_in_flight")

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, _Batch]] = []
        self._seq = itertools.count()
        self.failing_since: Optional[float] = None  # the first failure of the current outage
        self.probe_in_flight = False  # while failing: the one retry sent to see whether ODP answers again
        self._last_warning = -_WARN_EVERY

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, batch: _Batch, due: float, now: float) -> bool:
        """Schedules ``batch`` for ``due``; ODP is failing from ``now`` on (unless it already was).

        Returns:
            True when a "still failing" warning is due (at most one per _WARN_EVERY).
        """
        heapq.heappush(self._heap, (due, next(self._seq), batch))
        if self.failing_since is None:
            self.failing_since = now
        if now - self._last_warning < _WARN_EVERY:
            return False
        self._last_warning = now
        return True

    def next_due(self) -> Optional[float]:
        """When the next retry is due; None with none waiting, or while the probe is out."""
        if not self._heap or self.probe_in_flight:
            return None
        return self._heap[0][0]

    def pop_due(self, now: float) -> Optional[_Batch]:
        """The oldest retry due by ``now``, taken off the heap, or None."""
        if self._heap and self._heap[0][0] <= now:
            return heapq.heappop(self._heap)[2]
        return None

    def due_by(self, when: float, every: bool) -> None:
        """Brings retries forward to ``when``: all of them (``every``: ODP answers again), or only
        those due later (a close cuts waits short)."""
        self._heap = [(when if every else min(due, when), seq, batch) for due, seq, batch in self._heap]
        heapq.heapify(self._heap)

    def recovered(self, now: float) -> float:
        """ODP answers again: every waiting retry may go now, oldest first. Returns the outage's length."""
        assert self.failing_since is not None
        outage = now - self.failing_since
        self.failing_since = None
        self.due_by(now, every=True)
        return outage

    def take_expired(self, expired: Callable[[_Batch], bool]) -> List[_Batch]:
        """Takes off the heap the retries for which ``expired`` is true, and returns them."""
        kept: List[Tuple[float, int, _Batch]] = []
        gone: List[_Batch] = []
        for entry in self._heap:
            if expired(entry[2]):
                gone.append(entry[2])
            else:
                kept.append(entry)
        if gone:
            heapq.heapify(kept)
            self._heap = kept
        return gone

    def let_go(self) -> None:
        """At close: every waiting retry is counted from the manager's batches (see ``Ledger.live``)."""
        self._heap = []
