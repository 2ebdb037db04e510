"""The counters, in one place: every outcome of an event (delivered, each drop reason, a refused call)
is counted here, acknowledged to the spool and reported to ``on_outcome``.

The worker thread counts delivered and dropped events without a lock (it is their only writer); the
caller's side counts refused calls and queue overflows under ``_count_lock`` (rare paths only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from ._batch import _Batch
from ._state import ManagerState
from ._stats import OdpEventStats
from .event import Encoded, Pending

_log = logging.getLogger(__name__)


class Outcomes(ManagerState):
    """Counting, acknowledging and reporting outcomes; :meth:`stats` reads them."""

    __slots__ = ()

    def count_invalid(self) -> None:
        """Counts one call discarded by validation (for :meth:`stats`)."""
        self.count_refused("invalid_input")

    def count_refused(self, reason: str) -> None:
        """Counts one call refused before queueing, by reason (one of :data:`REFUSE_REASONS`)."""
        with self._count_lock:
            self._refused[reason] += 1

    def _finish_batch(self, batch: _Batch) -> None:
        """The batch reached an outcome (or was replaced by its parts): it is no longer pending."""
        self._live.pop(id(batch), None)

    def _drop(self, events: List[Encoded], reason: str, line: Optional[str]) -> None:
        self._dropped[reason] += len(events)
        self._ack(events)
        if line:
            self.logger.error(line)
        if self._on_outcome is not None:
            self._report(reason, events, line or reason)

    def _report(self, outcome: str, events: Sequence[Union[Encoded, Pending]], detail: str) -> None:
        """Calls ``on_outcome(outcome, events, detail)``; an exception in it is logged once and contained."""
        callback = self._on_outcome
        if callback is None or not events:
            return
        try:
            callback(outcome, [_as_dict(e) for e in events], detail)
        except Exception as exc:
            self._outcome_failures += 1
            if self._outcome_failures == 1:
                _log.debug("on_outcome raised", exc_info=True)
                self.logger.error(f"ODP on_outcome callback raised {exc.__class__.__name__}: {str(exc)[:200]} "
                                  "(logged once; delivery goes on).")

    def _ack(self, events: List[Encoded]) -> None:
        """An outcome was reached: the spool need not keep these any longer."""
        if self._spool is not None:
            try:
                self._spool.ack(events)
            except Exception:
                _log.exception("spool ack failed")

    def _report_overflow(self) -> None:
        dropped: List[Pending] = []
        with contextlib.suppress(IndexError):
            while True:
                dropped.append(self._overflow_report.popleft())
        self._report("queue_full", dropped, f"ODP event queue is full ({self._capacity} events)")

    def _report_left_at_close(self) -> None:
        """on_outcome at close: what was in flight (unconfirmed) and what was never sent (shutdown)."""
        if self._overflow_report:
            self._report_overflow()
        in_flight = [e for batch in list(self._in_flight_batches.values()) for e in batch.events]
        flying = {id(e) for e in in_flight}
        left: List[Union[Encoded, Pending]] = [e for batch in list(self._live.values()) for e in batch.events
                                               if id(e) not in flying]
        left += [e for e, _ in list(self._ready)]
        self._report("unconfirmed", in_flight, "in flight at the close deadline: ODP may have them")
        self._report("shutdown", left, "not sent by the close deadline")

    def _pending_count(self) -> int:
        return (self._accepted() - self._delivered - sum(self._dropped.values()) - self._overflowed
                - self._left_in_spool)

    def _accepted(self) -> int:
        # drop_oldest: an event popped by the caller to make room is in _overflowed, and the new
        # one took its place in the queue, so each accepted event is counted exactly once.
        return self._popped + len(self._queue) + self._overflowed + self._recovered_count

    def stats(self) -> OdpEventStats:
        """Delivery counts so far, in this process (every key: :class:`OdpEventStats`)."""
        if self._pid != os.getpid():
            # A child forked without Python's fork hooks (uWSGI forks in C) starts with its own zero
            # counts, not its parent's.
            self._after_fork()
        dropped = dict(self._dropped)
        dropped["queue_full"] += self._overflowed
        accepted = self._accepted()
        return {
            "accepted": accepted,
            "delivered": self._delivered,
            "dropped": dropped,
            "pending": max(accepted - self._delivered - sum(dropped.values()) - self._left_in_spool, 0),
            "recovered": self._recovered_count,
            "left_in_spool": self._left_in_spool,
            "refused": dict(self._refused),
            "requests": self._requests,
            "retries": self._retries,
            "queued": len(self._queue),
            "state": self._state,
        }


def _as_dict(event: Union[Encoded, Pending]) -> Dict[str, Any]:
    """One event as on_outcome gets it: type, action, identifiers, data (with idempotence_id)."""
    if isinstance(event, Encoded):
        body: Dict[str, Any] = json.loads(event.body)
        body["idempotence_id"] = event.idempotence_id
        return body
    type_, action, identifiers, data = event
    idempotence_id = data.get("idempotence_id") if data else None
    return {"type": type_, "action": action, "identifiers": dict(identifiers), "data": dict(data or {}),
            "idempotence_id": idempotence_id}


def _reasons(dropped: Dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count)
