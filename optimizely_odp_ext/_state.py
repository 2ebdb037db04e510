"""The event manager's state, declared once for all its pieces, and who may touch what.

:class:`~optimizely_odp_ext.manager.EventManager` is assembled from one class per job (the caller's
queue, the scheduler, the batcher, the bisector, the sender pool, the outcomes); each derives from
:class:`ManagerState`, so the state they share is listed here, grouped by the thread that owns it.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional

from ._barrier import FlushBarrier, Room
from ._batch import _Item
from ._caller_counts import CallerCounts
from ._ledger import Ledger
from ._lifetime import Lifetime
from ._odp_target import OdpTarget
from ._senders import Senders
from ._spooling import Spooling
from ._tally import Tally
from ._threads import Wake
from .retry import RetryPolicy
from .settings import Options
from .transport import Transport

SPOOL_INTERVAL = 0.05  # with the spool on, queued events are written at least this often (seconds)
_IDLE_WAKE = 5.0  # the worker looks around at least this often, even with nothing to do
# A worker that has not passed for this long while events wait is not running at all: Python threads
# do not run in this process (uWSGI without threads support, a frozen interpreter...).
STALL_SECONDS = 15.0

OutcomeCallback = Callable[[str, List[Dict[str, Any]], str], None]

class ManagerState:
    """Attributes of one manager. Set once in ``EventManager.__init__``, then per process below."""

    # Slots: a caller's send reads about a dozen of these attributes after an idle pause, with cold
    # caches; a slot is one fixed offset, where a 50-key instance dict costs a hashed lookup each
    # (and is past CPython's shared-key limit). __dict__ stays for what tests attach; __weakref__
    # for the process registry (_lifecycle).
    __slots__ = ("__dict__", "__weakref__", "_barrier", "_batch_size", "_capacity", "_counts", "_defaults", "_ledger",
                 "_life", "_odp", "_on_outcome", "_policy", "_queue", "_room", "_senders", "_spool", "_tally",
                 "_transport_factory", "_wake", "logger", "options")

    options: Options
    logger: Any
    _transport_factory: Callable[[Options], Transport]
    _policy: RetryPolicy
    _defaults: Dict[str, Any]
    _on_outcome: Optional[OutcomeCallback]
    _capacity: int
    _batch_size: int
    _odp: OdpTarget  # where events go: the ODP settings of the current datafile
    _life: Lifetime  # this process, its worker thread, the steps of the close
    _spool: Spooling  # the spool hand-off (spool_dir): writing, acknowledging, the backlog

    def _reset_runtime(self) -> None:
        """Everything that belongs to one process: queue, threads, connections, counters."""
        self._life.reset()
        # Shared between threads without a lock: deque append/popleft and Event are atomic, and each
        # flag below has a single writer (the caller's side, close() or the worker, as noted).
        self._queue: Deque[_Item] = collections.deque()  # callers append, the worker pops (drop_oldest: callers too)
        self._make_primitives()
        self._barrier = FlushBarrier()  # where flush() waits for the worker (see _barrier)
        # The sender threads, the transport and the batches in flight: a component (see _senders).
        self._senders = Senders(self.options, self._transport_factory, self._wake)
        self._room = Room()  # overflow="block": callers waiting for room (see _barrier)
        # Counted by the caller's side, on rare paths only: refused calls, a full queue's drops.
        self._counts = CallerCounts(self._capacity, self.logger, self._on_outcome is not None)
        # The outcome counters, and what is to be said about outcomes once the ledger is released.
        self._tally = Tally(self._on_outcome, self.logger)
        # The worker's delivery state, and the lock of every hand-off between owners (see _ledger).
        self._ledger = Ledger()
        self._spool.reset()

    def _make_primitives(self) -> None:
        """The locks and wake-ups the manager itself holds, of this process's threading world now: real
        ones, or green ones once gevent or eventlet patched ``threading`` (see _threads)."""
        self._wake = Wake()  # never blocks its setter: see Wake

    def _remake_primitives(self) -> None:
        """The process was patched (gevent, eventlet) after the primitives were made: a gunicorn
        worker patches after the fork, once a preloaded app made its client. Nothing waits on them
        before the worker starts, so ``_start()`` makes them all again, the components' too: a greenlet
        waiting on a real lock would block the process's only OS thread."""
        self._make_primitives()
        self._life.remake()
        self._ledger.remake()
        self._senders.remake(self._wake)
        self._barrier.remake()
        self._room.remake()
        self._counts.remake()
        self._tally.remake()

    if TYPE_CHECKING:
        # The lifecycle of one manager, provided by EventManager (manager.py): the pieces call these
        # hooks but never import the manager.
        def _start(self) -> None: ...

        def _after_fork(self) -> None: ...

        def _uwsgi_started(self) -> None: ...

        def _refuse_late(self) -> bool: ...

        def _finish(self, wait: float = -1) -> bool: ...
