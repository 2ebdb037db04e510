"""Celery glue: a prefork child delivers its queue in ``worker_process_shutdown``.

Billiard ends a prefork child (recycled by ``--max-tasks-per-child``, or stopped at warm shutdown)
with ``os._exit()`` right after Celery's ``worker_process_shutdown`` signal: neither ``atexit`` nor
``multiprocessing``'s or billiard's finalizers run there, so that signal is the child's last hook.
Its receiver closes every live manager of the child (:func:`._lifecycle.close_all`, bounded by the
largest ``close_timeout``).

The ``solo`` and ``threads`` pools run tasks in the worker's own process, which exits through the
interpreter: the ``atexit`` hook delivers there. ``worker_shutdown`` is deliberately not used: it is
also sent when an embedded worker (``celery.contrib.testing.worker.start_worker``) stops inside a
process that goes on running, where closing every client would discard its later events.

Celery stays optional: this module imports it only when the application already has (``celery``
in ``sys.modules``), which every Celery worker process has by the time it registers a manager or
forks a child.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from . import _lifecycle

_log = logging.getLogger(__name__)

_DISPATCH_UID = "optimizely_odp_ext.close_all"
_connected = threading.Event()  # set once per process; inherited across fork with the connection
_connect_lock = threading.Lock()


def connect_if_loaded() -> bool:
    """Connects the ``worker_process_shutdown`` receiver once per process, if Celery is imported.

    Cheap when already connected or when Celery is absent (a flag, a dict lookup); called at every
    manager registration and in every forked child. The connection is inherited across ``fork``, so a
    worker that registered a manager before forking its pool has it in every child.

    Returns:
        True when the receiver is connected.
    """
    if _connected.is_set() or "celery" not in sys.modules:
        return _connected.is_set()
    with _connect_lock:
        if _connected.is_set():
            return True
        try:
            from celery import signals
        except Exception:  # a module named "celery" that is not Celery, or a broken install
            _log.debug("celery is imported but its signals are not available", exc_info=True)
            return False
        # weak=False: the receiver is a module-level function, kept for the life of the process.
        signals.worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False, dispatch_uid=_DISPATCH_UID)
        _connected.set()
        _log.debug("connected to celery's worker_process_shutdown")
        return True


def _on_worker_process_shutdown(*_args: Any, **_kwargs: Any) -> None:
    """In a prefork child about to ``os._exit()``: deliver what is queued (bounded by ``close_timeout``)."""
    _lifecycle.close_all(why="celery worker_process_shutdown")


_lifecycle.add_host(connect_if_loaded, after_fork=True)
