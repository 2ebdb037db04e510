"""uWSGI glue: no threads in a process uWSGI will fork; its events go to exactly one worker.

Without ``--lazy-apps`` uWSGI loads the app in the master (or, without ``--master``, in the process
that becomes worker 1), then forks the workers in C: Python's fork hooks do not run (unless
``--py-call-uwsgi-fork-hooks``), and the master releases the GIL before forking, so any Python thread
of the master runs while it forks. A worker forked while such a thread held the GIL (or a lock of
ours, or of ``requests``) blocks forever on a lock whose owner does not exist in it: measured with
the plugin's threads started by events sent at import, 4 of 40 boots had a worker that never
answered. And the master never runs Python at exit (``uwsgi_plugins_atexit`` skips the master), so
events it still held were lost.

So in such a process (``uwsgi.worker_id() == 0`` in the master or the loading process) the managers
start no thread: events sent there stay queued (:meth:`.EventManager._start` defers). Before the
first fork, :func:`prepare` makes a one-byte token in a pipe that every process uWSGI forks
inherits. In each worker, uWSGI's ``post_fork_hook`` (or the first send, or Python's fork hooks
with ``--py-call-uwsgi-fork-hooks``) resets the managers; the first worker to read the byte keeps
the held events and delivers them with threads of its own, the others (and workers respawned
later, mules, spoolers) start empty with zero counts. Exactly one process delivers them: a pipe
read of one byte succeeds in one process only.

uWSGI stays optional: the ``uwsgi`` module exists only inside a uWSGI process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional, Tuple

from . import _lifecycle

_log = logging.getLogger(__name__)

_lock = threading.Lock()
_token: Optional[Tuple[int, int]] = None  # the pipe holding the hand-over byte (read end, write end)
_token_pid = 0  # the process that made it (the one uWSGI forks from)
_decided: Optional[Tuple[int, bool]] = None  # (pid, whether this process took the held events)
_hooked = False


def _module() -> Any:
    return sys.modules.get("uwsgi")


def _call(uwsgi: Any, name: str) -> Any:
    function = getattr(uwsgi, name, None)
    return function() if callable(function) else 0


def hosted() -> bool:
    """Whether this process runs under uWSGI, which forks in C: Python's fork hooks do not run there."""
    return "uwsgi" in sys.modules


def forks_later() -> bool:
    """Whether this process is one uWSGI forks its workers from: its master, or without ``--master``
    the process loading the app before it becomes worker 1. Starting threads there is not safe."""
    uwsgi = _module()
    if uwsgi is None or not callable(getattr(uwsgi, "worker_id", None)):
        return False
    try:
        return _call(uwsgi, "worker_id") == 0 and _call(uwsgi, "mule_id") == 0 and \
            _call(uwsgi, "masterpid") in (0, os.getpid())
    except Exception:  # a module named "uwsgi" that is not uWSGI's
        _log.debug("uwsgi is imported but its API did not answer", exc_info=True)
        return False


def prepare(logger: Any) -> None:
    """In a process that forks later: the hand-over token and the post-fork hook (once per process);
    one error on ``logger`` when other threads run here and uWSGI will not take the GIL to fork."""
    global _token, _token_pid, _hooked  # noqa: PLW0603 - process-wide, once
    with _lock:
        if not _hooked:
            _check_threads(logger)
        if _token is None or _token_pid != os.getpid():
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.write(write_end, b"\x01")
            _token, _token_pid = (read_end, write_end), os.getpid()
        if not _hooked:
            _hooked = True
            _hook_post_fork()


# Not reported: the SDK's decision-event thread (BatchEventProcessor) sleeps on its queue for its 30 s
# flush interval, idle when uWSGI forks at boot (20 of 20 boots fine with it); the SDK's ODP thread
# is stopped at install here (see _sdk_bridge.attach).
_IDLE_SDK_THREADS = frozenset({"EventThread", "OdpThread"})


def _check_threads(logger: Any) -> None:
    """Threads the plugin does not own, running while uWSGI forks in C: only uWSGI can make that safe."""
    options = getattr(_module(), "opt", None)
    if not isinstance(options, dict) or "py-call-uwsgi-fork-hooks" in options:
        return  # uWSGI takes the GIL and runs Python's fork hooks around each fork
    main = threading.main_thread()
    others = sorted(thread.name for thread in threading.enumerate()
                    if thread is not main and thread.is_alive() and thread.name not in _IDLE_SDK_THREADS
                    and not thread.name.startswith("odp-ext-"))
    if others:
        logger.error(f"uWSGI forks its workers from this process while other Python threads run here "
                     f"({', '.join(others)}): a worker forked while one of them holds a lock hangs forever. "
                     "Add --py-call-uwsgi-fork-hooks to the uWSGI command line (py-call-uwsgi-fork-hooks = true "
                     "in its ini), or load the app in each worker with --lazy-apps.")


def _hook_post_fork() -> None:
    uwsgi = _module()
    decorators = sys.modules.get("uwsgidecorators")
    chain = getattr(decorators, "postfork_chain", None)
    if isinstance(chain, list) and getattr(uwsgi, "post_fork_hook", None) is getattr(
            decorators, "postfork_chain_hook", None):
        chain.append(_post_fork)  # the application's @postfork functions keep running
        return
    previous: Optional[Callable[[], Any]] = getattr(uwsgi, "post_fork_hook", None)

    def post_fork_hook() -> None:
        if previous is not None:
            previous()
        _post_fork()

    uwsgi.post_fork_hook = post_fork_hook


def _post_fork() -> None:
    """In every process uWSGI starts (workers, mules, spoolers), before it serves anything."""
    for manager in _lifecycle.all_managers():
        try:
            manager._uwsgi_started()
        except Exception:  # never into uWSGI's start-up
            _log.exception("preparing ODP event manager in a uWSGI process failed")


def take_held_events() -> Optional[bool]:
    """In a process forked from one that held events: whether this process delivers them.

    Returns:
        True in the one worker that reads the token, False in every other process uWSGI starts,
        None while this is not known yet: in the master itself, or in a worker whose fork hooks run
        (``--py-call-uwsgi-fork-hooks``) before uWSGI has set its worker id.
    """
    global _decided  # noqa: PLW0603 - one answer per process, for all its managers
    pid = os.getpid()
    with _lock:
        if _decided is not None and _decided[0] == pid:
            return _decided[1]
        uwsgi = _module()
        if uwsgi is None or _token is None:
            return True  # not under uWSGI after all: the events are this process's
        try:
            worker = _call(uwsgi, "worker_id")
            other = _call(uwsgi, "mule_id") != 0 or bool(_call(uwsgi, "i_am_the_spooler"))
        except Exception:
            worker, other = 0, True
        if worker == 0 and not other:
            return None
        taken = False
        if worker > 0:
            try:
                taken = os.read(_token[0], 1) == b"\x01"
            except OSError:  # EAGAIN: another worker took it
                taken = False
        _decided = (pid, taken)
        if pid != _token_pid:
            _forget_token()
        return taken


def _forget_token() -> None:
    """Closes this process's copies of the token pipe (the master keeps its own)."""
    global _token  # noqa: PLW0603
    if _token is not None:
        for fd in _token:
            with contextlib.suppress(OSError):
                os.close(fd)
        _token = None


_lifecycle.add_host(forks_in_c=hosted)
