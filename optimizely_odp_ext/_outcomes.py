"""The counters, in one place: every outcome of an event (delivered, each drop reason, a refused call)
is counted here, acknowledged to the spool and reported to ``on_outcome``.

Delivered and dropped events are counted under the ledger (``ManagerState._ledger``) by the one party
that removes them from their owner; the caller's side counts refused calls and queue overflows under
``_count_lock`` (rare paths only). ``pending`` is what the owners hold, counted from them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

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

    def _own(self, batch: _Batch) -> None:
        """A new batch of events we hold (sent, retried, queued next or held): pending until it ends."""
        self._live[id(batch)] = batch
        self._live_events += len(batch.events)

    def _finish_batch(self, batch: _Batch) -> None:
        """The batch reached an outcome (or was replaced by its parts): it is no longer pending."""
        if self._live.pop(id(batch), None) is not None:
            self._live_events -= len(batch.events)

    def _drop(self, events: List[Encoded], reason: str, line: Optional[str]) -> None:
        self._dropped[reason] += len(events)
        self._ack(events)
        if line:
            self._later(self.logger.error, line)
        self._report(reason, events, line or reason)

    def _later(self, say: Callable[..., Any], *args: Any) -> None:
        """Says something (a log line, an on_outcome call) once the ledger is released: in order,
        on the thread that holds it now, never while holding it (see ManagerState._ledger)."""
        self._outbox.append((say, args))

    def _report(self, outcome: str, events: Sequence[Union[Encoded, Pending]], detail: str) -> None:
        """Reports ``events`` to ``on_outcome`` (once the ledger is released)."""
        if self._on_outcome is not None and events:
            self._outbox.append((self._call_on_outcome, (outcome, list(events), detail)))

    def _call_on_outcome(self, outcome: str, events: List[Union[Encoded, Pending]], detail: str) -> None:
        """Calls ``on_outcome(outcome, events, detail)``; an exception in it is logged once and contained."""
        callback = self._on_outcome
        if callback is None:
            return
        try:
            callback(outcome, [_as_dict(e) for e in events], detail)
        except Exception as exc:
            with self._count_lock:
                self._outcome_failures += 1
                first = self._outcome_failures == 1
            if first:
                _log.debug("on_outcome raised", exc_info=True)
                self.logger.error(f"ODP on_outcome callback raised {exc.__class__.__name__}: {str(exc)[:200]} "
                                  "(logged once; delivery goes on).")

    def _take_outbox(self) -> List[Tuple[Callable[..., Any], Tuple[Any, ...]]]:
        """What the ledger's holder has to say; called under the ledger, said after (:meth:`_say_all`)."""
        outbox = self._outbox
        if outbox:
            self._outbox = []
        return outbox

    @staticmethod
    def _say_all(outbox: List[Tuple[Callable[..., Any], Tuple[Any, ...]]]) -> None:
        for say, args in outbox:
            try:
                say(*args)
            except Exception:  # a logging handler that raises: its line is lost, nothing else
                _log.debug("saying %r failed", say, exc_info=True)

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

    def _drain_queue(self) -> int:
        """Under the ledger, once closed: what is left in the caller's queue ends as ``shutdown``."""
        drained: List[Pending] = []
        with contextlib.suppress(IndexError):
            while True:
                drained.append(self._queue.popleft()[0])
        if drained:
            self._popped += len(drained)
            self._dropped["shutdown"] += len(drained)
            self._report("shutdown", drained, "not sent by the close deadline")
        return len(drained)

    def _pending(self, queued: int) -> int:
        """Events held by an owner: the caller's queue (``queued`` of them), ``_ready``, the batches in ``_live``."""
        return queued + len(self._ready) + self._live_events

    def stats(self) -> OdpEventStats:
        """Delivery counts so far, in this process (every key: :class:`OdpEventStats`)."""
        if self._pid != os.getpid():
            # A child forked without Python's fork hooks (uWSGI forks in C) starts with its own zero
            # counts, not its parent's.
            self._after_fork()
        with self._ledger:
            queued = len(self._queue)  # read once: callers append meanwhile, without the ledger
            overflowed = self._overflowed  # likewise: counted in accepted and in dropped alike
            dropped = dict(self._dropped)
            dropped["queue_full"] += overflowed
            # drop_oldest: an event popped by the caller to make room is in _overflowed, and the new
            # one took its place in the queue, so each accepted event is counted exactly once.
            accepted = self._popped + queued + overflowed + self._recovered_count
            return {
                "accepted": accepted,
                "delivered": self._delivered,
                "dropped": dropped,
                "pending": self._pending(queued),
                "recovered": self._recovered_count,
                "left_in_spool": self._left_in_spool,
                "refused": dict(self._refused),
                "requests": self._requests,
                "retries": self._retries,
                "queued": queued,
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
