"""The event manager: a bounded queue, one worker, a few senders, flush/close, exit and fork.

The caller's side (:meth:`EventManager.enqueue`) is an O(1) ``deque.append`` plus a few attribute
reads: no lock, no I/O, no waiting. Everything else happens on the worker thread, which owns all
mutable delivery state (batches, retries, counters), so it needs no locks either. Senders only
perform HTTP requests and hand their replies back to the worker.

Flow on the worker, each pass:

1. take the senders' replies: count deliveries, schedule retries, split rejected batches;
2. dispatch: split halves first, then a due retry (only one "probe" while ODP is failing, so an
   outage costs one request per backoff period and order of arrival is kept), then new batches
   of up to ``batch_size`` events / ``max_batch_bytes`` once a batch is full or ``flush_interval``
   has passed;
3. sleep until woken (a full batch, a reply, a flush, close) or until the next deadline.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from typing_extensions import TypedDict

from . import _compat, _lifecycle
from .event import Encoded, Pending, batch_size_bytes, default_data, encode, join
from .retry import NETWORK_ERROR, RetryPolicy, Verdict, classify
from .settings import Options
from .spool import Spool
from .transport import Reply, RequestsTransport, Transport, check_host, events_url, mask_key

_log = logging.getLogger(__name__)

UNDETERMINED = "undetermined"
INTEGRATED = "integrated"
NOT_INTEGRATED = "not_integrated"
REFUSED = "refused"

# "unconfirmed": a request was in flight when the close deadline passed; ODP may have accepted it.
# "rejected_systemic": ODP refused every part of a batch alike (a revoked key, a changed schema), so
# the batch was not split down to single events.
# "unencodable": the event could not be encoded as JSON on the worker.
DROP_REASONS = ("rejected", "rejected_systemic", "too_large", "queue_full", "retry_expired", "shutdown",
                "unconfirmed", "not_integrated", "unencodable")
# Why a call was refused before its event was queued (never accepted).
REFUSE_REASONS = ("invalid_input", "closed", "odp_disabled", "odp_not_integrated", "host_refused",
                  "invalid_client")


class OdpEventStats(TypedDict):
    """What ``client.odp_event_stats()`` returns: counts since the client's first event, in this process.

    ``accepted == delivered + sum(dropped.values()) + pending + left_in_spool`` holds whenever the
    worker is between two steps; ``pending`` is 0 once ``flush_odp_events()`` returns True or
    ``close()`` returns. Calls refused before queueing are never accepted: see ``refused``.

    Attributes:
        accepted: Events queued (including ``recovered`` ones, read from the spool).
        delivered: Events ODP accepted (2xx).
        dropped: Accepted events given up, by reason: ``rejected`` (ODP refused them: a 4xx after
            isolating the event), ``rejected_systemic`` (ODP refused every part and every sampled
            single event of a batch alike: a revoked key or a changed schema), ``too_large`` (one
            event over ``max_batch_bytes``), ``queue_full`` (the queue or the spool was full),
            ``retry_expired`` (still failing at the end of ``retry_window``), ``shutdown`` (not
            sent by the close deadline), ``unconfirmed`` (in flight at the close deadline: ODP may
            have it), ``not_integrated`` (held for a datafile that turned out to have no ODP
            integration), ``unencodable`` (could not be encoded as JSON).
        pending: Accepted events without an outcome yet.
        recovered: Events left in the spool by an earlier process and read by this one.
        left_in_spool: Events written to the spool but not delivered at close: the next process
            with the same ``spool_dir`` delivers them.
        refused: Calls refused before queueing, by reason: ``invalid_input`` (failed validation),
            ``closed`` (sent after ``close()``), ``odp_disabled`` (``odp_disabled`` is set),
            ``odp_not_integrated`` (the datafile has no ODP integration), ``host_refused`` (the ODP
            host may not receive the key: not a valid URL, or plain http), ``invalid_client`` (the
            Optimizely client is not valid, e.g. its datafile did not parse).
        requests: HTTP requests made.
        retries: Requests that were retries.
        queued: Events waiting in the caller-side queue right now.
        state: ``"undetermined"`` (no datafile yet), ``"integrated"``, ``"not_integrated"`` or
            ``"refused"`` (the host may not receive the key).
    """

    accepted: int
    delivered: int
    dropped: Dict[str, int]
    pending: int
    recovered: int
    left_in_spool: int
    refused: Dict[str, int]
    requests: int
    retries: int
    queued: int
    state: str


def no_stats() -> OdpEventStats:
    """The stats of a client that has no manager yet (nothing sent, nothing refused)."""
    return OdpEventStats(accepted=0, delivered=0, dropped=dict.fromkeys(DROP_REASONS, 0), pending=0, recovered=0,
                         left_in_spool=0, refused=dict.fromkeys(REFUSE_REASONS, 0), requests=0,
                         retries=0, queued=0, state=UNDETERMINED)

SPOOL_INTERVAL = 0.05  # with the spool on, queued events are written at least this often (seconds)
_WARN_EVERY = 10.0  # seconds between two "queue full" / "still failing" warnings
_IDLE_WAKE = 5.0  # the worker looks around at least this often, even with nothing to do


class Target(NamedTuple):
    """Where a batch goes and with which key. Events keep the target they were queued under."""

    host: str
    key: str
    url: str


# Bisecting a batch refused with a 400 finds its few bad events in O(bad x log n) requests. When ODP
# refuses everything alike (a revoked key answering 400, a changed schema), it would cost two requests
# and one error line per event. So: once every part at _SUSPECT_DEPTH (the 4 quarters) was refused and
# no part delivered, _SAMPLES single events spread over the batch are sent alone, the rest held; if
# every sample is refused too, the batch is refused as a whole ("rejected_systemic"), else bisecting
# goes on. While ODP keeps refusing alike, later batches go straight to the samples.
_SUSPECT_DEPTH = 2
_SAMPLES = 3


class _Family:
    """The parts of one batch refused with a 400 (split, sampled, held): what they showed so far."""

    __slots__ = ("delivered", "failures", "held", "samples_refused", "sampling", "size", "systemic")

    def __init__(self, size: int) -> None:
        self.size = size
        self.failures: Dict[int, int] = {}  # depth -> parts refused with a 400 at that depth
        self.delivered = False
        self.sampling = False
        self.samples_refused = 0
        self.systemic = False
        self.held: List[_Batch] = []  # parts waiting for the samples' verdict


class _Batch:
    __slots__ = ("attempts", "depth", "events", "family", "first_attempt", "min_seq", "probe", "refused",
                 "rekeyed", "sample", "target")

    def __init__(self, events: List[Encoded], target: Target, first_attempt: Optional[float] = None,
                 family: Optional[_Family] = None, depth: int = 0) -> None:
        self.events = events
        self.target = target
        self.first_attempt = first_attempt
        self.attempts = 0
        self.min_seq = min(e.seq for e in events)
        self.probe = False
        self.family = family
        self.depth = depth
        self.rekeyed = False
        self.sample = False  # a single event sent alone to tell a systemic refusal from a few bad events
        self.refused = False  # ODP answered 400 for exactly this part


_Item = Tuple[Pending, Optional[Target]]
TransportFactory = Callable[[Options], Transport]


def _default_transport(options: Options) -> Transport:
    return RequestsTransport(pool_size=options.max_in_flight, gzip_body=options.gzip)


class EventManager:
    """Validated events in, batches out to ``{host}/v3/events``.

    Args:
        options: The resolved options.
        logger: Where user-facing lines go (normally the Optimizely client's logger).
        sdk_version: The host SDK's version, for the default ``data_source_version``.
        transport_factory: Builds the transport on first use (tests inject fakes).
        retry_policy: Overrides the policy built from ``options``.
    """

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

    # ----------------------------------------------------------------- state shared with the caller

    def _reset_runtime(self) -> None:
        """Everything that belongs to one process: queue, threads, connections, counters."""
        self._pid = os.getpid()
        self._queue: Deque[_Item] = collections.deque()
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._flush_cond = threading.Condition(threading.RLock())
        self._worker: Optional[threading.Thread] = None
        self._senders: List[threading.Thread] = []
        self._send_queue: Deque[Optional[_Batch]] = collections.deque()
        self._send_ready = threading.Semaphore(0)
        self._results: Deque[Tuple[_Batch, Reply]] = collections.deque()
        self._transport: Optional[Transport] = None
        self._closing = False
        self._finished = False
        self._in_background = False  # closing without a caller waiting (the client was garbage-collected)
        self._idle = False
        self._seen_empty = True
        self._close_seen = False
        self._close_deadline = 0.0
        self._flush_waiters = 0
        # overflow="block": callers waiting for room; the worker notifies only when there are some.
        self._room = threading.Condition(threading.Lock())
        self._room_waiters = 0
        # Counted by the caller's side, on rare paths only (under _count_lock).
        self._count_lock = threading.RLock()
        self._overflowed = 0
        # on_outcome only: events the caller's side dropped as queue_full, for the worker to report.
        self._overflow_report: Deque[Pending] = collections.deque()
        self._overflow_popped = 0  # drop_oldest: events that left the queue from the caller's side
        self._refused: Dict[str, int] = dict.fromkeys(REFUSE_REASONS, 0)
        self._last_overflow_warning = -_WARN_EVERY
        self._overflow_since_warning = 0
        # Owned by the worker thread.
        self._popped = 0
        self._delivered = 0
        self._dropped: Dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._requests = 0
        self._retries = 0
        self._in_flight = 0
        self._in_flight_events = 0
        self._in_flight_batches: Dict[int, _Batch] = {}  # on_outcome only: which events were in flight
        self._probe_in_flight = False
        self._refusing_alike: Optional[int] = None  # an HTTP status ODP answers every part of batches with
        self._priority: Deque[_Batch] = collections.deque()
        self._retry_heap: List[Tuple[float, int, _Batch]] = []
        self._retry_seq = itertools.count()
        self._live: Dict[int, _Batch] = {}
        # Events taken from the queue: target resolved, encoded once (and spooled, with the spool on).
        self._ready: Deque[Tuple[Encoded, Target]] = collections.deque()
        self._recovered_count = 0
        self._recovery = None
        self._left_in_spool = 0
        self._partial_since: Optional[float] = None
        self._failing_since: Optional[float] = None
        self._last_failure_warning = -_WARN_EVERY
        self._last_spool_warning = -_WARN_EVERY
        self._spool_refused = 0  # dropped by a full spool since the last warning about it
        self._low_water = 0

    def enqueue(self, pending: Pending) -> bool:
        """Queues one validated event. Runs on the caller's thread: O(1), no I/O, no waiting
        (except with ``overflow="block"`` and a full queue: then up to ``block_timeout``).

        Returns:
            True when the event was accepted, False when it was discarded (and logged).
        """
        if self._pid != os.getpid():
            self._after_fork()
        if self._closed:
            self.logger.error("ODP event not sent: the ODP event manager is closed.")
            self.count_refused("closed")
            return False
        state = self._state
        if state is not INTEGRATED and state is not UNDETERMINED:
            not_integrated = state is NOT_INTEGRATED
            self.logger.error(_compat.ODP_NOT_INTEGRATED if not_integrated else self._refusal)
            self.count_refused("odp_not_integrated" if not_integrated else "host_refused")
            return False
        queue = self._queue
        if len(queue) + len(self._ready) >= self._capacity and not self._overflow(pending):
            return True  # accepted, then dropped as queue_full (counted in _overflow)
        queue.append((pending, self._target))
        if self._worker is None:
            self._start()
        size = len(queue)
        if size == 1 or size % self._batch_size == 0 or self._idle:
            self._wake.set()
        if self._finished:
            return self._refuse_late()
        return True

    def count_invalid(self) -> None:
        """Counts one call discarded by validation (for :meth:`stats`)."""
        self.count_refused("invalid_input")

    def count_refused(self, reason: str) -> None:
        """Counts one call refused before queueing, by reason (one of :data:`REFUSE_REASONS`)."""
        with self._count_lock:
            self._refused[reason] += 1

    def _overflow(self, pending: Pending) -> bool:
        """The queue is full. Returns True when the new event may still be appended."""
        if self.options.overflow == "block" and self._wait_for_room():
            return True
        now = time.monotonic()
        with self._count_lock:
            self._overflowed += 1
            self._overflow_since_warning += 1
            make_room = self.options.overflow == "drop_oldest"
            dropped_event = pending
            if make_room:
                try:
                    dropped_event = self._queue.popleft()[0]
                    self._overflow_popped += 1
                except IndexError:
                    # Everything waiting is already with the worker (read from the spool, or
                    # encoded): nothing older to drop here, so the new event is the one dropped.
                    make_room = False
            if self._on_outcome is not None:
                self._overflow_report.append(dropped_event)
            if now - self._last_overflow_warning >= _WARN_EVERY:
                dropped, self._overflow_since_warning = self._overflow_since_warning, 0
                self._last_overflow_warning = now
                self.logger.warning(
                    f"ODP event queue is full ({self._capacity} events); dropped {dropped} "
                    f"{'oldest' if make_room else 'new'} event(s) since the last warning.")
        return make_room

    def _wait_for_room(self) -> bool:
        """overflow="block": waits up to ``block_timeout`` for room. Returns True when there is room."""
        deadline = time.monotonic() + self.options.block_timeout
        with self._room:
            self._room_waiters += 1
            try:
                # Closing lets the caller through: close() then delivers or counts the event.
                while len(self._queue) + len(self._ready) >= self._capacity and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._finished:
                        return False
                    self._wake.set()  # a full queue is a full batch: the worker must be draining
                    self._room.wait(min(remaining, _IDLE_WAKE))
                return True
            finally:
                self._room_waiters -= 1

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
        with self._start_lock:
            if self._worker is not None:
                return
            self._transport = self._transport_factory(self.options)
            # Every thread is started now, on the first event, never later: Python 3.12+ refuses to
            # start threads while the interpreter is exiting, which is when the exit flush runs.
            for index in range(self.options.max_in_flight):
                sender = threading.Thread(target=self._send_loop, name=f"odp-ext-sender-{index}", daemon=True)
                sender.start()
                self._senders.append(sender)
            worker = threading.Thread(target=self._run, name="odp-ext-worker", daemon=True)
            worker.start()
            self._worker = worker

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
        _lifecycle.unregister(self)
        if self._pid != os.getpid():
            self._after_fork()
        worker = self._worker
        if worker is not None and worker.is_alive():
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
        for _ in self._senders:
            self._send_queue.append(None)
            self._send_ready.release()
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
        """In a forked child: a fresh queue, worker and connections; the parent's events stay the parent's."""
        if self._pid == os.getpid():
            return
        self._lifecycle = threading.RLock()  # another thread may have held it at fork time
        self._reset_runtime()
        if self._spool is not None:
            self._spool.after_fork()

    # ----------------------------------------------------------------- stats

    def _pending_count(self) -> int:
        return (self._accepted() - self._delivered - sum(self._dropped.values()) - self._overflowed
                - self._left_in_spool)

    def _accepted(self) -> int:
        # drop_oldest: an event popped by the caller to make room is in _overflowed, and the new
        # one took its place in the queue, so each accepted event is counted exactly once.
        return self._popped + len(self._queue) + self._overflowed + self._recovered_count

    def stats(self) -> OdpEventStats:
        """Delivery counts so far, in this process (every key: :class:`OdpEventStats`)."""
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

    # ----------------------------------------------------------------- senders

    def _send_loop(self) -> None:
        while True:
            self._send_ready.acquire()
            try:
                next_batch = self._send_queue.popleft()
            except IndexError:
                continue
            if next_batch is None:
                return
            batch = next_batch
            transport = self._transport
            if transport is None:
                reply = Reply(NETWORK_ERROR, None, "transport closed")
            else:
                try:
                    reply = transport.send(batch.target.url, batch.target.key, join(batch.events), self._timeout)
                except Exception as exc:  # a transport must not raise; if one does, it is a failed attempt
                    reply = Reply(NETWORK_ERROR, None, f"{exc.__class__.__name__}: {exc}")
            self._results.append((batch, reply))
            self._wake.set()

    # ----------------------------------------------------------------- worker

    def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                timeout = self._step()
            except Exception:
                # The worker never dies: log and go on (state stays consistent: every mutation
                # above is completed before the next can fail).
                _log.exception("ODP event worker: unexpected error; continuing")
                self.logger.error("ODP event worker hit an unexpected error and carries on.")
                timeout = 0.05
            if timeout is None:
                if self._in_background:
                    self._finish()
                break
            if timeout > 0:
                # Callers wake an idle worker on every append (see enqueue); the flag is raised
                # before the last look at the queue, so an append is either seen here or wakes us.
                # Only a worker that found the queue empty waits for callers; otherwise a timer
                # (flush interval, backoff, close deadline) or a full batch wakes it.
                self._idle = self._seen_empty
                if not (self._idle and self._queue):
                    self._wake.wait(timeout)
                self._idle = False

    def _step(self) -> Optional[float]:
        """One pass. Returns how long to sleep, or None to stop (closing and done, or deadline)."""
        now = time.monotonic()
        if self._overflow_report:
            self._report_overflow()
        self._take_results(now)
        self._expire(now)
        if self._spool is not None and self._queue:
            # Durable quickly: what a crash can lose is what arrived since the last pass.
            self._ingest(self._capacity)
        if self._closing and not self._close_seen:
            self._close_seen = True
            # Shutdown cuts every retry wait short; the close deadline bounds the whole.
            self._retry_heap = [(min(due, now), seq, batch) for due, seq, batch in self._retry_heap]
            heapq.heapify(self._retry_heap)
        if self._closing and (now >= self._close_deadline or self._nothing_left()):
            if self._spool is not None and self._queue:
                self._ingest(self._capacity + len(self._queue))  # what is left survives in the spool
            self._update_low_water()
            return None
        self._dispatch(now)
        self._update_low_water()
        self._seen_empty = not self._queue
        if self._room_waiters:
            with self._room:
                self._room.notify_all()
        return self._next_wake(time.monotonic())

    def _nothing_left(self) -> bool:
        if self._live or self._ready or self._in_flight or self._recovery is not None:
            return False
        if not self._queue:
            return True
        # Only events held for a datafile that never came are left: nothing can send them.
        return self._state is UNDETERMINED and self._queue[0][1] is None

    def _update_low_water(self) -> None:
        low = -1 if self._recovery is not None else self._popped + self._overflow_popped
        if self._ready:
            low = min(low, self._ready[0][0].seq)
        for batch in self._live.values():
            low = min(low, batch.min_seq)
        self._low_water = low
        if self._flush_waiters:
            with self._flush_cond:
                self._flush_cond.notify_all()

    def _next_wake(self, now: float) -> float:
        wake = _IDLE_WAKE
        if self._retry_heap and not self._probe_in_flight:
            wake = min(wake, self._retry_heap[0][0] - now)
        if self._partial_since is not None:
            wake = min(wake, self._partial_since + self.options.flush_interval - now)
        if self._closing:
            wake = min(wake, self._close_deadline - now)
        if self._spool is not None and self._queue:
            wake = min(wake, SPOOL_INTERVAL)
        return max(wake, 0.001)

    def _take_results(self, now: float) -> None:
        results = self._results
        while results:
            batch, reply = results.popleft()
            self._in_flight_batches.pop(id(batch), None)
            self._in_flight -= 1
            self._in_flight_events -= len(batch.events)
            was_probe, batch.probe = batch.probe, False
            if was_probe:
                self._probe_in_flight = False
            verdict = classify(reply.status, len(batch.events))
            if verdict is Verdict.DELIVERED:
                self._finish_batch(batch)
                self._delivered += len(batch.events)
                self._ack(batch.events)
                if self._on_outcome is not None:
                    self._report("delivered", batch.events, f"HTTP {reply.status}")
                self._refusing_alike = None
                if batch.family is not None and not batch.family.delivered:
                    batch.family.delivered = True
                    self._release_held(batch.family)
                if self._failing_since is not None:
                    self._recovered(now)
            elif verdict is Verdict.RETRY:
                self._schedule_retry(batch, reply, now)
            elif reply.status == 400:
                self._finish_batch(batch)
                self._on_refused(batch, reply)
            elif verdict is Verdict.SPLIT:
                self._finish_batch(batch)
                self._split(batch, batch.family)
            else:
                self._finish_batch(batch)
                if reply.status in (401, 403) and self._rekey(batch, reply):
                    continue
                reason = "too_large" if reply.status == 413 else "rejected"
                self._drop(batch.events, reason, _rejection(reply, batch))

    def _split(self, batch: _Batch, family: Optional[_Family]) -> None:
        """Sends both halves of ``batch`` next, first half first."""
        middle = len(batch.events) // 2
        first = _Batch(batch.events[:middle], batch.target, batch.first_attempt, family, batch.depth + 1)
        second = _Batch(batch.events[middle:], batch.target, batch.first_attempt, family, batch.depth + 1)
        for half in (first, second):
            self._live[id(half)] = half
        self._priority.appendleft(second)
        self._priority.appendleft(first)

    def _on_refused(self, batch: _Batch, reply: Reply) -> None:
        """A 400: bisect to isolate the bad events, unless ODP refuses everything alike (see _SAMPLES)."""
        batch.refused = True
        family = batch.family
        if family is None:
            family = batch.family = _Family(len(batch.events))
            if self._refusing_alike == reply.status and len(batch.events) > _SAMPLES:
                self._sample(family, batch)
                return
        if family.systemic:
            self._drop(batch.events, "rejected_systemic", None)
            return
        if family.sampling and not family.delivered:
            self._hold(family, batch)
            if batch.sample:
                family.samples_refused += 1
                if family.samples_refused >= _SAMPLES:
                    self._refused_systemically(family, reply)
            return
        if not family.delivered and batch.depth == _SUSPECT_DEPTH and family.size > _SAMPLES * 2 ** _SUSPECT_DEPTH:
            # Nothing of the batch delivered yet: hold each refused quarter until all four are known;
            # when all four are refused, sample the last one.
            failures = family.failures[batch.depth] = family.failures.get(batch.depth, 0) + 1
            if failures < 2 ** _SUSPECT_DEPTH:
                self._hold(family, batch)
            else:
                self._sample(family, batch)
            return
        if len(batch.events) > 1:
            self._split(batch, family)
        else:
            self._drop(batch.events, "rejected", _rejection(reply, batch))

    def _sample(self, family: _Family, batch: _Batch) -> None:
        """Sends _SAMPLES single events of ``batch`` alone (spread over it); holds the rest."""
        family.sampling = True
        events = batch.events
        picks = sorted({round(i * (len(events) - 1) / (_SAMPLES - 1)) for i in range(_SAMPLES)})
        for index in reversed(picks):
            sample = _Batch([events[index]], batch.target, batch.first_attempt, family, batch.depth + 1)
            sample.sample = True
            self._live[id(sample)] = sample
            self._priority.appendleft(sample)
        rest = [e for i, e in enumerate(events) if i not in picks]
        if rest:
            self._hold(family, _Batch(rest, batch.target, batch.first_attempt, family, batch.depth + 1))

    def _hold(self, family: _Family, batch: _Batch) -> None:
        self._live[id(batch)] = batch  # still pending: flush() and close() wait for it
        family.held.append(batch)

    def _release_held(self, family: _Family) -> None:
        """Part of the family was delivered: not systemic. Held parts go on: bisected or sent."""
        held, family.held = family.held, []
        for batch in held:
            self._finish_batch(batch)
            if not batch.refused:
                self._live[id(batch)] = batch
                self._priority.append(batch)
            elif len(batch.events) > 1:
                self._split(batch, family)
            else:
                self._drop(batch.events, "rejected", _compat.ODP_EVENT_FAILED.format(
                    f"ODP rejected 1 event(s) with HTTP 400; dropped idempotence_id {batch.events[0].idempotence_id}"))

    def _refused_systemically(self, family: _Family, reply: Reply) -> None:
        family.systemic = True
        self._refusing_alike = reply.status
        held, family.held = family.held, []
        events = [e for batch in held for e in batch.events]
        for batch in held:
            self._finish_batch(batch)
        detail = f": {reply.detail.strip()[:200]}" if reply.detail.strip() else ""
        self._drop(events, "rejected_systemic", _compat.ODP_EVENT_FAILED.format(
            f"ODP refused a batch of {family.size} event(s) and every part and sample of it alike with HTTP "
            f"{reply.status}{detail}; not splitting it further (a revoked key or a changed event schema?): "
            f"{len(events)} event(s) dropped as rejected_systemic"))

    def _rekey(self, batch: _Batch, reply: Reply) -> bool:
        """A 401/403 for events queued under a key the datafile has since replaced: once, the current key."""
        target = self._target
        if batch.rekeyed or target is None or target.key == batch.target.key:
            return False
        moved = _Batch(batch.events, target, batch.first_attempt)
        moved.rekeyed = True
        self._live[id(moved)] = moved
        self._priority.append(moved)
        self.logger.info(f"ODP refused the previous key {mask_key(batch.target.key)} (HTTP {reply.status}); "
                         f"sending {len(batch.events)} event(s) queued under it with the current key "
                         f"{mask_key(target.key)}.")
        return True

    def _finish_batch(self, batch: _Batch) -> None:
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

    def _schedule_retry(self, batch: _Batch, reply: Reply, now: float) -> None:
        batch.attempts += 1
        first = _first_attempt(batch)
        if self._policy.expired(first, now):
            self._give_up(batch, f" after {batch.attempts} attempt(s) over {now - first:.0f} s; "
                                 f"last: {_describe(reply)}")
            return
        delay = self._policy.delay(batch.attempts, reply.retry_after)
        if self._closing:
            # Shutdown cuts retry waits short; the close deadline still bounds the whole.
            delay = min(delay, 1.0)
        self._retries += 1
        heapq.heappush(self._retry_heap, (now + delay, next(self._retry_seq), batch))
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_failure_warning >= _WARN_EVERY:
            self._last_failure_warning = now
            self.logger.warning(
                f"ODP event delivery failing ({_describe(reply)}); holding events and retrying "
                f"(next attempt in {delay:.1f} s).")

    def _give_up(self, batch: _Batch, why: str) -> None:
        self._finish_batch(batch)
        self._drop(batch.events, "retry_expired", _compat.ODP_EVENT_FAILED.format(
            f"gave up on {len(batch.events)} event(s){why}"))

    def _recovered(self, now: float) -> None:
        assert self._failing_since is not None
        self.logger.info(f"ODP event delivery recovered after {now - self._failing_since:.1f} s.")
        self._failing_since = None
        # ODP answers again: every waiting retry may go now, oldest first.
        self._retry_heap = [(now, seq, batch) for _, seq, batch in self._retry_heap]
        heapq.heapify(self._retry_heap)

    def _expire(self, now: float) -> None:
        heap = self._retry_heap
        if not heap:
            return
        kept = []
        for entry in heap:
            if self._policy.expired(_first_attempt(entry[2]), now):
                self._give_up(entry[2], f": retry window of {self._policy.window:g} s expired")
            else:
                kept.append(entry)
        if len(kept) != len(heap):
            heapq.heapify(kept)
            self._retry_heap = kept

    def _dispatch(self, now: float) -> None:
        limit = self.options.max_in_flight
        while self._priority and self._in_flight < limit:
            self._submit(self._priority.popleft(), now)
        if self._retry_heap or self._probe_in_flight:
            if self._failing_since is not None or self._probe_in_flight:
                # ODP is failing: one probe at a time, oldest first; new batches wait behind it.
                if not self._probe_in_flight and self._in_flight < limit:
                    due, _, batch = self._retry_heap[0]
                    if due <= now:
                        heapq.heappop(self._retry_heap)
                        batch.probe = True
                        self._probe_in_flight = True
                        self._submit(batch, now)
                return
            # ODP answers again: the batches that waited go first, as many at once as allowed.
            heap = self._retry_heap
            while heap and self._in_flight < limit and heap[0][0] <= now:
                self._submit(heapq.heappop(heap)[2], now)
            if heap:
                return
        hurry = self._closing or self._flush_waiters > 0 or self.options.flush_interval <= 0
        while self._in_flight < limit:
            waiting = len(self._queue) + len(self._ready)
            if waiting == 0 and self._recovery is None:
                self._partial_since = None
                return
            if waiting < self._batch_size and not hurry and self._recovery is None:
                if self._partial_since is None:
                    self._partial_since = now
                if now - self._partial_since < self.options.flush_interval:
                    return
            self._ingest(self._capacity if self._spool is not None else self._batch_size)
            new_batch = self._take_batch()
            if new_batch is None:
                # Nothing sendable (events held for the datafile): no timed wake-up, or the worker
                # would spin every millisecond; update_config() and enqueue() wake it.
                self._partial_since = None
                return
            self._live[id(new_batch)] = new_batch
            self._submit(new_batch, now)
            self._partial_since = now if self._queue or self._ready else None

    def _ingest(self, limit: int) -> None:
        """Moves events to the ready list: the spool's backlog first, then the caller's queue.

        Each event's target is resolved, its ``idempotence_id`` drawn and its JSON encoded once;
        with the spool on, the group is appended to the spool before it can be sent.
        """
        ready = self._ready
        while self._recovery is not None and len(ready) < limit:
            try:
                host, key, encoded = next(self._recovery)
            except StopIteration:
                self._recovery = None
                break
            except Exception:
                _log.exception("reading the spool failed")
                self.logger.error("ODP spool: reading events left by an earlier process failed; skipping the rest.")
                self._recovery = None
                break
            encoded.seq = -1  # before everything of this process: flush() waits for these too
            self._recovered_count += 1
            ready.append((encoded, Target(host, key, events_url(host))))
        queue = self._queue
        group: List[Tuple[Target, Encoded]] = []
        max_bytes = self.options.max_batch_bytes
        while queue and len(ready) < limit:
            # Pop first, then look: with overflow="drop_oldest" callers pop from this end too.
            try:
                item = queue.popleft()
            except IndexError:
                break
            pending, target = item
            if target is None:
                # Sent before the datafile arrived: it takes the first ODP settings, once known.
                if self._state is UNDETERMINED:
                    queue.appendleft(item)
                    break
                target = self._initial_target
            self._popped += 1
            if target is None:
                self._drop_unintegrated(pending)
                continue
            try:
                encoded = encode(pending, self._defaults)
            except Exception as exc:
                # Whatever a pathological value raises (TypeError, RecursionError, MemoryError from a
                # str subclass's __str__, ...), this event reaches an outcome and the others go on.
                self._dropped["unencodable"] += 1
                line = _compat.ODP_EVENT_FAILED.format(
                    f"event cannot be encoded ({exc.__class__.__name__}: {str(exc)[:200]}); dropped")
                self.logger.error(line)
                if self._on_outcome is not None:
                    self._report("unencodable", [pending], line)
                continue
            encoded.seq = self._popped + self._overflow_popped - 1
            if batch_size_bytes(1, len(encoded)) > max_bytes:
                self._drop([encoded], "too_large", _compat.ODP_EVENT_FAILED.format(
                    f"event {encoded.idempotence_id} is {len(encoded)} bytes, over max_batch_bytes "
                    f"({max_bytes}); dropped"))
                continue
            ready.append((encoded, target))
            group.append((target, encoded))
            if len(group) >= self._batch_size and self._spool is not None:
                # Written as it goes: a caller outpacing this loop must not keep everything in memory.
                self._spool_append(group)
                group = []
        if group and self._spool is not None:
            self._spool_append(group)

    def _spool_append(self, group: List[Tuple[Target, Encoded]]) -> None:
        spool = self._spool
        assert spool is not None
        try:
            kept = spool.append([(target.host, target.key, encoded) for target, encoded in group])
        except Exception as exc:
            _log.exception("spool append failed")
            self.logger.error(f"ODP spool: writing failed ({exc.__class__.__name__}: {exc}); "
                              "continuing with memory-only delivery.")
            self._spool = None
            return
        refused = len(group) - kept
        if refused > 0:
            # Over spool_max_bytes: the newest events of this group were not written; drop them.
            for _ in range(refused):
                self._ready.pop()
            self._drop([e for _, e in group[kept:]], "queue_full", None)
            self._spool_refused += refused
            now = time.monotonic()
            if now - self._last_spool_warning >= _WARN_EVERY:  # like the queue's: at most one per _WARN_EVERY
                self._last_spool_warning = now
                refused, self._spool_refused = self._spool_refused, 0
                self.logger.warning(f"ODP spool is full (spool_max_bytes={self.options.spool_max_bytes}); "
                                    f"dropped {refused} new event(s) since the last warning.")

    def _take_batch(self) -> Optional[_Batch]:
        """The next batch from the ready list: one target, up to batch_size and max_batch_bytes."""
        events: List[Encoded] = []
        target: Optional[Target] = None
        body_bytes = 0
        max_bytes = self.options.max_batch_bytes
        ready = self._ready
        while ready and len(events) < self._batch_size:
            encoded, item_target = ready[0]
            if target is None:
                target = item_target
            elif item_target != target:
                break
            if events and batch_size_bytes(len(events) + 1, body_bytes + len(encoded)) > max_bytes:
                break
            ready.popleft()
            events.append(encoded)
            body_bytes += len(encoded)
        if not events or target is None:
            return None
        return _Batch(events, target)

    def _drop_unintegrated(self, pending: Pending) -> None:
        # Counted one by one, logged once per run of them (when the run ends).
        self._dropped["not_integrated"] += 1
        if self._on_outcome is not None:
            self._report("not_integrated", [pending], _compat.ODP_NOT_INTEGRATED)
        if not self._queue or self._queue[0][1] is not None:
            self.logger.error(
                f"{_compat.ODP_NOT_INTEGRATED} Discarded event(s) sent before the datafile was loaded "
                f"({self._dropped['not_integrated']} so far).")

    def _submit(self, batch: _Batch, now: float) -> None:
        if batch.first_attempt is None:
            batch.first_attempt = now
        self._in_flight += 1
        self._in_flight_events += len(batch.events)
        if self._on_outcome is not None:
            self._in_flight_batches[id(batch)] = batch
        self._requests += 1
        self._send_queue.append(batch)
        self._send_ready.release()


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


def _first_attempt(batch: _Batch) -> float:
    # Set by _submit before any reply can exist; halves of a split batch inherit it.
    assert batch.first_attempt is not None
    return batch.first_attempt


def _describe(reply: Reply) -> str:
    if reply.status == NETWORK_ERROR:
        return reply.detail or "network error"
    return f"HTTP {reply.status}"


def _rejection(reply: Reply, batch: _Batch) -> str:
    ids = ", ".join(e.idempotence_id for e in batch.events[:3]) + (", ..." if len(batch.events) > 3 else "")
    detail = f": {reply.detail.strip()[:200]}" if reply.detail.strip() else ""
    return _compat.ODP_EVENT_FAILED.format(
        f"ODP rejected {len(batch.events)} event(s) with HTTP {reply.status}{detail}; "
        f"dropped idempotence_id {ids}")


def _reasons(dropped: Dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count)
