"""The delivery scheduler: the worker thread's loop and what happens to each batch.

Flow on the worker, each pass:

1. take the senders' replies: count deliveries, schedule retries, split rejected batches
   (:mod:`._bisect`), send events queued under a replaced key with the current one (``_rekey``);
2. dispatch: split halves first, then a due retry (only one "probe" while ODP is failing, so an
   outage costs one request per backoff period and order of arrival is kept), then new batches
   (:mod:`._batcher`) once a batch is full or ``flush_interval`` has passed;
3. sleep until woken (a full batch, a reply, a flush, close) or until the next deadline.

Everything here runs on the worker thread only, which owns the delivery state: no locks.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from . import _compat
from ._batch import _Batch, _describe, _first_attempt, _rejection
from ._batcher import Batcher
from ._bisect import Bisector
from ._state import _IDLE_WAKE, SPOOL_INTERVAL
from ._stats import UNDETERMINED
from .retry import Verdict, classify
from .transport import Reply, mask_key

_log = logging.getLogger(__name__)


class Scheduler(Batcher, Bisector):
    """The worker loop (``_run``/``_step``), the outcome of each reply, retries, the probe, dispatching."""

    __slots__ = ()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._life.ended = True

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            with self._ledger.lock:
                if self._life.finished:
                    # A close finished without us: before we ran (see EventManager._start), or it took
                    # over while we were out of the ledger (see EventManager.end_close).
                    return
                try:
                    timeout = self._step()
                except Exception:
                    # The worker never dies: log and go on (state stays consistent: every mutation
                    # above is completed before the next can fail).
                    _log.exception("ODP event worker: unexpected error; continuing")
                    self._tally.later(self.logger.error, "ODP event worker hit an unexpected error and carries on.")
                    timeout = 0.05
                outbox = self._tally.take()
            # Callbacks and log lines run with the ledger released: a slow or re-entrant one changes
            # timing, never counts.
            self._tally.say_all(outbox)
            if timeout is None:
                if self._life.closing:
                    self._finish()  # closing, and done or out of time: the worker is the finisher
                return
            if timeout > 0:
                # Callers wake an idle worker on every append (see enqueue); the flag is raised
                # before the last look at the queue, so an append is either seen here or wakes us.
                # Only a worker whose last dispatch found nothing waiting is woken by callers; any
                # other worker has a timer that covers a new event (the flush interval of the
                # batch being filled, a backoff, the close deadline), or a reply or a full batch
                # wakes it, and new events could not be sent before that anyway.
                door = self.door
                door.idle = self._ledger.seen_empty
                if not (door.idle and self._queue):
                    self._wake.wait(timeout)
                door.idle = False

    def _step(self) -> Optional[float]:
        """One pass, under the ledger. Returns how long to sleep, or None to stop (closing and done,
        or out of time)."""
        now = time.monotonic()
        self._ledger.last_pass = now
        if self._counts.to_report:
            self._report_overflow()
        self._take_results(now)
        self._expire(now)
        if self._spool.disk is not None and self._queue:
            # Durable quickly: what a crash can lose is what arrived since the last pass.
            self._ingest(self.door.capacity)
        if self._life.closing and not self._life.close_seen:
            self._life.close_seen = True
            # Shutdown cuts every retry wait short; the close deadline bounds the whole.
            self._ledger.retry.due_by(now, every=False)
        if self._life.closing and (now >= self._life.close_deadline or self._nothing_left()):
            if self._spool.disk is not None and self._queue:
                self._ingest(self.door.capacity + len(self._queue))  # what is left survives in the spool
            self._update_low_water()
            return None
        self._dispatch(now)
        self._update_low_water()
        # Callers blocked on a full queue (overflow="block") are told when there is room, or that the
        # manager closes; never on every pass, or a caller and a worker that cannot drain (no
        # datafile yet, every sender busy) would wake each other in a loop until block_timeout.
        if self._room.waiters and (self._life.closing or not self.door.full()):
            self._room.wake_all()
        return self._next_wake(time.monotonic())

    def _nothing_left(self) -> bool:
        if self._ledger.live or self._ledger.ready or self._senders.in_flight() or self._spool.recovery is not None:
            return False
        if not self._queue:
            return True
        # Only events held for a datafile that never came are left: nothing can send them.
        return self._odp.state is UNDETERMINED and self._queue[0][1] is None

    def _update_low_water(self) -> None:
        low = -1 if self._spool.recovery is not None else self._ledger.popped + self._counts.popped
        self._barrier.raise_to(self._ledger.low_water(low))

    def _next_wake(self, now: float) -> float:
        wake = _IDLE_WAKE
        due = self._ledger.retry.next_due()
        if due is not None:
            wake = min(wake, due - now)
        if self._ledger.partial_since is not None:
            wake = min(wake, self._ledger.partial_since + self.options.flush_interval - now)
        if self._life.closing:
            wake = min(wake, self._life.close_deadline - now)
        if self._spool.disk is not None and self._queue:
            wake = min(wake, SPOOL_INTERVAL)
        return max(wake, 0.001)

    def _take_results(self, now: float) -> None:
        senders = self._senders
        while True:
            taken = senders.take()
            if taken is None:
                return
            batch, reply = taken
            was_probe, batch.probe = batch.probe, False
            if was_probe:
                self._ledger.retry.probe_in_flight = False
            verdict = classify(reply.status, len(batch.events))
            if verdict is Verdict.RETRY:
                self._schedule_retry(batch, reply, now)
                continue
            # Any other answer ends this part: its group (if it is part of a refused batch) learns it.
            family = self._part_ended(batch)
            self._ledger.finish(batch)
            if verdict is Verdict.DELIVERED:
                self._ack(batch.events)
                self._tally.deliver(batch.events, f"HTTP {reply.status}")
                self._ledger.refusing_alike = None
                if family is not None:
                    family.settled = True  # not systemic: its held parts go on (see _settle)
                if self._ledger.retry.failing_since is not None:
                    self._recovered(now)
            elif reply.status == 400:
                self._on_refused(batch, reply)
            elif verdict is Verdict.SPLIT:
                self._split(batch, family)
            elif not (reply.status in (401, 403) and self._rekey(batch, reply)):
                reason = "too_large" if reply.status == 413 else "rejected"
                self._drop(batch.events, reason, _rejection(reply, batch))
            if family is not None:
                self._settle(family)

    def _rekey(self, batch: _Batch, reply: Reply) -> bool:
        """A 401/403 for events queued under a key the datafile has since replaced: once, the current key."""
        target = self._odp.target
        if batch.rekeyed or target is None or target.key == batch.target.key:
            return False
        moved = _Batch(batch.events, target, batch.first_attempt)
        moved.rekeyed = True
        self._ledger.own(moved)
        self._ledger.priority.append(moved)
        self._tally.later(self.logger.info,
                    f"ODP refused the previous key {mask_key(batch.target.key)} (HTTP {reply.status}); "
                    f"sending {len(batch.events)} event(s) queued under it with the current key "
                    f"{mask_key(target.key)}.")
        return True

    def _schedule_retry(self, batch: _Batch, reply: Reply, now: float) -> None:
        batch.attempts += 1
        first = _first_attempt(batch)
        if self._policy.expired(first, now):
            self._give_up(batch, f" after {batch.attempts} attempt(s) over {now - first:.0f} s; "
                                 f"last: {_describe(reply)}")
            return
        delay = self._policy.delay(batch.attempts, reply.retry_after)
        if self._life.closing:
            # Shutdown cuts retry waits short; the close deadline still bounds the whole.
            delay = min(delay, 1.0)
        self._tally.retries += 1
        if self._ledger.retry.push(batch, now + delay, now):
            self._tally.later(self.logger.warning,
                f"ODP event delivery failing ({_describe(reply)}); holding events and retrying "
                f"(next attempt in {delay:.1f} s).")

    def _give_up(self, batch: _Batch, why: str) -> None:
        family = self._part_ended(batch)
        self._ledger.finish(batch)
        self._drop(batch.events, "retry_expired", _compat.ODP_EVENT_FAILED.format(
            f"gave up on {len(batch.events)} event(s){why}"))
        if family is not None:
            self._settle(family)

    def _recovered(self, now: float) -> None:
        outage = self._ledger.retry.recovered(now)
        self._tally.later(self.logger.info, f"ODP event delivery recovered after {outage:.1f} s.")

    def _expire(self, now: float) -> None:
        policy = self._policy
        for batch in self._ledger.retry.take_expired(lambda waiting: policy.expired(_first_attempt(waiting), now)):
            self._give_up(batch, f": retry window of {policy.window:g} s expired")

    def _dispatch(self, now: float) -> None:
        self._ledger.seen_empty = False
        limit = self._senders.limit()  # the adaptive limit: a batch handed over beyond it would wait unsent
        senders = self._senders
        while self._ledger.priority and senders.in_flight() < limit:
            self._submit(self._ledger.priority.popleft(), now)
        retry = self._ledger.retry
        if len(retry) or retry.probe_in_flight:
            if retry.failing_since is not None or retry.probe_in_flight:
                # ODP is failing: one probe at a time, oldest first; new batches wait behind it.
                if not retry.probe_in_flight and senders.in_flight() < limit:
                    probe = retry.pop_due(now)
                    if probe is not None:
                        probe.probe = True
                        retry.probe_in_flight = True
                        self._submit(probe, now)
                return
            # ODP answers again: the batches that waited go first, as many at once as allowed.
            while senders.in_flight() < limit:
                due = retry.pop_due(now)
                if due is None:
                    break
                self._submit(due, now)
            if len(retry):
                return
        hurry = self._life.closing or self._barrier.waiters > 0 or self.options.flush_interval <= 0
        while senders.in_flight() < limit:
            waiting = len(self._queue) + len(self._ledger.ready)
            if waiting == 0 and self._spool.recovery is None:
                self._ledger.partial_since = None
                self._ledger.seen_empty = True  # callers wake us: nothing else would (see _run)
                return
            if waiting < self.door.batch_size and not hurry and self._spool.recovery is None:
                if self._ledger.partial_since is None:
                    self._ledger.partial_since = now
                if now - self._ledger.partial_since < self.options.flush_interval:
                    return
            cap = self._batch_cap(waiting, limit)
            self._ingest(self.door.capacity if self._spool.disk is not None else cap)
            new_batch = self._take_batch(cap)
            if new_batch is None:
                # Nothing sendable (events held for the datafile): no timed wake-up, or the worker
                # would spin every millisecond; update_config() and enqueue() wake it.
                self._ledger.partial_since = None
                return
            self._ledger.own(new_batch)
            self._submit(new_batch, now)
            self._ledger.partial_since = now if self._queue or self._ledger.ready else None

    def _submit(self, batch: _Batch, now: float) -> None:
        if batch.first_attempt is None:
            batch.first_attempt = now
        self._tally.requests += 1
        self._senders.submit(batch)
