"""Each outcome handed to the tally (:mod:`._tally`) and acknowledged to the spool, and :meth:`Outcomes.stats`.

Delivered and dropped events are counted under the ledger's lock (:mod:`._ledger`) by the one party
that removes them from their owner; the caller's side counts refused calls and queue overflows under
their own lock (:mod:`._caller_counts`, rare paths only). ``pending`` is what the owners hold, counted from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import List, Optional

from ._state import ManagerState
from ._stats import OdpEventStats
from .event import Encoded, Pending

_log = logging.getLogger(__name__)


class Outcomes(ManagerState):
    """Holding batches, ending them in an outcome (counted by the tally), and :meth:`stats`."""

    __slots__ = ()

    def count_invalid(self) -> None:
        """Counts one call discarded by validation (for :meth:`stats`)."""
        self.count_refused("invalid_input")

    def count_refused(self, reason: str) -> None:
        """Counts one call refused before queueing, by reason (one of :data:`REFUSE_REASONS`)."""
        self._counts.refuse(reason)

    def _drop(self, events: List[Encoded], reason: str, line: Optional[str]) -> None:
        """Events that were encoded (and spooled) end dropped: the spool lets them go, the tally counts."""
        self._ack(events)
        self._tally.drop(events, reason, line)

    def _ack(self, events: List[Encoded]) -> None:
        """An outcome was reached: the spool need not keep these any longer."""
        self._spool.ack(events)

    def _report_overflow(self) -> None:
        self._tally.report("queue_full", self._counts.take_report(),
                           f"ODP event queue is full ({self.door.capacity} events)")

    def _drain_queue(self) -> int:
        """Under the ledger, once closed: what is left in the caller's queue ends as ``shutdown``."""
        drained: List[Pending] = []
        with contextlib.suppress(IndexError):
            while True:
                drained.append(self._queue.popleft()[0])
        if drained:
            self._ledger.popped += len(drained)
            self._tally.drop(drained, "shutdown", None, "not sent by the close deadline")
        return len(drained)

    def stats(self) -> OdpEventStats:
        """Delivery counts so far, in this process (every key: :class:`OdpEventStats`)."""
        if self._life.pid != os.getpid():
            # A child forked without Python's fork hooks (uWSGI forks in C) starts with its own zero
            # counts, not its parent's.
            self._after_fork()
        with self._ledger.lock:
            queued = len(self._queue)  # read once: callers append meanwhile, without the ledger
            counts = self._counts
            overflowed = counts.overflowed  # likewise: counted in accepted and in dropped alike
            tally = self._tally
            dropped = dict(tally.dropped)
            dropped["queue_full"] += overflowed
            # drop_oldest: an event popped by the caller to make room is in overflowed, and the new
            # one took its place in the queue, so each accepted event is counted exactly once.
            accepted = self._ledger.popped + queued + overflowed + self._spool.recovered
            return {
                "accepted": accepted,
                "delivered": tally.delivered,
                "dropped": dropped,
                "pending": self._ledger.pending(queued),
                "recovered": self._spool.recovered,
                "left_in_spool": tally.left_in_spool,
                "refused": dict(counts.refused),
                "requests": tally.requests,
                "retries": tally.retries,
                "queued": queued,
                "state": self._odp.state,
            }
