"""Where callers wait for the worker: components that own a condition and what its waiters wait for.

:class:`FlushBarrier` — where ``flush()`` waits: the low-water mark is the lowest sequence number of an
event still held (the worker raises it after each pass, under the ledger); a flush waits until it
passes the events queued before the call.

:class:`Room` — where a caller waits with ``overflow="block"`` and a full queue, until the worker has
taken events from it (or the manager closes).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

# How long a notifier waits for a condition's lock. Waiters hold it only between a check and their
# wait(), microseconds, except a caller our SIGTERM handler interrupted right there (it closes on that
# very thread): then the notifier goes on, and the waiter sees the change at its next check (each
# waits _IDLE_WAKE at most). The worker never blocks on a caller this way, the ledger in hand.
_NOTIFY_PATIENCE = 0.05


def notify_all(condition: threading.Condition) -> None:
    """``condition.notify_all()``, waiting at most _NOTIFY_PATIENCE for its lock."""
    if condition.acquire(timeout=_NOTIFY_PATIENCE):
        try:
            condition.notify_all()
        finally:
            condition.release()


class FlushBarrier:
    """The low-water mark, the flushes waiting on it, and their condition."""

    __slots__ = ("_cond", "low_water", "waiters")

    def __init__(self) -> None:
        # Re-entrant: our SIGTERM handler may close (and notify) inside a flush that holds it.
        self._cond = threading.Condition(threading.RLock())
        self.low_water = 0
        self.waiters = 0  # flushes waiting: the worker hurries partial batches for them

    def remake(self) -> None:
        """Green primitives for a process patched since (see ManagerState._remake_primitives)."""
        self._cond = threading.Condition(threading.RLock())

    def raise_to(self, low: int) -> None:
        """The worker's pass is done: ``low`` is the lowest sequence number still held."""
        self.low_water = low
        if self.waiters:
            notify_all(self._cond)

    def wake_all(self) -> None:
        """The close finished: waiting flushes look again (and find nothing to wait for)."""
        notify_all(self._cond)

    def wait(self, barrier: int, remaining: Callable[[], float], gone: Callable[[], bool],
             started: Callable[[], None]) -> Optional[bool]:
        """Waits until the low-water mark reaches ``barrier``.

        Args:
            barrier: The sequence number the flush waits for.
            remaining: Seconds left to wait (asked before each wait; <= 0 ends it).
            gone: Whether nothing will move any more (no worker, or closed): ends the wait.
            started: Called once this flush is counted among the waiters (to wake the worker).

        Returns:
            True when reached, False when out of time, None when ``gone`` ended the wait first.
        """
        with self._cond:
            self.waiters += 1
            started()
            try:
                while self.low_water < barrier:
                    wait = remaining()
                    if wait <= 0:
                        return False
                    self._cond.wait(wait)
                    if gone():
                        return self.low_water >= barrier or None
                return True
            finally:
                self.waiters -= 1


class Room:
    """``overflow="block"``: the callers waiting for room in a full queue, and their condition. The worker
    tells them only when there are some (:attr:`waiters`), so it never wakes a caller for nothing."""

    __slots__ = ("_cond", "waiters")

    def __init__(self) -> None:
        self.remake()
        self.waiters = 0

    def remake(self) -> None:
        """Green primitives for a process patched since (see ManagerState._remake_primitives)."""
        # Re-entrant: our SIGTERM handler may close (and notify it) inside a caller that holds it.
        self._cond = threading.Condition(threading.RLock())

    def wake_all(self) -> None:
        """There is room now, or the manager closes: the waiting callers look again."""
        notify_all(self._cond)

    def wait(self, full: Callable[[], bool], deadline: float, gone: Callable[[], bool], wake: Callable[[], None],
             patience: float) -> bool:
        """Waits until the queue is not ``full()`` any more.

        Args:
            full: Whether the queue is still full (asked before each wait).
            deadline: When to give up (a monotonic time).
            gone: Whether room will never come (the close finished): ends the wait.
            wake: Wakes the worker (a full queue is a full batch: it must be draining).
            patience: The longest single wait (each wait looks again, whatever woke it).

        Returns:
            True when there is room, False when out of time or gone.
        """
        with self._cond:
            self.waiters += 1
            try:
                while full():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or gone():
                        return False
                    wake()
                    self._cond.wait(min(remaining, patience))
                return True
            finally:
                self.waiters -= 1
