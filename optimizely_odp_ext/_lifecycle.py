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
import logging
import os
import threading
import time
import weakref
from typing import Any, List, Optional

from typing_extensions import Protocol

from . import _celery  # imports this module back; uses it only at call time

_log = logging.getLogger(__name__)


class Closable(Protocol):
    """What the lifecycle needs of an event manager."""

    options: Any

    @property
    def closed(self) -> bool: ...

    def begin_close(self, deadline: float) -> bool: ...

    def end_close(self, deadline: float) -> None: ...

    def _after_fork(self) -> None: ...


_MANAGERS: weakref.WeakSet[Any] = weakref.WeakSet()
_REGISTRY_LOCK = threading.Lock()


def register(manager: Closable) -> None:
    """Adds a manager to the process's registry (weakly: a dropped manager leaves by itself)."""
    with _REGISTRY_LOCK:
        _MANAGERS.add(manager)
    _celery.connect_if_loaded()  # Celery's prefork children end without atexit: see _celery


def unregister(manager: Closable) -> None:
    """Removes a manager (closed managers leave the registry)."""
    with _REGISTRY_LOCK:
        _MANAGERS.discard(manager)


def live_managers() -> List[Any]:
    """The managers not closed yet, in this process."""
    with _REGISTRY_LOCK:
        return list(_MANAGERS)


def close_all(timeout: Optional[float] = None, *, why: str = "exit", at_exit: bool = True) -> int:
    """Closes every live manager of this process concurrently, under one deadline.

    Each manager starts delivering at once (all in parallel), then each is waited for until the
    shared deadline. The whole call takes at most ``timeout`` (default: the largest
    ``close_timeout`` among the managers) plus a join margin.

    Args:
        timeout: The shared budget in seconds; None takes the largest ``close_timeout``.
        why: What ended the process (for the debug log).
        at_exit: True for exit paths: managers with ``flush_at_exit=False`` are left alone.

    Returns:
        How many managers were closed.
    """
    managers = [m for m in live_managers()
                if not m.closed and (not at_exit or getattr(m.options, "flush_at_exit", True))]
    if not managers:
        return 0
    budget = max(m.options.close_timeout for m in managers) if timeout is None else max(timeout, 0.0)
    deadline = time.monotonic() + budget
    _log.debug("closing %d ODP event manager(s) (%s), budget %.1f s", len(managers), why, budget)
    started = []
    for manager in managers:
        try:
            if manager.begin_close(deadline):
                started.append(manager)
        except Exception:  # one manager's failure never skips the others
            _log.exception("closing ODP event manager (%s) failed", why)
    for manager in started:
        try:
            manager.end_close(deadline)
        except Exception:
            _log.exception("closing ODP event manager (%s) failed", why)
    return len(started)


def _close_all_at_exit() -> None:
    close_all(why="interpreter exit")


# ----------------------------------------------------------------- fork

def _before_fork() -> None:
    # Held across the fork, released on both sides: the child never inherits it held by a thread
    # that does not exist there.
    _REGISTRY_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _REGISTRY_LOCK.release()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK  # noqa: PLW0603 - a fresh lock in the child, see _before_fork
    _REGISTRY_LOCK = threading.Lock()
    _celery.connect_if_loaded()  # a Celery worker imported celery after its managers registered
    for manager in list(_MANAGERS):
        try:
            manager._after_fork()
        except Exception:
            _log.exception("resetting ODP event manager after fork failed")


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
