"""The event manager: validated events in, batches out to ``{host}/v3/events``.

:class:`EventManager`'s code is split by job, one class per module, each deriving from
:class:`~._state.ManagerState`:

- :mod:`._caller_queue` — the caller's side: ``enqueue()``, the overflow policy, waking the worker;
- :mod:`._scheduler` — the worker thread: replies, retries, the outage probe, dispatching batches;
- :mod:`._batcher` — from the queue to batches: target, encoding, handing each group to the spool;
- :mod:`._bisect` — a batch refused with a 400: bisecting, or sampling a systemic refusal;
- :mod:`._outcomes` — each outcome to the tally and the spool, ``stats()``.

Their state is not a shared bag: :mod:`._state` holds a few settings, the caller's queue and the
worker's wake-up, and one reference to each component, which owns its state and is told things
through a few methods:

- :mod:`._odp_target` — ``OdpTarget``: where events go (the datafile's ODP host and key);
- :mod:`._lifetime` — ``Lifetime``: this process, the worker thread, the steps of the close;
- :mod:`._ledger` — ``Ledger``: the worker's delivery state and the lock of every hand-off between owners;
- :mod:`._spooling` — ``Spooling``: the spool hand-off (writing, acknowledging, the backlog);
- :mod:`._senders` — ``Senders``: the sender threads doing HTTP through the :class:`~.transport.Transport`;
- :mod:`._retries` — ``Retries``: the batches waiting for another attempt, and the outage state;
- :mod:`._tally` — ``Tally``: the outcome counters, and ``on_outcome`` and log lines said outside the ledger;
- :mod:`._caller_counts` — ``CallerCounts``: what the caller's side counts (refused calls, a full queue's drops);
- :mod:`._barrier` — ``FlushBarrier`` and ``Room``: where ``flush()`` and callers blocked on a full queue wait.

This module keeps what ties them together for one manager: construction, starting the threads,
``flush()``, ``close()`` and fork handling. What is process-wide (the registry of live managers, exit
and fork hooks) is in :mod:`._lifecycle`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from . import _compat, _lifecycle, _threads, _uwsgi
from ._caller_queue import CallerQueue
from ._door import Door
from ._lifetime import Lifetime
from ._odp_target import OdpTarget
from ._scheduler import Scheduler
from ._spooling import Spooling
from ._state import _IDLE_WAKE, SPOOL_INTERVAL
from ._stats import (
    DROP_REASONS,
    INTEGRATED,
    NOT_INTEGRATED,
    REFUSE_REASONS,
    REFUSED,
    UNDETERMINED,
    OdpEventStats,
    no_stats,
)
from ._tally import reasons
from ._threads import start_quiet
from .event import default_data
from .retry import RetryPolicy
from .settings import Options
from .transport import Transport, default_transport

__all__ = ["DROP_REASONS", "INTEGRATED", "NOT_INTEGRATED", "REFUSED", "REFUSE_REASONS", "SPOOL_INTERVAL",
           "UNDETERMINED", "EventManager", "OdpEventStats", "TransportFactory", "no_stats"]

_log = logging.getLogger(__name__)

# close(): how long past its deadline it waits for the worker to finish, then for the worker to let
# go of the ledger before it takes over (seconds, each).
_CLOSE_MARGIN = 0.5
_JOIN_SLICE = 0.1  # see _join

TransportFactory = Callable[[Options], Transport]


def _default_transport(options: Options) -> Transport:
    return default_transport(options)  # urllib3's pool directly (see transport)


class EventManager(CallerQueue, Scheduler):
    """Validated events in, batches out to ``{host}/v3/events``.

    Args:
        options: The resolved options.
        logger: Where user-facing lines go (normally the Optimizely client's logger).
        sdk_version: The host SDK's version, for the default ``data_source_version``.
        transport_factory: Builds the transport on first use (tests inject fakes).
        retry_policy: Overrides the policy built from ``options``.
    """

    __slots__ = ()

    def __init__(
        self,
        options: Options,
        logger: Any,
        sdk_version: Optional[str] = None,
        transport_factory: TransportFactory = _default_transport,
        retry_policy: Optional[RetryPolicy] = None,
    ) -> None:
        self.options = options
        self.logger = logger
        self._transport_factory = transport_factory
        self._policy = retry_policy or RetryPolicy(
            base=options.backoff_base, cap=options.backoff_max, window=options.retry_window,
            retry_after_cap=options.retry_after_max)
        self._defaults = default_data(sdk_version or _compat.sdk_version())
        self.door = Door(self, options.queue_capacity, options.batch_size)  # also where the manager reads both
        self._odp = OdpTarget(logger, options.allow_insecure_http)
        self._spool = Spooling(logger, options.spool_max_bytes)
        # A uWSGI master (or loading process) forks its workers in C while its threads run: none is
        # started here, its events are held for one worker to deliver (see _uwsgi).
        self._life = Lifetime(_uwsgi.forks_later())
        if self._life.held_for_fork:
            _uwsgi.prepare(logger)
        self._reset_runtime()
        if options.spool_dir is not None and self._spool.open(options.spool_dir, options.spool_fsync):
            self._barrier.low_water = -1  # flush() waits for the backlog too
        if options.api_host is not None and options.api_key is not None:
            self.update_config(options.api_host, options.api_key, True)
        _lifecycle.register(self)
        if self._spool.recovery is not None:
            self._start()  # events left by an earlier process go out now, not on the first send

    def update_config(self, host: Optional[str], key: Optional[str], determined: bool) -> None:
        """Applies the ODP host and key of a (new) datafile. Events already queued keep theirs.

        Args:
            host: The ODP host, or None when ODP is not integrated.
            key: The public key, or None when ODP is not integrated.
            determined: False while no datafile has arrived (then nothing changes).
        """
        if self._odp.update(host, key, determined):
            self._sync_door()
            self._wake.set()

    @property
    def state(self) -> str:
        """``"undetermined"`` (no datafile yet), ``"integrated"``, ``"not_integrated"`` or ``"refused"``."""
        return self._odp.state

    # ----------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        if self._life.held_for_fork:
            return  # a process uWSGI forks from: the events wait for a worker (see _uwsgi)
        with self._life.start_lock:
            if self._life.worker is not None or self._life.finished:
                return
            if self._life.green is not _threads.green():
                self._remake_primitives()  # patched (gevent, eventlet) since they were made: see _state
            # Every thread is started now, on the first event, never later: Python 3.12+ refuses to
            # start threads while the interpreter is exiting, which is when the exit flush runs.
            self._senders.start()
            self._ledger.last_pass = time.monotonic()  # the stall check counts from the worker's start
            worker = threading.Thread(target=self._run, name="odp-ext-worker", daemon=True)
            # Known before it runs: a close from here on (our SIGTERM handler may interrupt this very
            # line) joins it, rather than counting as unconfirmed a batch it then delivers.
            self._life.worker = worker
            try:
                start_quiet(worker)
            except BaseException:
                self._life.worker = None  # not started (the interpreter is exiting): the next event tries again
                raise
            self._sync_door()  # sends may take the common path now (see _door)
        if self._life.finished:  # a close finished meanwhile (another thread, or our SIGTERM handler on this
            self._senders.stop()  # type: ignore[unreachable]  # one) released what it saw; the worker ends

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Waits until every event queued before this call is delivered or given up.

        Args:
            timeout: Seconds to wait at most. None is bounded too: by ``retry_window`` plus one
                request's timeouts (the longest any event can take to reach an outcome), and by
                ``close_timeout`` while no datafile has arrived (none may ever come: a wrong SDK
                key, an unreachable CDN).

        Returns:
            True when all of them reached an outcome, False when it gave up (logged, with why).
        """
        if self._life.pid != os.getpid():
            self._after_fork()
        start = time.monotonic()
        worker = self._life.worker
        if worker is not None and worker is threading.current_thread():
            # From on_outcome (or a log handler) on the worker: it cannot wait for itself.
            return self._flush_now(start, timeout is None, "it was called on the ODP worker thread (from "
                                   "on_outcome?), which cannot wait for itself")
        if (worker is None or not worker.is_alive()) and self._queue and not self._life.finished:
            # A send is starting the worker (or its start failed): start it here, or wait for that start.
            with contextlib.suppress(RuntimeError):  # threads cannot start: the give-up line says so
                self._start()
            worker = self._life.worker
        if worker is None or not worker.is_alive() or self._life.finished:
            return self._flush_now(start, timeout is None, None)  # nothing will move without a worker
        barrier = self._ledger.popped + self._counts.popped + len(self._queue)
        options = self.options
        bound = (options.retry_window + options.connect_timeout + options.request_timeout
                 if timeout is None else max(timeout, 0.0))
        deadline = start + bound
        def remaining() -> float:
            now = time.monotonic()
            wait = min(deadline - now, _IDLE_WAKE)
            if timeout is None and self._odp.state is UNDETERMINED:
                wait = min(wait, start + options.close_timeout - now)
            return wait

        def gone() -> bool:
            return self._life.worker is None or not self._life.worker.is_alive() or self._life.finished

        reached = self._barrier.wait(barrier, remaining, gone, self._wake.set)
        if reached:
            return True
        if reached is False:
            self._flush_gave_up(time.monotonic() - start, timeout is None, None)
            return False
        return self._flush_now(start, timeout is None, None)

    def _flush_now(self, start: float, unbounded: bool, why: Optional[str]) -> bool:
        """A flush that cannot wait: True when nothing is pending, else the give-up line and False."""
        if self._ledger.pending(len(self._queue)) == 0:  # an estimate without the ledger: good for a decision to log
            return True
        self._flush_gave_up(time.monotonic() - start, unbounded, why)
        return False

    def _flush_gave_up(self, waited: float, unbounded: bool, why: Optional[str]) -> None:
        """The one line of every flush that gives up, whatever path it took."""
        line = (f"flush_odp_events gave up after {waited:.1f} s with about {self._ledger.pending(len(self._queue))} "
                f"event(s) pending: {why or _why_waiting(self)}.")
        if unbounded:
            self.logger.warning(line)
        else:
            self.logger.info(line)

    def close(self, timeout: Optional[float] = None) -> None:
        """Delivers what is queued (until ``timeout``, default ``close_timeout``) and stops.

        Safe to call twice; events sent afterwards are discarded with one log line each.
        """
        budget = self.options.close_timeout if timeout is None else max(timeout, 0.0)
        deadline = time.monotonic() + budget
        if self.begin_close(deadline):
            self.end_close(deadline)

    def begin_close(self, deadline: float) -> bool:
        """Starts closing: the worker delivers what it can until ``deadline`` (a monotonic time).

        Returns:
            False when the manager was already closed (then :meth:`end_close` must not follow).
        """
        if not self._life.close():
            return False
        self._sync_door()  # shut for good, before anything can finish the close (see _door)
        _lifecycle.closing(self, True)
        if self._life.pid != os.getpid():
            self._after_fork()
        # Told whether or not a worker runs yet: one that a caller is starting meanwhile (on another
        # thread, or on this one under our SIGTERM handler) sees the close at its first pass.
        self._life.begin_closing(deadline)
        self._wake.set()
        return True

    def end_close(self, deadline: float) -> None:
        """Waits for the worker to finish the close (until ``deadline`` plus a margin).

        Close has one finisher. While the worker runs, it finishes: it counts and reports what is
        left, then releases threads and connections. Past the deadline and the margin, this thread
        takes over only once the worker has let go of the ledger (it is then in a callback or a log
        handler, outside every owner's state); while the worker holds it, the worker finishes later.
        """
        worker = self._life.worker
        if worker is not None and worker is threading.current_thread():
            return  # close() from on_outcome: the worker finishes once the callback returns
        if worker is not None and worker.is_alive():
            self._life.wait_to_summarize()  # said here, once the worker is done
            _join(worker, deadline + _CLOSE_MARGIN, self._life)
            if worker.is_alive() and not self._finish(_CLOSE_MARGIN):
                self.logger.warning("ODP event manager: the worker is still busy (a slow on_outcome or log "
                                    "handler?); it finishes the close when it returns.")
                self._life.stop_waiting_to_summarize()  # the worker says it, when it finishes
            self._say_summary()
            return
        self._finish()

    def close_in_background(self) -> None:
        """Closes without waiting: for a client that was garbage-collected without ``close()``.

        Never blocks (the garbage collector may run this on any thread, the worker's included): the
        worker delivers what is queued until ``close_timeout``, then releases the senders and the
        connections itself. Until then the exit hook still waits for it (``_lifecycle``).
        """
        deadline = time.monotonic() + self.options.close_timeout
        if not self.begin_close(deadline):
            return
        worker = self._life.worker
        if worker is None or not worker.is_alive():
            self._finish()

    def _refuse_late(self) -> bool:
        """An event appended once the close finished: whoever pops it counts it, exactly once."""
        with self._ledger.lock:
            drained = self._drain_queue()
            outbox = self._tally.take()
        self._tally.say_all(outbox)
        if drained:
            self.logger.error("ODP event not sent: the ODP event manager is closed.")
        return False

    def _finish(self, wait: float = -1) -> bool:
        """The close's one finisher: counts and reports what every owner still holds, then releases
        the threads, the connections and the spool. Called by the worker when its last pass is done,
        or by a close with no worker running, or (see :meth:`end_close`) by a close taking over.

        Args:
            wait: Seconds to wait for the ledger at most (-1: as long as it takes).

        Returns:
            False when the ledger could not be had in time (then the worker finishes).
        """
        if not self._ledger.lock.acquire(timeout=wait):
            return False
        try:
            finisher = self._count_what_is_left()
            outbox = self._tally.take()
        finally:
            self._ledger.lock.release()
        self._tally.say_all(outbox)
        if finisher:
            self._release()
        return True

    def _count_what_is_left(self) -> bool:
        """Under the ledger, once: every event still held ends here, counted where it is taken.

        Returns:
            True for the one caller that finished the close.
        """
        if not self._life.finish():
            return False  # once: the worker and a closing thread may both get here
        self._sync_door()  # shut already by the close; kept shut whatever path got here
        if self._counts.to_report:
            self._report_overflow()
        self._take_results(time.monotonic())  # replies already here count as what they say
        flying = {id(batch) for batch in self._senders.let_go()}
        in_flight = [e for batch in self._ledger.live.values() if id(batch) in flying for e in batch.events]
        waiting = [e for batch in self._ledger.live.values() if id(batch) not in flying for e in batch.events]
        waiting += [e for e, _ in self._ledger.ready]
        for batch in list(self._ledger.live.values()):
            self._ledger.finish(batch)
        self._ledger.ready.clear()
        self._ledger.priority.clear()
        self._ledger.retry.let_go()
        if self._spool.disk is not None:
            # Written to the spool and not acknowledged: the next process with this spool_dir sends them.
            left = in_flight + waiting
            self._tally.keep_in_spool(left, "kept in the spool: the next start with this spool_dir sends them")
        else:
            self._tally.drop(in_flight, "unconfirmed", None, "in flight at the close deadline: ODP may have them")
            self._tally.drop(waiting, "shutdown", None, "not sent by the close deadline")
        self._drain_queue()  # never written anywhere: lost with this process
        self._update_low_water()
        return True

    def _release(self) -> None:
        """After the close is counted: spool, senders, connections; then wakes whoever waits."""
        _lifecycle.closing(self, False)
        self._spool.close()
        self._senders.stop()
        self._barrier.wake_all()
        self._room.wake_all()
        if self._life.summary is None:
            self._say_summary()

    def _say_summary(self) -> None:
        """The close's one summary line (see ``Lifetime.summary``)."""
        if not self._life.take_summary():
            return
        stats = self.stats()
        dropped = sum(stats["dropped"].values())
        line = (f"ODP event manager closed: {stats['delivered']} delivered, {dropped} dropped"
                + (f" ({reasons(stats['dropped'])})" if dropped else "")
                + (f", {stats['left_in_spool']} left in the spool for the next start" if stats["left_in_spool"] else "")
                + ".")
        (self.logger.warning if dropped else self.logger.info)(line)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._life.closed

    def _after_fork(self) -> None:
        """In a forked child: a fresh queue, worker and connections; the parent's events stay the parent's.

        Except for events a uWSGI master held for its workers: they come along, and
        :meth:`_end_fork_hold` decides whether this process delivers them.
        """
        if self._life.pid == os.getpid():
            return
        held = list(self._queue) if self._life.held_for_fork else []
        self._life.after_fork()
        self._reset_runtime()
        if self._life.held_for_fork:
            self._queue.extend(held)  # and the spool's backlog, kept by _reset_runtime()
            self._end_fork_hold()
        else:
            self._spool.after_fork()

    def _uwsgi_started(self) -> None:
        """uWSGI's post-fork hook, in each process it starts (see _uwsgi)."""
        if self._life.pid != os.getpid():
            self._after_fork()
        elif self._life.held_for_fork:
            self._end_fork_hold()  # without --master, the loading process itself becomes worker 1

    def _end_fork_hold(self) -> None:
        """Delivers the events held before uWSGI's fork if this process took them, else forgets them."""
        taken = _uwsgi.take_held_events()
        if taken is None:
            return  # not known yet: uWSGI's post-fork hook asks again
        self._life.held_for_fork = False
        self._sync_door()
        if taken:
            # This process carries on for the master: its queue, and its spool's backlog (the master
            # never touches either again).
            if self._spool.recovery is not None:
                self._barrier.low_water = -1
            if self._queue or self._spool.recovery is not None:
                self._start()
            return
        self._reset_runtime()  # another process delivers them: zero counts here
        self._spool.after_fork()


def _join(worker: threading.Thread, until: float, life: Lifetime) -> None:
    """Waits until the worker's loop has returned (``life.ended``), until ``until`` (a monotonic
    time), joining its thread in slices of _JOIN_SLICE.

    Not the thread's end alone: in a gevent worker exiting under load (gunicorn ``-k gevent
    --preload``, 1 exit in about 25), the worker's loop had returned 5 ms into the join, and its
    thread still counted as alive, ``join()`` and ``is_alive()`` alike, until the join's whole
    timeout (the close budget). Each slice looks at ``life.ended`` again, so that costs one slice at
    most; with OS threads the first join returns as the worker ends.
    """
    while worker.is_alive() and not life.ended:
        remaining = until - time.monotonic()
        if remaining <= 0:
            return
        worker.join(min(remaining, _JOIN_SLICE))


def _why_waiting(manager: EventManager) -> str:
    """Why events are still pending, for the line of a flush that gives up."""
    if manager._odp.state is UNDETERMINED:
        return ("no datafile has arrived yet (a wrong SDK key or an unreachable CDN?); events sent "
                "before it are held until one does")
    if manager._life.finished:
        return "the ODP event manager is closed"
    if manager._life.held_for_fork:
        return "this process forks uWSGI workers: its events wait for one of them to deliver"
    if manager._life.worker is None or not manager._life.worker.is_alive():
        return "the ODP worker thread is not running (threads cannot start: is the interpreter exiting?)"
    if manager._ledger.retry.failing_since is not None:
        return "ODP delivery is failing; the events are held and retried within retry_window"
    return "events are still queued or in flight"
