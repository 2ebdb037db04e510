"""gunicorn glue: the master delivers its own queue while its workers stop, not after them.

On SIGTERM (and SIGINT, SIGQUIT) gunicorn's master runs ``Arbiter.stop()``: it signals its workers
and waits for them (up to ``graceful_timeout``), and only then exits the interpreter. Each worker
delivers its queue at its own interpreter exit, within ``close_timeout``; left alone, the master's
``atexit`` hook would spend its own ``close_timeout`` *after* theirs, so with ODP not answering the
server took twice ``close_timeout`` to stop -- past gunicorn's 30 s ``graceful_timeout`` and
Kubernetes' 30 s grace period with the defaults.

So in the master (an app loaded with ``--preload`` creates its clients there), ``Arbiter.stop`` is
wrapped once per process: it starts :func:`._lifecycle.close_all` on a helper thread *before*
gunicorn signals its workers, and joins it after they are gone. The master's delivery overlaps the
workers' under one deadline (now + the largest ``close_timeout``, capped by gunicorn's
``graceful_timeout``, at which gunicorn kills the workers still running), and its ``atexit`` hook
finds nothing left. Without ``--preload`` the master has no clients: nothing is patched there.

gunicorn stays optional: this module imports it only when the application already has
(``gunicorn.arbiter`` in ``sys.modules``), which a gunicorn master has before it loads the app.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional

from . import _lifecycle
from ._threads import start_quiet

_log = logging.getLogger(__name__)

_APPLIED = "_optimizely_odp_ext_applied"  # tags our wrapper, so a second connect never wraps it twice
_connected = threading.Event()  # set once per process; a forked worker inherits it with the wrapper
_connect_lock = threading.Lock()


def connect_if_loaded() -> bool:
    """Wraps ``gunicorn.arbiter.Arbiter.stop`` once per process, if gunicorn is imported.

    Cheap when already done or when gunicorn is absent (a flag, a dict lookup): called at every
    manager registration.

    Returns:
        True when ``Arbiter.stop`` is wrapped.
    """
    if _connected.is_set() or "gunicorn.arbiter" not in sys.modules:
        return _connected.is_set()
    with _connect_lock:
        if _connected.is_set():
            return True
        arbiter = getattr(sys.modules.get("gunicorn.arbiter"), "Arbiter", None)
        stop = getattr(arbiter, "stop", None)
        if arbiter is None or not callable(stop):  # a module of that name that is not gunicorn's
            _log.debug("gunicorn.arbiter is imported but has no Arbiter.stop")
            return False
        if not getattr(stop, _APPLIED, False):
            arbiter.stop = _wrap_stop(stop)
        _connected.set()
        _log.debug("wrapped gunicorn's Arbiter.stop")
        return True


def _wrap_stop(stop: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(stop)
    def stop_delivering(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Only the master stops workers; a worker (a fork of it) never calls this, but if it did,
        # its own exit path delivers its queue.
        if getattr(self, "pid", None) != os.getpid():
            return stop(self, *args, **kwargs)
        # Started before gunicorn signals its workers, joined after it has waited for them. A thread,
        # not the master's own: gunicorn's wait for its workers runs on the main thread.
        closer: Optional[threading.Thread] = None
        try:
            closer = threading.Thread(target=_close_all, args=(_budget(self),), name="odp-ext-gunicorn-stop",
                                      daemon=True)
            start_quiet(closer)
        except Exception:  # never into gunicorn's stop: the master's atexit hook delivers instead
            _log.exception("could not start delivering ODP events at gunicorn's stop")
            closer = None
        try:
            return stop(self, *args, **kwargs)
        finally:
            if closer is not None:
                closer.join()  # close_all is bounded by its budget (plus its join margin)

    setattr(stop_delivering, _APPLIED, True)
    return stop_delivering


def _budget(arbiter: Any) -> Optional[float]:
    """gunicorn's ``graceful_timeout`` when it is below the largest ``close_timeout``, else None.

    gunicorn kills the workers still running at ``graceful_timeout``: the master does not outlast
    the stop it promises either. None lets :func:`._lifecycle.close_all` take the largest
    ``close_timeout``, as at any exit.
    """
    graceful = getattr(getattr(arbiter, "cfg", None), "graceful_timeout", None)
    largest = max((m.options.close_timeout for m in _lifecycle.live_managers()), default=0.0)
    if isinstance(graceful, (int, float)) and graceful < largest:
        return float(graceful)
    return None


def _close_all(budget: Optional[float]) -> None:
    try:
        _lifecycle.close_all(budget, why="gunicorn master stop")
    except Exception:  # never into gunicorn's shutdown
        _log.exception("delivering ODP events at gunicorn's stop failed")


_lifecycle.add_host(connect_if_loaded)
