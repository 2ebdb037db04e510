"""The caller-facing side of the manager: append to the queue, the overflow policy, waking the worker.

Runs on the application's threads. The common path is a client's own send (:func:`~._door.sender`: a
``deque.append`` and a few reads of one object), opened and shut here (:meth:`CallerQueue._sync_door`);
every other send takes :meth:`CallerQueue.enqueue`, no lock, no I/O either. Only a full queue takes the lock of
:class:`~._caller_counts.CallerCounts` (counting a drop) or, with ``overflow="block"``, waits in
:class:`~._barrier.Room` for the worker to make room.
"""

from __future__ import annotations

import os
import time

from . import _compat, _uwsgi
from ._outcomes import Outcomes
from ._state import _IDLE_WAKE, STALL_SECONDS
from ._stats import INTEGRATED, NOT_INTEGRATED, UNDETERMINED
from .event import Pending

# One line per process: every manager of it would stall alike.
_stall_reported = False


class CallerQueue(Outcomes):
    """``enqueue()`` and what a full queue does (``overflow``: drop_newest, drop_oldest, block)."""

    __slots__ = ()

    def enqueue(self, pending: Pending) -> bool:
        """Queues one validated event. Runs on the caller's thread: O(1), no I/O, no waiting
        (except with ``overflow="block"`` and a full queue: then up to ``block_timeout``).

        Returns:
            True when the event was accepted, False when it was discarded (and logged).
        """
        # A fork through Python reset this manager already (_lifecycle's fork hook); only a host that
        # forks in C (uWSGI) needs the check, which costs a system call on every event.
        life = self._life  # one object for the manager's life: reset in place after a fork
        if life.forks_in_c and life.pid != os.getpid():
            self._after_fork()
        if life.held_for_fork:
            # A uWSGI master's events, not handed over yet: decided here once this process is a
            # worker (when uWSGI's post-fork hook was replaced), never in the master (see _uwsgi).
            self._uwsgi_started()
        if life.closed:
            self.logger.error("ODP event not sent: the ODP event manager is closed.")
            self.count_refused("closed")
            return False
        odp = self._odp
        state = odp.state
        if state is not INTEGRATED and state is not UNDETERMINED:
            not_integrated = state is NOT_INTEGRATED
            self.logger.error(_compat.ODP_NOT_INTEGRATED if not_integrated else odp.refusal)
            self.count_refused("odp_not_integrated" if not_integrated else "host_refused")
            return False
        queue = self._queue
        if self.door.full() and not self._overflow(pending):
            return True  # accepted, then dropped as queue_full (counted in _overflow)
        queue.append((pending, odp.target))
        if life.worker is None:
            self._start()
        return self._appended(len(queue))

    def _appended(self, size: int) -> bool:
        """After an append that left ``size`` events queued. Returns False when the event was refused."""
        # Wake the worker only when it waits for callers (its last look found nothing to send), for
        # a full batch, or, with the spool on, for the first event (written to disk at once, see
        # SPOOL_INTERVAL). Any other time its own timer covers this event: see Scheduler._run.
        full = size % self.door.batch_size == 0
        if self.door.idle or full or (size == 1 and self._spool.disk is not None):
            self._wake.set()
        if full and not _stall_reported:
            self._check_stalled(size)
        if self._life.finished:
            return self._refuse_late()
        return True

    def _sync_door(self) -> None:
        """Opens or shuts the door (:func:`~._door.sender`) after a change it depends on: a worker
        started, a new datafile, a close, a fork. Under the lifetime's lock, so the last change always
        writes last: a close shuts it for good (it sets ``closed`` under that lock first), before the
        close can finish.
        """
        life, odp, door = self._life, self._odp, self.door
        with life.lock:
            door.target = odp.target
            door.open = (life.worker is not None and odp.state is INTEGRATED and not (
                life.closed or life.finished or life.held_for_fork or life.forks_in_c))

    def _overflow(self, pending: Pending) -> bool:
        """The queue is full. Returns True when the new event may still be appended."""
        if self.options.overflow == "block" and self._wait_for_room():
            return True
        return self._counts.overflow(self._queue, pending, self.options.overflow == "drop_oldest")

    def _wait_for_room(self) -> bool:
        """overflow="block": waits up to ``block_timeout`` for room. Returns True when there is room."""
        door, life = self.door, self._life

        def full() -> bool:
            # Closing lets the caller through: close() then delivers or counts the event.
            return door.full() and not life.closed

        def wake() -> None:
            self._wake.set()  # read at each call: a first start may remake it (see _start)

        return self._room.wait(full, time.monotonic() + self.options.block_timeout, lambda: life.finished,
                               wake, _IDLE_WAKE)

    def _check_stalled(self, waiting: int) -> None:
        """A full batch waits: if the worker has not passed for STALL_SECONDS, threads do not run here.

        The worker passes at least every few seconds whatever ODP does (HTTP is on the senders), so
        a long silence means its thread gets no time at all: under uWSGI without threads support,
        Python threads run only while a request runs Python code.
        """
        global _stall_reported  # noqa: PLW0603 - one line per process
        stalled = time.monotonic() - self._ledger.last_pass
        if stalled < STALL_SECONDS or self._life.worker is None:
            return
        _stall_reported = True
        remedy = ("Add --enable-threads to the uWSGI command line (enable-threads = true in its ini)."
                  if _uwsgi.hosted() else
                  "Python threads are not running in this process (with gevent or eventlet: patch before the "
                  "first event, and no greenlet may keep the hub busy).")
        self.logger.error(f"ODP events are not being sent: the plugin's worker thread has not run for "
                          f"{stalled:.0f} s while {waiting} events wait. {remedy}")
