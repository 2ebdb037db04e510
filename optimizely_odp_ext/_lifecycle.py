"""Process-level lifecycle: the registry of live event managers, and what runs at exit and fork.

One module owns the process-wide hooks (``atexit``, ``os.register_at_fork``, and the exit paths of
the libraries that end processes without ``atexit``); each hook iterates one weakly held registry,
so a hook never keeps a dropped client's manager alive. Every exit path goes through
:func:`close_all`, which closes all managers *concurrently* under one shared deadline: the exit costs
at most the largest ``close_timeout``, however many clients the process has.

This module never imports the manager: it sees managers through :class:`Closable`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

from typing_extensions import Protocol

from . import _threads
from ._threads import Wake, start_quiet

_log = logging.getLogger(__name__)

# Host glue (_celery, _gunicorn, _uwsgi) registers itself here when it is imported (the package's
# __init__ imports it), so this module never imports a host's glue and nothing imports back.
_HOST_CONNECTS: List[Tuple[Callable[[], object], bool]] = []  # (connect, also after fork)
_FORKS_IN_C: List[Callable[[], bool]] = []  # does a host fork this process in C, without fork hooks?


def add_host(connect: Optional[Callable[[], object]] = None, *, after_fork: bool = False,
             forks_in_c: Optional[Callable[[], bool]] = None) -> None:
    """Registers a host's glue with the lifecycle; called once, at the glue module's import.

    Args:
        connect: Called at every manager registration (and, with ``after_fork``, in every forked
            child): hooks into the host's own exit path if the host is loaded. Cheap and idempotent.
        after_fork: Also call ``connect`` after a fork, in the child.
        forks_in_c: True when a host forks this process in C, without Python's fork hooks: the
            SIGTERM watch (a pipe and a thread) is then not set up.
    """
    if connect is not None:
        _HOST_CONNECTS.append((connect, after_fork))
    if forks_in_c is not None:
        _FORKS_IN_C.append(forks_in_c)


class Closable(Protocol):
    """What the lifecycle needs of an event manager."""

    options: Any

    @property
    def closed(self) -> bool: ...

    def begin_close(self, deadline: float) -> bool: ...

    def end_close(self, deadline: float) -> None: ...

    def close_in_background(self) -> None: ...

    def _after_fork(self) -> None: ...


# The registry, weakly held: id -> weak reference. A dict, not a WeakSet, so that a copy is one
# C-level dict.copy(): a garbage-collected client's finalizer (Python code, possibly on this very
# thread while it copies) can change the registry between two copies, never in the middle of one.
_MANAGERS: Dict[int, weakref.ref[Any]] = {}
# Managers closing (close() under way on some thread, or a garbage-collected client's manager
# delivering in the background): held strongly until they finish, so that every exit path waits for
# them too -- a SIGTERM arriving while a multiprocessing finalizer delivers must not cut it short.
_CLOSING: Set[Any] = set()
# Re-entrant: the SIGTERM handler runs on the main thread, possibly inside register().
_REGISTRY_LOCK = threading.RLock()


def register(manager: Closable) -> None:
    """Adds a manager to the process's registry (weakly: a dropped manager leaves by itself)."""
    key = id(manager)

    def forget(ref: weakref.ref[Any]) -> None:  # the manager was collected
        if _MANAGERS.get(key) is ref:
            del _MANAGERS[key]

    with _REGISTRY_LOCK:
        _MANAGERS[key] = weakref.ref(manager, forget)
    _arm_process_finalizers()
    for connect, _ in tuple(_HOST_CONNECTS):
        connect()  # e.g. Celery's prefork children end without atexit (_celery); gunicorn (_gunicorn)


def closing(manager: Closable, under_way: bool) -> None:
    """Tracks a manager from the start of its close until it has finished."""
    with _REGISTRY_LOCK:
        if under_way:
            _CLOSING.add(manager)
        else:
            _CLOSING.discard(manager)


def all_managers() -> List[Any]:
    """Every manager of this process not garbage-collected, closed ones included (the fork hook
    resets them all, so that no caller's path needs a pid check after a Python fork)."""
    refs = _MANAGERS.copy()  # atomic: see _MANAGERS
    return [manager for manager in (ref() for ref in refs.values()) if manager is not None]


def live_managers() -> List[Any]:
    """The managers not closed yet, in this process."""
    return [manager for manager in all_managers() if not manager.closed]


def close_all(timeout: Optional[float] = None, *, why: str = "exit", at_exit: bool = True) -> int:
    """Closes every live manager of this process concurrently, under one deadline.

    Managers already closing (on another thread, in the background, or in the code this signal
    handler interrupted) are waited for too, under the same deadline.

    Args:
        timeout: The shared budget in seconds; None takes the largest ``close_timeout``.
        why: What ended the process (for the debug log).
        at_exit: True for exit paths: managers with ``flush_at_exit=False`` are left alone.

    Returns:
        How many managers were closed.
    """
    global _closing_thread  # noqa: PLW0603 - which thread runs an exit close (for the SIGTERM handler)
    managers = [m for m in live_managers()
                if not m.closed and (not at_exit or getattr(m.options, "flush_at_exit", True))]
    with _REGISTRY_LOCK:
        under_way = list(_CLOSING.copy())  # set.copy(): atomic, as _MANAGERS.copy()
    outer = _closing_thread is None
    if outer:
        _closing_thread = threading.get_ident()
    try:
        return close_managers(managers, timeout, why=why, waiting=under_way)
    finally:
        if outer:
            _closing_thread = None
            deferred = _deferred_sigterm.pop() if _deferred_sigterm else None
            if deferred is not None:
                _hand_over(*deferred)


def close_managers(managers: List[Any], timeout: Optional[float] = None, *, why: str = "close",
                   waiting: Optional[List[Any]] = None) -> int:
    """Closes ``managers`` concurrently: each starts delivering at once, all share one deadline.

    The whole call takes at most ``timeout`` (default: the largest ``close_timeout`` among them)
    plus a join margin, however many managers there are.

    Args:
        managers: The managers to close (already closed ones are skipped).
        timeout: The shared budget in seconds; None takes the largest ``close_timeout``.
        why: What is closing them (for the debug log).
        waiting: Managers already closing that should be waited for under the same deadline.

    Returns:
        How many managers were closed by this call.
    """
    waiting = waiting or []
    if not managers and not waiting:
        return 0
    budget = (max(m.options.close_timeout for m in managers + waiting) if timeout is None
              else max(timeout, 0.0))
    deadline = time.monotonic() + budget
    _log.debug("closing %d ODP event manager(s) (%s), budget %.1f s", len(managers), why, budget)
    started = []
    for manager in managers:
        try:
            if manager.begin_close(deadline):
                started.append(manager)
        except Exception:  # one manager's failure never skips the others
            _log.exception("closing ODP event manager (%s) failed", why)
    for manager in started + waiting:
        try:
            manager.end_close(deadline)
        except Exception:
            _log.exception("closing ODP event manager (%s) failed", why)
    return len(started)


def _close_all_at_exit() -> None:
    close_all(why="interpreter exit")


def close_client_in_background(manager: Closable) -> None:
    """The finalizer of a garbage-collected client: its manager delivers, then releases its threads."""
    try:
        manager.close_in_background()
    except Exception:  # a finalizer must never raise
        _log.exception("closing the ODP event manager of a dropped client failed")


# ----------------------------------------------------------------- children of multiprocessing / billiard

# A forked child of multiprocessing (or billiard, Celery's fork of it) ends with os._exit() after
# running that library's finalizers: atexit never runs there. So in such a child a finalizer of
# theirs delivers what the child queued. The parent's events stay the parent's (see
# EventManager._after_fork), so nothing is sent twice.
_PROCESS_LIBRARIES = ("multiprocessing.util", "billiard.util")
_armed_libraries: Set[str] = set()
_finalizer_pids: Set[str] = set()


class _Anchor:
    """What the libraries' weakly held after-fork registries hold on to (lives as long as this module)."""


_ANCHOR = _Anchor()


def _arm_process_finalizers() -> None:
    """Once per library, when it is imported: a hook that runs in each of its forked children."""
    for name in _PROCESS_LIBRARIES:
        if name in _armed_libraries:
            continue
        util = sys.modules.get(name)
        register_after_fork = getattr(util, "register_after_fork", None)
        if register_after_fork is None:
            continue
        _armed_libraries.add(name)
        try:
            # Runs in the child after the library cleared the finalizers it inherited.
            register_after_fork(_ANCHOR, _finalizer_installer(name))
        except Exception:
            _log.debug("could not hook %s's forked children", name, exc_info=True)


def _finalizer_installer(name: str) -> Callable[[Any], None]:
    def install_finalizer(_anchor: Any) -> None:
        util = sys.modules.get(name)
        key = f"{name}:{os.getpid()}"
        if util is None or key in _finalizer_pids:
            return
        _finalizer_pids.add(key)
        # exitpriority >= 0: run by the child's first round of finalizers, before its daemonic
        # children are terminated and its queues' feeder threads are joined.
        util.Finalize(None, _close_all_in_child, args=(name.split(".", maxsplit=1)[0],), exitpriority=10)
    return install_finalizer


def _close_all_in_child(library: str) -> None:
    close_all(why=f"{library} child exit")


# ----------------------------------------------------------------- fork

def _before_fork() -> None:
    # Held across the fork, released on both sides: the child never inherits it held by a thread
    # that does not exist there.
    _REGISTRY_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _REGISTRY_LOCK.release()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK  # noqa: PLW0603 - a fresh lock in the child, see _before_fork
    _REGISTRY_LOCK = threading.RLock()
    # Managers closing in the parent: their threads are not here (their children start afresh).
    _CLOSING.clear()
    if _sigterm_installed:
        _watch_sigterm()  # the parent's pipe and thread are not this process's
    _arm_process_finalizers()
    for connect, after_fork in tuple(_HOST_CONNECTS):
        if after_fork:
            connect()  # e.g. a Celery worker imported celery after its managers registered (_celery)
    for manager in all_managers():
        try:
            manager._after_fork()
        except Exception:
            _log.exception("resetting ODP event manager after fork failed")


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


# ----------------------------------------------------------------- SIGTERM (opt-in)

_Handler = Union[Callable[[int, Any], Any], int, None]
_sigterm_previous: Optional[_Handler] = None
_sigterm_installed = False
_closing_thread: Optional[int] = None  # the thread running close_all(), if any
_deferred_sigterm: List[Any] = []  # a SIGTERM that arrived during close_all() on the same thread


def enable_sigterm_flush(logger: Any = None) -> bool:
    """Installs the opt-in SIGTERM handler (``flush_on_sigterm=True``): deliver, then hand over.

    Python's default SIGTERM handling kills the process at once: neither ``atexit`` nor ``close()``
    run. Our handler closes every live manager (one shared deadline, the largest
    ``close_timeout``), then hands over to the handler that was installed before it: a Python
    handler is called; the default one ends the process as SIGTERM would (killed by the signal);
    an ignored SIGTERM stays ignored. Installed once per process, and only from the main thread (as
    Python requires). A handler the application sets later replaces ours, and we never put ours
    back.

    Returns:
        True when our handler is in place.
    """
    global _sigterm_previous, _sigterm_installed
    if _sigterm_installed:
        return signal.getsignal(signal.SIGTERM) is _on_sigterm
    if not _threads.on_main_thread():
        if logger is not None:
            logger.warning("flush_on_sigterm=True needs install() on the main thread (Python sets signal "
                           "handlers there only); SIGTERM keeps its default handling.")
        return False
    try:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError) as exc:
        if logger is not None:
            logger.warning(f"flush_on_sigterm=True: cannot set a SIGTERM handler ({exc}).")
        return False
    _sigterm_previous, _sigterm_installed = previous, True
    _watch_sigterm()
    return True


def disable_sigterm_flush() -> None:
    """Puts the previous SIGTERM handler back, if ours is still the one installed."""
    global _sigterm_installed  # noqa: PLW0603
    if not _sigterm_installed:
        return
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _sigterm_previous if _sigterm_previous is not None else signal.SIG_DFL)
    except (ValueError, OSError):
        return  # not on the main thread: leave ours, it hands over anyway
    _sigterm_installed = False
    _unwatch_sigterm()


def _on_sigterm(signum: int, frame: Any) -> None:
    _sigterm_started.set()  # for the watch (see _watch_sigterm); never blocks
    if _closing_thread == threading.get_ident():
        # The signal interrupted an exit close on this very thread (a multiprocessing finalizer,
        # the atexit hook): blocking here, inside the frame it interrupted, could wait on a lock
        # that frame holds. That close delivers; it hands over to the previous handler when done.
        _deferred_sigterm[:] = [(signum, frame)]
        return
    try:
        close_all(why="SIGTERM")
    except Exception:
        _log.exception("delivering ODP events at SIGTERM failed")
    _hand_over(signum, frame)


def _hand_over(signum: int, frame: Any) -> None:
    """After delivering: what SIGTERM would have done without us."""
    previous = _sigterm_previous
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:
        # The default action: end the process as SIGTERM would have, now that the events are out.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


# ----------------------------------------------------------------- SIGTERM watch

# Python runs a signal handler when the main thread next executes Python code. If SIGTERM arrives
# while the main thread is between two system calls of a C-level wait (glibc retries a futex wait
# after a wake-up it lost to another waiter, without returning to Python), the signal is caught and
# flagged but the main thread goes back to sleep, and our handler never runs: a multiprocessing
# Pool worker waiting for its queue's lock then outlives Pool.terminate() forever (seen about once
# in 70 terminates of a two-worker pool under load, with any Python SIGTERM handler, ours or not).
# Python's C handler also writes the signal's number to the "wakeup fd": a thread of ours reads it,
# and if our handler has not started soon after, re-sends SIGTERM to the main thread, whose wait
# then ends with EINTR and runs the handler. Only when the wakeup fd is free: an application (or
# asyncio) that set its own keeps it, and SIGTERM keeps Python's usual behaviour.

_WATCH_GRACE = 0.1  # seconds our handler has to start before the main thread is signalled again
_WATCH_RETRIES = 100  # at most this many times for one SIGTERM (10 s), then the watch gives up
_sigterm_started = Wake()  # set by _on_sigterm, consumed by the watch thread
_watch_pipe: Optional[Tuple[int, int]] = None  # (read, write) of this process's watch


def _watch_sigterm() -> None:
    """On the main thread: claims Python's wakeup fd, if free, and starts the watch thread."""
    global _watch_pipe  # noqa: PLW0603
    if not hasattr(signal, "pthread_kill") or threading.current_thread() is not threading.main_thread():
        return
    if _threads.green():
        return  # the watch blocks in os.read: a greenlet there would block the hub (see _threads)
    if any(forks_in_c() for forks_in_c in tuple(_FORKS_IN_C)):
        # uWSGI forks in C, without Python's fork hooks: its workers would share this pipe, and
        # their signals would read as ours. (No thread may run in a uWSGI master anyway: _uwsgi.)
        return
    inherited = _watch_pipe  # a forked child's copy of its parent's pipe (the parent keeps using it)
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except (ValueError, OSError):
        _close(read_end, write_end)
        return
    if previous != -1 and (inherited is None or previous != inherited[1]):
        signal.set_wakeup_fd(previous)  # someone else's: theirs stays
        _close(read_end, write_end)
        return
    if inherited is not None:
        _close(*inherited)
    _watch_pipe = (read_end, write_end)
    main = threading.main_thread().ident
    try:
        start_quiet(threading.Thread(target=_watch, args=(read_end, main), name="odp-ext-sigterm-watch",
                                     daemon=True))
    except RuntimeError:  # no new threads (the interpreter is exiting): Python's usual behaviour
        _unwatch_sigterm()


def _unwatch_sigterm() -> None:
    global _watch_pipe
    pipe, _watch_pipe = _watch_pipe, None
    if pipe is None:
        return
    try:
        current = signal.set_wakeup_fd(-1)
        if current not in (pipe[1], -1):
            signal.set_wakeup_fd(current)  # replaced by someone else since: theirs stays
    except (ValueError, OSError):
        pass  # not on the main thread: Python keeps writing to a closed fd, which it tolerates
    _close(*pipe)  # the watch thread's read ends


def _watch(read_end: int, main: Optional[int]) -> None:
    resent = 0  # SIGTERMs this thread sent: the C handler writes a byte for each of those too
    while True:
        try:
            received = os.read(read_end, 512)
        except OSError:
            return  # closed: unwatched
        if not received:
            return
        caught = received.count(signal.SIGTERM)
        ours = min(caught, resent)
        resent -= ours
        if caught == ours:
            continue  # nothing new, or only the echoes of our own re-sends
        for _ in range(_WATCH_RETRIES):
            if _sigterm_started.wait(_WATCH_GRACE) or main is None:
                break  # our handler started
            if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
                break  # no longer ours to run
            try:
                signal.pthread_kill(main, signal.SIGTERM)
            except (OSError, ValueError):
                break
            resent += 1


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
