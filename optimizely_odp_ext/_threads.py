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

Green threads (gevent, eventlet): once ``threading`` is monkey-patched, a ``threading.Thread`` is a
greenlet on the one OS thread that runs the hub, and every lock, condition and sleep of the
standard library waits cooperatively. This package then lives in that world entirely: its worker
and senders are greenlets, their locks the patched ones, their HTTP the patched sockets (which
requests and urllib3 use anyway). One world per object: a real OS lock waited on by a greenlet
blocks the hub and freezes the process, a green lock released from another OS thread never wakes
its waiter. Patching may come after this package was imported, even after a fork (gunicorn's gevent
worker patches in the child): :func:`green` is asked lazily, when a manager starts its threads, and
the manager rebuilds its locks if they were made before the patch. Signal masks are per OS thread:
a greenlet needs none of its own, and blocking the mask around a green ``start()`` (which switches
to other greenlets) would block the hub's own thread, so :func:`start_quiet` leaves it alone there.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from typing import FrozenSet, Optional

_NAMES = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
          "SIGWINCH", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGCONT", "SIGVTALRM", "SIGPROF")
ASYNC_SIGNALS: FrozenSet[int] = frozenset(getattr(signal, name) for name in _NAMES if hasattr(signal, name))


_green_pid = 0  # the process found patched (no library undoes its patching)


def green() -> bool:
    """Whether ``threading`` is monkey-patched (gevent, eventlet) in this process, now.

    Never imports either library: a process that has not imported it has not patched with it.
    """
    global _green_pid  # noqa: PLW0603 - remembered per process
    pid = os.getpid()
    if _green_pid == pid:
        return True
    monkey = sys.modules.get("gevent.monkey")
    patcher = sys.modules.get("eventlet.patcher")
    try:
        patched = bool((monkey is not None and monkey.is_module_patched("threading"))
                       or (patcher is not None and patcher.is_monkey_patched("thread")))
    except Exception:  # a module of that name that is not theirs
        patched = False
    if patched:
        _green_pid = pid
    return patched


def on_main_thread() -> bool:
    """Whether the caller runs on the process's main OS thread, where Python runs signal handlers.

    Any greenlet of a patched main thread is on it, though ``threading.current_thread()`` (a green
    thread there) is then not ``threading.main_thread()``.
    """
    main = threading.main_thread()
    if not green():
        return threading.current_thread() is main
    native = getattr(main, "native_id", None)
    return native is not None and native == threading.get_native_id()


def start_quiet(thread: threading.Thread) -> None:
    """Starts ``thread`` with :data:`ASYNC_SIGNALS` blocked in it from its first instruction.

    The mask is set on the starting thread around ``start()`` (a new thread inherits its creator's
    mask), so there is no moment at which the new thread could take a signal. A signal that
    arrives at the starting thread meanwhile stays pending and is delivered when its mask is put
    back, microseconds later. Where threads have no signal masks (Windows), or where ``thread``
    is a greenlet (:func:`green`), this is ``start()``: a green ``start()`` switches to other
    greenlets, which would run (and start their own threads) with the hub's signals blocked.
    """
    block = getattr(signal, "pthread_sigmask", None)
    if block is None or green():
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
