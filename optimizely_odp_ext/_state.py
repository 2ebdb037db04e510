"""What one event manager holds: a few settings, the caller's queue, and the components that own the rest.

:class:`~optimizely_odp_ext.manager.EventManager`'s code is split by job (the caller's queue, the
scheduler, the batcher, the bisector, the outcomes), each a class deriving from :class:`ManagerState`.
The state is not theirs to share: each part of it is a component that owns it and is told things
through a few methods, and the hand-offs between threads are objects too (the queue, ``Wake``, the
ledger's lock, the conditions of :mod:`._barrier`):

- :class:`~._odp_target.OdpTarget` — where events go (the datafile's ODP settings);
- :class:`~._lifetime.Lifetime` — this process, the worker thread, the steps of the close;
- :class:`~._spooling.Spooling` — the spool hand-off (opt-in ``spool_dir``);
- :class:`~._ledger.Ledger` — the worker's delivery state, and the lock of every hand-off between owners;
- :class:`~._senders.Senders`, :class:`~._tally.Tally`, :class:`~._caller_counts.CallerCounts`,
  :class:`~._barrier.FlushBarrier`, :class:`~._barrier.Room` — the sender threads, the outcome counters,
  what callers count, where ``flush()`` and blocked callers wait.

A caller's send reads the manager's :class:`~._door.Door` only, on its common path: what it needs is
copied there (see _door). Every other send goes through the manager (``enqueue``).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict

from ._barrier import FlushBarrier, Room
from ._batch import _Item
from ._caller_counts import CallerCounts
from ._door import Door
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


class ManagerState:
    """Attributes of one manager. Set once in ``EventManager.__init__``, then per process below."""

    # Slots: a send on the full path reads several of these attributes (the common path reads the door
    # alone); a slot is one fixed offset, where an instance dict costs a hashed lookup each. __dict__
    # stays for what tests attach; __weakref__ for the process registry (_lifecycle).
    __slots__ = ("__dict__", "__weakref__", "_barrier", "_counts", "_defaults", "_ledger", "_life", "_odp",
                 "_policy", "_queue", "_room", "_senders", "_spool", "_tally", "_transport_factory", "_wake", "door",
                 "logger", "options")

    options: Options
    logger: Any
    _transport_factory: Callable[[Options], Transport]
    _policy: RetryPolicy
    _defaults: Dict[str, Any]
    _odp: OdpTarget  # where events go: the ODP settings of the current datafile
    _life: Lifetime  # this process, its worker thread, the steps of the close (kept across a fork: reset)
    _spool: Spooling  # the spool hand-off (spool_dir): writing, acknowledging, the backlog (likewise)
    door: Door  # what a caller's send reads on its common path (kept across a fork: reset)

    def _reset_runtime(self) -> None:
        """Everything that belongs to one process: queue, threads, connections, counters."""
        self._life.reset()
        # The caller -> worker hand-off, without a lock: deque append/popleft are atomic. Callers
        # append, the worker pops (with drop_oldest, callers too); the worker takes them under the ledger.
        self._queue: Deque[_Item] = collections.deque()
        self._wake = Wake()  # the worker's wake-up: never blocks its setter (see Wake)
        self._barrier = FlushBarrier()  # where flush() waits for the worker (see _barrier)
        # The sender threads, the transport and the batches in flight: a component (see _senders).
        self._senders = Senders(self.options, self._transport_factory, self._wake)
        self._room = Room()  # overflow="block": callers waiting for room (see _barrier)
        # Counted by the caller's side, on rare paths only: refused calls, a full queue's drops.
        self._counts = CallerCounts(self.door.capacity, self.logger, self.options.on_outcome is not None)
        # The outcome counters, and what is to be said about outcomes once the ledger is released.
        self._tally = Tally(self.options.on_outcome, self.logger)
        # The worker's delivery state, and the lock of every hand-off between owners (see _ledger).
        self._ledger = Ledger()
        door = self.door
        door.queue, door.ready, door.idle = self._queue, self._ledger.ready, False
        self._spool.reset()
        self._sync_door()  # shut: no worker in this process yet

    def _remake_primitives(self) -> None:
        """The process was patched (gevent, eventlet) after the primitives were made: a gunicorn
        worker patches after the fork, once a preloaded app made its client. Nothing waits on them
        before the worker starts, so ``_start()`` makes them all again, the components' too: a greenlet
        waiting on a real lock would block the process's only OS thread. Each is made of this process's
        threading world now: real, or green once gevent or eventlet patched ``threading`` (see _threads)."""
        self._wake = Wake()
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

        def _sync_door(self) -> None: ...

        def _after_fork(self) -> None: ...

        def _uwsgi_started(self) -> None: ...

        def _refuse_late(self) -> bool: ...

        def _finish(self, wait: float = -1) -> bool: ...
