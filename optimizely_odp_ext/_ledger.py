"""The ledger: a component that owns the worker's delivery state, and the lock every hand-off takes.

Whoever moves an event from one owner to the next (the caller's queue, :attr:`Ledger.ready`, a batch in
:attr:`Ledger.live`) or to an outcome holds :attr:`Ledger.lock`: the worker for each pass, the closing
thread when it takes over from a worker that has let go of it (see ``EventManager.end_close``), a late
caller draining the queue after the close. ``stats()`` reads under it, so its numbers add up. Never
held across a callback, a log line or a wait: what a holder has to say (``on_outcome``, log lines) goes
to the tally's outbox and is said once the lock is released.

Everything here is written under the lock only; others read without it where one atomic read is enough
(``flush()``'s barrier reads :attr:`Ledger.popped`, the stall check :attr:`Ledger.last_pass`).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Deque, Dict, Optional, Tuple

from ._batch import Target, _Batch
from ._retries import Retries
from .event import Encoded


class Ledger:
    """What the worker holds, between the caller's queue and an outcome, and the lock it holds it under."""

    __slots__ = ("last_pass", "live", "live_events", "lock", "partial_since", "popped", "priority", "ready",
                 "refusing_alike", "retry", "seen_empty")

    def __init__(self) -> None:
        self.remake()
        self.popped = 0  # events taken from the caller's queue by the worker (or a close)
        # Events taken from the queue: target resolved, encoded once (and spooled, with the spool on).
        self.ready: Deque[Tuple[Encoded, Target]] = collections.deque()
        self.live: Dict[int, _Batch] = {}  # every batch we own: in flight, retrying, queued next, held
        self.live_events = 0  # events in live: pending = queue + ready + this
        self.priority: Deque[_Batch] = collections.deque()  # sent before new batches: halves, samples, re-keyed
        self.retry = Retries()  # batches waiting for another attempt, and the outage (see _retries)
        self.refusing_alike: Optional[int] = None  # an HTTP status ODP answers every part of batches with
        self.partial_since: Optional[float] = None  # when the batch being filled got its first event
        self.seen_empty = True  # the last dispatch found nothing waiting: callers wake the worker
        self.last_pass = time.monotonic()  # the worker's last pass (the stall check reads it)

    def remake(self) -> None:
        """The lock, of this process's threading world now (real, or green: see _threads)."""
        self.lock = threading.RLock()

    def own(self, batch: _Batch) -> None:
        """A new batch of events we hold (sent, retried, queued next or held): pending until it ends."""
        self.live[id(batch)] = batch
        self.live_events += len(batch.events)

    def finish(self, batch: _Batch) -> None:
        """The batch reached an outcome (or was replaced by its parts): it is no longer pending."""
        if self.live.pop(id(batch), None) is not None:
            self.live_events -= len(batch.events)

    def pending(self, queued: int) -> int:
        """Events held by an owner: the caller's queue (``queued`` of them), ``ready``, the batches in ``live``."""
        return queued + len(self.ready) + self.live_events

    def low_water(self, low: int) -> int:
        """The lowest sequence number still held, given ``low`` for what the queue and the spool hold."""
        if self.ready:
            low = min(low, self.ready[0][0].seq)
        for batch in self.live.values():
            low = min(low, batch.min_seq)
        return low
