"""The event manager: validated events in, batches out to ``{host}/v3/events``.

:class:`EventManager` is assembled from one class per job, each in its own module:

- :mod:`._caller_queue` — the caller's side: ``enqueue()``, the overflow policy, waking the worker;
- :mod:`._scheduler` — the worker thread: replies, retries, the outage probe, dispatching batches;
- :mod:`._batcher` — from the queue to batches: target, encoding, the spool hand-off;
- :mod:`._bisect` — a batch refused with a 400: bisecting, or sampling a systemic refusal;
- :mod:`._senders` — the sender threads doing HTTP through the :class:`~.transport.Transport`;
- :mod:`._outcomes` — the counters every outcome goes through, and ``on_outcome``;
- :mod:`._state` — the state they share, by owning thread.

This module keeps what ties them together for one manager: construction, the ODP settings of the
datafile, starting the threads, ``flush()``, ``close()`` and fork handling. What is process-wide
(the registry of live managers, exit and fork hooks) is in :mod:`._lifecycle`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional, Tuple

from . import _compat, _lifecycle, _threads, _uwsgi
from ._batch import Target
from ._caller_queue import CallerQueue
from ._outcomes import _reasons
from ._scheduler import Scheduler
from ._senders import SenderPool
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
from ._threads import start_quiet
from .event import Encoded, default_data
from .retry import RetryPolicy
from .settings import Options
from .spool import Spool
from .transport import RequestsTransport, Transport, check_host, events_url, mask_key

__all__ = ["DROP_REASONS", "INTEGRATED", "NOT_INTEGRATED", "REFUSED", "REFUSE_REASONS", "SPOOL_INTERVAL",
           "UNDETERMINED", "EventManager", "OdpEventStats", "TransportFactory", "no_stats"]

_log = logging.getLogger(__name__)

TransportFactory = Callable[[Options], Transport]


def _default_transport(options: Options) -> Transport:
    return RequestsTransport(pool_size=options.max_in_flight, gzip_body=options.gzip)


class EventManager(CallerQueue, Scheduler, SenderPool):
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
        self._on_outcome = options.on_outcome
        self._outcome_failures = 0
        self._timeout = (options.connect_timeout, options.request_timeout)
        self._capacity = options.queue_capacity
        self._batch_size = options.batch_size
        self._state = UNDETERMINED
        self._target: Optional[Target] = None
        self._initial_target: Optional[Target] = None
        self._refusal = ""
        # Re-entrant: the SIGTERM opt-in closes managers from a signal handler, which runs on the main
        # thread, possibly while that thread is inside one of these sections.
        self._lifecycle = threading.RLock()
        self._closed = False
        self._spool: Optional[Spool] = None
        self._recovery: Optional[Iterator[Tuple[str, str, Encoded]]] = None
        # A uWSGI master (or loading process) forks its workers in C while its threads run: none is
        # started here, its events are held for one worker to deliver (see _uwsgi).
        self._held_for_fork = _uwsgi.forks_later()
        if self._held_for_fork:
            _uwsgi.prepare(logger)
        self._reset_runtime()
        if options.spool_dir is not None:
            self._open_spool(options.spool_dir)
        if options.api_host is not None and options.api_key is not None:
            self.update_config(options.api_host, options.api_key, True)
        _lifecycle.register(self)
        if self._has_backlog():
            self._start()  # events left by an earlier process go out now, not on the first send

    def _has_backlog(self) -> bool:
        return self._recovery is not None

    def _open_spool(self, directory: str) -> None:
        try:
            spool = Spool(directory, fsync=self.options.spool_fsync, max_bytes=self.options.spool_max_bytes,
                          logger=self.logger)
        except OSError as exc:
            self.logger.error(f'ODP spool directory "{directory}" cannot be used ({exc.__class__.__name__}: '
                              f"{exc.strerror or exc}).")
            self.logger.warning("ODP events are kept in memory only: a crash can lose queued events.")
            return
        self._spool = spool
        if spool.has_backlog():
            self._recovery = spool.recover()
            self._low_water = -1

    def update_config(self, host: Optional[str], key: Optional[str], determined: bool) -> None:
        """Applies the ODP host and key of a (new) datafile. Events already queued keep theirs.

        Args:
            host: The ODP host, or None when ODP is not integrated.
            key: The public key, or None when ODP is not integrated.
            determined: False while no datafile has arrived (then nothing changes).
        """
        if not determined:
            return
        if host and key:
            refusal = check_host(host, self.options.allow_insecure_http)
            if refusal:
                if self._state is not REFUSED or self._refusal != refusal:
                    self.logger.error(refusal)
                self._refusal = refusal
                self._target = None
                self._state = REFUSED
            else:
                target = Target(host, key, events_url(host))
                if target != self._target:
                    self.logger.info(f"ODP events go to {target.url} (key {mask_key(key)}).")
                    self._target = target
                if self._initial_target is None:
                    self._initial_target = target
                self._state = INTEGRATED
        else:
            self._target = None
            self._state = NOT_INTEGRATED
        self._wake.set()

    @property
    def state(self) -> str:
        """``"undetermined"`` (no datafile yet), ``"integrated"``, ``"not_integrated"`` or ``"refused"``."""
        return self._state

    # ----------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        if self._held_for_fork:
            return  # a process uWSGI forks from: the events wait for a worker (see _uwsgi)
        if self._green is not _threads.green():
            self._make_primitives()  # patched (gevent, eventlet) since they were made: see _threads
        with self._start_lock:
            if self._worker is not None or self._finished:
                return
            self._transport = self._transport_factory(self.options)
            # Every thread is started now, on the first event, never later: Python 3.12+ refuses to
            # start threads while the interpreter is exiting, which is when the exit flush runs.
            self._start_senders()
            self._last_pass = time.monotonic()  # the stall check counts from the worker's start
            worker = threading.Thread(target=self._run, name="odp-ext-worker", daemon=True)
            # Known before it runs: a close from here on (our SIGTERM handler may interrupt this very
            # line) joins it, rather than counting as unconfirmed a batch it then delivers.
            self._worker = worker
            try:
                start_quiet(worker)
            except BaseException:
                self._worker = None  # not started (the interpreter is exiting): the next event tries again
                raise
        self._release_after_late_start()

    def _release_after_late_start(self) -> None:
        """A close finished while _start() was under way: on another thread, or on this one (our
        SIGTERM handler closes inline, wherever it interrupted). It released only what it saw;
        this releases the rest. The worker sees the close (begin_close) and ends by itself."""
        if not self._finished:
            return
        self._stop_senders()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

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
        if self._pid != os.getpid():
            self._after_fork()
        if self._worker is None or not self._worker.is_alive():
            return not self._queue
        barrier = self._popped + self._overflow_popped + len(self._queue)
        start = time.monotonic()
        options = self.options
        bound = (options.retry_window + options.connect_timeout + options.request_timeout
                 if timeout is None else max(timeout, 0.0))
        deadline = start + bound
        with self._flush_cond:
            self._flush_waiters += 1
            self._wake.set()
            try:
                while self._low_water < barrier:
                    now = time.monotonic()
                    wait = min(deadline - now, _IDLE_WAKE)
                    if timeout is None and self._state is UNDETERMINED:
                        wait = min(wait, start + options.close_timeout - now)
                    if wait <= 0:
                        self._flush_gave_up(now - start, timeout is None)
                        return False
                    self._flush_cond.wait(wait)
                    if self._worker is None or not self._worker.is_alive():
                        return self._low_water >= barrier
                return True
            finally:
                self._flush_waiters -= 1

    def _flush_gave_up(self, waited: float, unbounded: bool) -> None:
        waiting = len(self._queue) + len(self._ready) + self._in_flight_events
        if self._state is UNDETERMINED:
            why = ("no datafile has arrived yet (a wrong SDK key or an unreachable CDN?); events sent "
                   "before it are held until one does")
        elif self._failing_since is not None:
            why = "ODP delivery is failing; the events are held and retried within retry_window"
        else:
            why = "events are still queued or in flight"
        line = f"flush_odp_events gave up after {waited:.1f} s with about {waiting} event(s) pending: {why}."
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
        with self._lifecycle:
            if self._closed:
                return False
            self._closed = True
        _lifecycle.closing(self, True)
        if self._pid != os.getpid():
            self._after_fork()
        # Told whether or not a worker runs yet: one that a caller is starting meanwhile (on another
        # thread, or on this one under our SIGTERM handler) sees the close at its first pass.
        self._close_deadline = deadline
        self._closing = True
        self._wake.set()
        return True

    def end_close(self, deadline: float) -> None:
        """Waits for the worker (until ``deadline`` plus a margin), then releases threads and sockets."""
        worker = self._worker
        if worker is not None and worker.is_alive() and worker is not threading.current_thread():
            worker.join(max(deadline - time.monotonic(), 0.0) + 1.0)
        self._finish()

    def close_in_background(self) -> None:
        """Closes without waiting: for a client that was garbage-collected without ``close()``.

        Never blocks (the garbage collector may run this on any thread, the worker's included): the
        worker delivers what is queued until ``close_timeout``, then releases the senders and the
        connections itself. Until then the exit hook still waits for it (``_lifecycle``).
        """
        deadline = time.monotonic() + self.options.close_timeout
        # Flagged before the worker is told to close, so the worker that ends the close sees it.
        self._in_background = True
        if not self.begin_close(deadline):
            return
        worker = self._worker
        if worker is None or not worker.is_alive():
            self._finish()

    def _refuse_late(self) -> bool:
        """An event appended while close() finished: whoever pops it counts it, exactly once."""
        if self._drain_after_finish():
            self.logger.error("ODP event not sent: the ODP event manager is closed.")
        return False

    def _drain_after_finish(self) -> int:
        """Counts what is left in the queue once the worker is gone as dropped at shutdown."""
        drained = 0
        with self._count_lock:
            while True:
                try:
                    self._queue.popleft()
                except IndexError:
                    break
                drained += 1
            self._popped += drained
            self._dropped["shutdown"] += drained
        return drained

    def _finish(self) -> None:
        with self._lifecycle:
            if self._finished:
                return  # once: end_close() and a worker closing in the background may both get here
            self._finished = True
        _lifecycle.closing(self, False)
        if self._on_outcome is not None and self._spool is None:
            self._report("shutdown", [item[0] for item in list(self._queue)], "not sent by the close deadline")
            self._report_left_at_close()
        if self._spool is None:
            self._drain_after_finish()
        pending = self._pending_count()
        unconfirmed = min(self._in_flight_events, max(pending, 0))
        if unconfirmed and self._spool is None:
            self._dropped["unconfirmed"] += unconfirmed
            pending -= unconfirmed
        if pending > 0:
            if self._spool is not None:
                # Written to the spool: the next process with this spool_dir delivers them.
                self._left_in_spool += pending - len(self._queue)
                self._dropped["shutdown"] += len(self._queue)
            else:
                self._dropped["shutdown"] += pending
        if self._spool is not None:
            try:
                self._spool.close()
            except Exception:
                _log.debug("spool close failed", exc_info=True)
        self._stop_senders()
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.close()
            except Exception:  # closing is best effort
                _log.debug("transport close failed", exc_info=True)
        with self._flush_cond:
            self._flush_cond.notify_all()
        with self._room:
            self._room.notify_all()
        stats = self.stats()
        dropped = sum(stats["dropped"].values())
        line = (f"ODP event manager closed: {stats['delivered']} delivered, {dropped} dropped"
                + (f" ({_reasons(stats['dropped'])})" if dropped else "")
                + (f", {self._left_in_spool} left in the spool for the next start" if self._left_in_spool else "")
                + ".")
        if dropped:
            self.logger.warning(line)
        else:
            self.logger.info(line)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _after_fork(self) -> None:
        """In a forked child: a fresh queue, worker and connections; the parent's events stay the parent's.

        Except for events a uWSGI master held for its workers: they come along, and
        :meth:`_end_fork_hold` decides whether this process delivers them.
        """
        if self._pid == os.getpid():
            return
        held, recovery = (list(self._queue), self._recovery) if self._held_for_fork else ([], None)
        self._lifecycle = threading.RLock()  # another thread may have held it at fork time
        self._reset_runtime()
        if self._held_for_fork:
            self._queue.extend(held)
            self._recovery = recovery
            self._end_fork_hold()
        elif self._spool is not None:
            self._spool.after_fork()

    def _uwsgi_started(self) -> None:
        """uWSGI's post-fork hook, in each process it starts (see _uwsgi)."""
        if self._pid != os.getpid():
            self._after_fork()
        elif self._held_for_fork:
            self._end_fork_hold()  # without --master, the loading process itself becomes worker 1

    def _end_fork_hold(self) -> None:
        """Delivers the events held before uWSGI's fork if this process took them, else forgets them."""
        taken = _uwsgi.take_held_events()
        if taken is None:
            return  # not known yet: uWSGI's post-fork hook asks again
        self._held_for_fork = False
        if taken:
            # This process carries on for the master: its queue, and its spool's backlog (the master
            # never touches either again).
            if self._recovery is not None:
                self._low_water = -1
            if self._queue or self._recovery is not None:
                self._start()
            return
        self._reset_runtime()  # another process delivers them: zero counts here
        if self._spool is not None:
            self._spool.after_fork()
