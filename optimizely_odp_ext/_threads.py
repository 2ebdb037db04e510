"""Threads of ours never take the application's signals.

The kernel delivers a signal sent to a process (``kill``, ``Pool.terminate()``, an orchestrator's
SIGTERM) to any one of its threads that does not block it. Python runs its handlers on the main
thread only, and learns of a signal caught by another thread only when the main thread next runs
Python code: a main thread blocked in a C call (waiting on a ``multiprocessing`` lock, a join, a
pipe) is then never interrupted, and a process that installed a handler for SIGTERM (ours with
``flush_on_sigterm=True``, or the application's) can hang instead of ending. So every thread this
package starts is born with the asynchronous signals blocked, and they go to the application's
threads, as if ours did not exist. Fault signals (SIGSEGV, SIGPIPE, ...) are left alone: they are
raised by the thread itself.
"""

from __future__ import annotations

import _thread
import signal
import threading
from typing import FrozenSet, Optional

_NAMES = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
          "SIGWINCH", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGCONT", "SIGVTALRM", "SIGPROF")
ASYNC_SIGNALS: FrozenSet[int] = frozenset(getattr(signal, name) for name in _NAMES if hasattr(signal, name))


def start_quiet(thread: threading.Thread) -> None:
    """Starts ``thread`` with :data:`ASYNC_SIGNALS` blocked in it from its first instruction.

    The mask is set on the starting thread around ``start()`` (a new thread inherits its creator's
    mask), so there is no moment at which the new thread could take a signal. A signal that
    arrives at the starting thread meanwhile stays pending and is delivered when its mask is put
    back, microseconds later. Where threads have no signal masks (Windows), this is ``start()``.
    """
    block = getattr(signal, "pthread_sigmask", None)
    if block is None:
        thread.start()
        return
    previous = block(signal.SIG_BLOCK, ASYNC_SIGNALS)
    try:
        thread.start()
    finally:
        block(signal.SIG_SETMASK, previous)


class Wake:
    """The worker's wake-up call: ``set()`` by any thread, ``wait()`` by the one worker thread.

    Used like a :class:`threading.Event` with a single waiter, but ``set()`` takes no Python-level
    lock: it releases a raw lock, one C call. So it never blocks and cannot deadlock, even when our
    SIGTERM handler (which closes inline, on the main thread) interrupted a ``set()`` on that same
    thread; an Event's ``set()`` would wait there forever for the lock its own thread holds. It is
    also cheaper on the caller's path. ``wait()`` consumes the wake-up; ``clear()`` drops a pending one.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()  # held: not set

    def set(self) -> None:
        """Wakes the waiter (now, or at its next ``wait()``). Never blocks."""
        try:  # noqa: SIM105 - on the caller's path: a try is cheaper than contextlib.suppress
            self._lock.release()
        except RuntimeError:
            pass  # already set

    def clear(self) -> None:
        """Drops a wake-up not consumed yet."""
        self._lock.acquire(False)

    def is_set(self) -> bool:
        """Whether a wake-up is pending."""
        return not self._lock.locked()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits until set (consuming the wake-up) or ``timeout`` seconds. Returns True when woken."""
        if timeout is None:
            return self._lock.acquire()
        if timeout <= 0:
            return self._lock.acquire(False)
        return self._lock.acquire(True, min(timeout, threading.TIMEOUT_MAX))
