"""The event manager's state, declared once for all its pieces, and who may touch what.

:class:`~optimizely_odp_ext.manager.EventManager` is assembled from one class per job (the caller's
queue, the scheduler, the batcher, the bisector, the sender pool, the outcomes); each derives from
:class:`ManagerState`, so the state they share is listed here, grouped by the thread that owns it.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from . import _threads, _uwsgi
from ._batch import Target, _Batch, _Item
from ._stats import DROP_REASONS, REFUSE_REASONS
from ._threads import Wake
from .event import Encoded, Pending
from .retry import RetryPolicy
from .settings import Options
from .spool import Spool
from .transport import Reply, Transport

SPOOL_INTERVAL = 0.05  # with the spool on, queued events are written at least this often (seconds)
_WARN_EVERY = 10.0  # seconds between two "queue full" / "still failing" warnings
_IDLE_WAKE = 5.0  # the worker looks around at least this often, even with nothing to do
# A worker that has not passed for this long while events wait is not running at all: Python threads
# do not run in this process (uWSGI without threads support, a frozen interpreter...).
STALL_SECONDS = 15.0

OutcomeCallback = Callable[[str, List[Dict[str, Any]], str], None]


class ManagerState:
    """Attributes of one manager. Set once in ``EventManager.__init__``, then per process below."""

    # Slots: a caller's send reads about a dozen of these attributes after an idle pause, with cold
    # caches; a slot is one fixed offset, where a 70-key instance dict costs a hashed lookup each
    # (and is past CPython's shared-key limit). __dict__ stays for what tests attach; __weakref__
    # for the process registry (_lifecycle).
    __slots__ = ("__dict__", "__weakref__", "_batch_size", "_capacity", "_close_deadline", "_close_seen",
                 "_closed", "_closing", "_count_lock", "_defaults", "_delivered", "_dropped", "_failing_since",
                 "_finished", "_flush_cond", "_flush_waiters", "_forks_in_c", "_green", "_held_for_fork", "_idle",
                 "_in_background", "_in_flight", "_in_flight_batches", "_in_flight_events", "_initial_target",
                 "_last_failure_warning", "_last_overflow_warning", "_last_pass", "_last_spool_warning",
                 "_left_in_spool", "_lifecycle", "_live", "_low_water", "_on_outcome", "_outcome_failures",
                 "_overflow_popped", "_overflow_report", "_overflow_since_warning", "_overflowed",
                 "_partial_since", "_pid", "_policy", "_popped", "_priority", "_probe_in_flight", "_queue",
                 "_ready", "_recovered_count", "_recovery", "_refusal", "_refused", "_refusing_alike",
                 "_requests", "_results", "_retries", "_retry_heap", "_retry_seq", "_room", "_room_waiters",
                 "_seen_empty", "_send_queue", "_send_ready", "_senders", "_spool", "_spool_refused",
                 "_start_lock", "_state", "_target", "_timeout", "_transport", "_transport_factory", "_wake",
                 "_worker", "logger", "options")

    options: Options
    logger: Any
    _transport_factory: Callable[[Options], Transport]
    _policy: RetryPolicy
    _defaults: Dict[str, Any]
    _on_outcome: Optional[OutcomeCallback]
    _outcome_failures: int  # on_outcome raised this often (worker only)
    _timeout: Tuple[float, float]
    _capacity: int
    _batch_size: int
    # The ODP settings of the current datafile (written by update_config(), read by everyone).
    _state: str
    _target: Optional[Target]
    _initial_target: Optional[Target]
    _refusal: str
    _lifecycle: threading.RLock
    _closed: bool
    _spool: Optional[Spool]
    _recovery: Optional[Iterator[Tuple[str, str, Encoded]]]
    _held_for_fork: bool  # a process uWSGI forks its workers from: no threads, events held (see _uwsgi)

    def _reset_runtime(self) -> None:
        """Everything that belongs to one process: queue, threads, connections, counters."""
        self._pid = os.getpid()
        self._forks_in_c = _uwsgi.hosted()
        # Shared between threads without a lock: deque append/popleft and Event are atomic, and each
        # flag below has a single writer (the caller's side, close() or the worker, as noted).
        self._queue: Deque[_Item] = collections.deque()  # callers append, the worker pops (drop_oldest: callers too)
        self._make_primitives()
        self._worker: Optional[threading.Thread] = None
        self._senders: List[threading.Thread] = []
        # Worker -> senders and back (see _senders): the only hand-offs between those threads.
        self._send_queue: Deque[Optional[_Batch]] = collections.deque()
        self._results: Deque[Tuple[_Batch, Reply]] = collections.deque()
        self._transport: Optional[Transport] = None
        self._closing = False
        self._finished = False
        self._in_background = False  # closing without a caller waiting (the client was garbage-collected)
        self._idle = False
        self._last_pass = time.monotonic()  # the worker's last pass (worker writes, callers read)
        self._seen_empty = True
        self._close_seen = False
        self._close_deadline = 0.0
        self._flush_waiters = 0
        self._room_waiters = 0
        self._overflowed = 0
        # on_outcome only: events the caller's side dropped as queue_full, for the worker to report.
        self._overflow_report: Deque[Pending] = collections.deque()
        self._overflow_popped = 0  # drop_oldest: events that left the queue from the caller's side
        self._refused: Dict[str, int] = dict.fromkeys(REFUSE_REASONS, 0)
        self._last_overflow_warning = -_WARN_EVERY
        self._overflow_since_warning = 0
        # Owned by the worker thread: only the worker writes these, so they are not locked. Other threads
        # only read them (stats(), flush()'s barrier), and a read of an int or a len() is atomic.
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

    def _make_primitives(self) -> None:
        """The locks and wake-ups, of this process's threading world now: real ones, or green ones
        once gevent or eventlet patched ``threading`` (see _threads). Nothing waits on them before
        the worker starts, so ``_start()`` makes them again if the process was patched since."""
        self._green = _threads.green()
        self._wake = Wake()  # never blocks its setter: see Wake
        self._start_lock = threading.Lock()
        self._flush_cond = threading.Condition(threading.RLock())
        self._send_ready = threading.Semaphore(0)  # worker -> senders, with _send_queue
        # overflow="block": callers waiting for room; the worker notifies only when there are some.
        # Re-entrant: our SIGTERM handler may close (and notify it) inside a caller that holds it.
        self._room = threading.Condition(threading.RLock())
        # Counted by the caller's side, on rare paths only (under _count_lock).
        self._count_lock = threading.RLock()

    if TYPE_CHECKING:
        # The lifecycle of one manager, provided by EventManager (manager.py): the pieces call these
        # hooks but never import the manager.
        def _start(self) -> None: ...

        def _after_fork(self) -> None: ...

        def _uwsgi_started(self) -> None: ...

        def _refuse_late(self) -> bool: ...

        def _finish(self) -> None: ...
