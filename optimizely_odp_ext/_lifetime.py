"""The lifetime of one manager in one process: a component that owns its process id, its worker
thread and the steps of its close, each step taken once.

Who writes what: ``closed`` once, by the first ``close()`` (under :attr:`Lifetime.lock`); ``closing``
and the deadline by that close; ``close_seen`` by the worker; ``finished`` once, by the close's one
finisher (under the lock); ``worker`` by whoever starts it (under the start lock); ``held_for_fork``
cleared once, when uWSGI's worker decides what the held events become. Everyone reads them
without a lock: each is one atomic read, and each only ever goes one way in a process.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from . import _threads, _uwsgi


class Lifetime:
    """One manager's process, worker thread and close (see the module docstring for who writes what).

    Args:
        held_for_fork: A process uWSGI forks its workers from: no thread starts here, events are held
            for one worker to deliver (see _uwsgi).
    """

    __slots__ = ("close_deadline", "close_seen", "closed", "closing", "ended", "finished", "forks_in_c", "green",
                 "held_for_fork", "lock", "pid", "start_lock", "summary", "worker")

    def __init__(self, held_for_fork: bool) -> None:
        # Re-entrant: the SIGTERM opt-in closes managers from a signal handler, which runs on the main
        # thread, possibly while that thread is inside one of these sections.
        self.lock = threading.RLock()
        self.closed = False
        self.held_for_fork = held_for_fork
        self.reset()

    def reset(self) -> None:
        """What belongs to one process (a child's manager starts again with its own)."""
        self.pid = os.getpid()
        self.forks_in_c = _uwsgi.hosted()
        self.worker: Optional[threading.Thread] = None
        self.closing = False
        self.close_deadline = 0.0
        self.close_seen = False  # the worker's: it cut the retry waits short for the close
        self.finished = False
        # The worker's loop has returned (its last step done): what a close waits for. Its thread's
        # end is not: gevent reported one as alive for seconds after (see EventManager._join).
        self.ended = False
        # The close's summary line: said once, by the closing thread when one waits for the worker
        # (the worker may be stuck behind a log handler that very thread holds), else by the finisher.
        # None: nobody waits; True: a closing thread waits; False: said.
        self.summary: Optional[bool] = None
        self.remake()

    def remake(self) -> None:
        """The start lock, of this process's threading world now (real, or green: see _threads)."""
        self.green = _threads.green()
        self.start_lock = threading.Lock()

    def after_fork(self) -> None:
        """In a forked child (then :meth:`reset` follows): another thread may have held the lock at fork time."""
        self.lock = threading.RLock()

    def close(self) -> bool:
        """Marks the manager closed. Returns False when it already was."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            return True

    def begin_closing(self, deadline: float) -> None:
        """The worker delivers what it can until ``deadline`` (a monotonic time), then finishes."""
        self.close_deadline = deadline
        self.closing = True

    def finish(self) -> bool:
        """Marks the close finished. Returns True for the one caller that finished it."""
        with self.lock:
            if self.finished:
                return False  # once: the worker and a closing thread may both get here
            self.finished = True
            return True

    def wait_to_summarize(self) -> None:
        """A closing thread waits for the worker: it says the summary line once the worker is done."""
        with self.lock:
            if self.summary is None:
                self.summary = True

    def stop_waiting_to_summarize(self) -> None:
        """The closing thread gave up waiting: the finisher says the summary line, when it finishes."""
        with self.lock:
            if self.summary:
                self.summary = None

    def take_summary(self) -> bool:
        """Returns True once, for whoever is to say the summary line now that the close finished."""
        with self.lock:
            if self.summary is False or not self.finished:
                return False
            self.summary = False
            return True
