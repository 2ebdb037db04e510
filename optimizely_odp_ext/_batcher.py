"""From the caller's queue to batches, on the worker thread: resolve each event's target, encode it
once, write it to the spool (opt-in), and cut batches by target, count and bytes.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

from . import _compat
from ._batch import Target, _Batch
from ._outcomes import Outcomes
from ._stats import UNDETERMINED
from .event import Encoded, Pending, encode

_log = logging.getLogger(__name__)


class Batcher(Outcomes):
    """Moves events from ``_queue`` (and the spool's backlog) to ``Ledger.ready``, and from there into batches."""

    __slots__ = ()

    def _ingest(self, limit: int) -> None:
        """Moves events to the ready list: the spool's backlog first, then the caller's queue.

        Each event's target is resolved, its ``idempotence_id`` drawn and its JSON encoded once;
        with the spool on, the group is appended to the spool before it can be sent.
        """
        ready = self._ledger.ready
        self._spool.recover(ready, limit, self._tally.later)
        queue = self._queue
        group: List[Tuple[Target, Encoded]] = []
        max_bytes = self.options.max_batch_bytes
        max_body = max_bytes - 2  # a batch of one: the body between "[" and "]"
        ledger, counts = self._ledger, self._counts
        while queue and len(ready) < limit:
            # Pop first, then look: with overflow="drop_oldest" callers pop from this end too.
            try:
                item = queue.popleft()
            except IndexError:
                break
            pending, target = item
            if target is None:
                # Sent before the datafile arrived: it takes the first ODP settings, once known.
                if self._odp.state is UNDETERMINED:
                    queue.appendleft(item)
                    break
                target = self._odp.initial
            ledger.popped += 1
            if target is None:
                self._drop_unintegrated(pending)
                continue
            try:
                encoded = encode(pending, self._defaults, ledger.popped + counts.popped - 1)
            except Exception as exc:
                # Whatever a pathological value raises (TypeError, RecursionError, MemoryError from a
                # str subclass's __str__, ...), this event reaches an outcome and the others go on.
                self._tally.drop([pending], "unencodable", _compat.ODP_EVENT_FAILED.format(
                    f"event cannot be encoded ({exc.__class__.__name__}: {str(exc)[:200]}); dropped"))
                continue
            if len(encoded.body) > max_body:
                self._drop([encoded], "too_large", _compat.ODP_EVENT_FAILED.format(
                    f"event {encoded.idempotence_id} is {len(encoded.body)} bytes, over max_batch_bytes "
                    f"({max_bytes}); dropped"))
                continue
            ready.append((encoded, target))
            group.append((target, encoded))
            if len(group) >= self.door.batch_size and self._spool.disk is not None:
                # Written as it goes: a caller outpacing this loop must not keep everything in memory.
                self._spool_append(group)
                group = []
        if group and self._spool.disk is not None:
            self._spool_append(group)

    def _spool_append(self, group: List[Tuple[Target, Encoded]]) -> None:
        refused = self._spool.append(group, self._tally.later)
        if refused:
            # Over spool_max_bytes: the newest events of this group were not written; drop them.
            for _ in refused:
                self._ledger.ready.pop()
            self._drop(refused, "queue_full", None)

    def _take_batch(self, batch_size: int) -> Optional[_Batch]:
        """The next batch from the ready list: one target, up to ``batch_size`` events and max_batch_bytes."""
        events: List[Encoded] = []
        target: Optional[Target] = None
        # The batch's size so far, without its closing "]": each event adds its body and one byte
        # before it ("[" for the first, "," after), so the joined array is ``used + 1`` bytes
        # (``batch_size_bytes``, kept in one running sum rather than recomputed per event).
        used = 0
        max_bytes = self.options.max_batch_bytes
        ready = self._ledger.ready
        while ready and len(events) < batch_size:
            encoded, item_target = ready[0]
            if target is None:
                target = item_target
            elif item_target != target:
                break
            used += len(encoded.body) + 1
            if used + 1 > max_bytes and events:
                break
            ready.popleft()
            events.append(encoded)
        if not events or target is None:
            return None
        return _Batch(events, target)

    def _batch_cap(self, waiting: int, slots: int) -> int:
        """Events for the next batch: ``batch_size``, or more when a backlog waits.

        A backlog of ``waiting`` events is spread over the ``slots`` requests that may be in flight,
        up to ``max_batch_size`` (ODP's 500 by default): over a slow link a request carries more
        events rather than waiting a round trip per ``batch_size`` (and each event costs less CPU).
        """
        return max(self.door.batch_size, min(self.options.max_batch_size, waiting // slots))

    def _drop_unintegrated(self, pending: Pending) -> None:
        # Counted one by one, logged once per run of them (when the run ends).
        tally = self._tally
        tally.drop([pending], "not_integrated", None, _compat.ODP_NOT_INTEGRATED)
        if not self._queue or self._queue[0][1] is not None:
            self._tally.later(self.logger.error,
                f"{_compat.ODP_NOT_INTEGRATED} Discarded event(s) sent before the datafile was loaded "
                f"({tally.dropped['not_integrated']} so far).")
