"""The spool hand-off (opt-in ``spool_dir``): a component that owns the manager's :class:`~.spool.Spool`,
the backlog an earlier process left in it, and the "spool is full" warning.

The worker writes each group of encoded events before they can be sent (:meth:`Spooling.append`) and
acknowledges each outcome (:meth:`Spooling.ack`); it reads the backlog first (:meth:`Spooling.recover`).
Callers only read :attr:`Spooling.disk` (whether events are written at all). Without ``spool_dir``, or
once writing failed, ``disk`` is None and delivery is memory-only.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Deque, Iterator, List, Optional, Tuple

from ._batch import Target
from ._caller_counts import _WARN_EVERY
from .event import Encoded
from .spool import Spool, open_spool
from .transport import events_url

_log = logging.getLogger(__name__)

Say = Callable[..., None]  # Tally.later: a log line said once the ledger is released


class Spooling:
    """The spool of one manager, its backlog, and what a full spool refused since the last warning.

    Args:
        logger: The client's logger (the lines themselves go through the tally's outbox).
        max_bytes: The ``spool_max_bytes`` option (for the warning).
    """

    __slots__ = ("_last_warning", "_logger", "_max_bytes", "_refused", "disk", "recovered", "recovery")

    def __init__(self, logger: Any, max_bytes: int) -> None:
        self._logger = logger
        self._max_bytes = max_bytes
        self.disk: Optional[Spool] = None  # None: memory-only delivery
        # Events left by an earlier process with this spool_dir, not read yet (None: none left).
        self.recovery: Optional[Iterator[Tuple[str, str, Encoded]]] = None
        self.reset()

    def reset(self) -> None:
        """What is counted per process: a child starts at zero."""
        self.recovered = 0  # events read from the backlog: accepted by this process
        self._last_warning = -_WARN_EVERY
        self._refused = 0  # dropped by a full spool since the last warning about it

    def open(self, directory: str, fsync: bool) -> bool:
        """Opens the spool. Returns True when an earlier process left events in it."""
        self.disk = open_spool(directory, fsync, self._max_bytes, self._logger)
        if self.disk is not None and self.disk.has_backlog():
            self.recovery = self.disk.recover()
        return self.recovery is not None

    def after_fork(self) -> None:
        """A forked child: the backlog stays the parent's; the files this process writes are its own."""
        self.recovery = None
        if self.disk is not None:
            self.disk.after_fork()

    def recover(self, ready: Deque[Tuple[Encoded, Target]], limit: int, say: Say) -> None:
        """Moves events of the backlog to ``ready`` until it holds ``limit`` (the worker, under the ledger)."""
        while self.recovery is not None and len(ready) < limit:
            try:
                host, key, encoded = next(self.recovery)
            except StopIteration:
                self.recovery = None
                break
            except Exception:
                _log.exception("reading the spool failed")
                say(self._logger.error,
                    "ODP spool: reading events left by an earlier process failed; skipping the rest.")
                self.recovery = None
                break
            encoded.seq = -1  # before everything of this process: flush() waits for these too
            self.recovered += 1
            ready.append((encoded, Target(host, key, events_url(host))))

    def append(self, group: List[Tuple[Target, Encoded]], say: Say) -> List[Encoded]:
        """Writes a group of events before any of them can be sent.

        Returns:
            The newest events of the group that a full spool refused (the caller drops them).
        """
        disk = self.disk
        assert disk is not None
        try:
            kept = disk.append([(target.host, target.key, encoded) for target, encoded in group])
        except Exception as exc:
            _log.exception("spool append failed")
            say(self._logger.error, f"ODP spool: writing failed ({exc.__class__.__name__}: {exc}); "
                                    "continuing with memory-only delivery.")
            self.disk = None
            return []
        refused = len(group) - kept
        if refused > 0:
            self._refused += refused
            now = time.monotonic()
            if now - self._last_warning >= _WARN_EVERY:  # like the queue's: at most one per _WARN_EVERY
                self._last_warning = now
                said, self._refused = self._refused, 0
                say(self._logger.warning, f"ODP spool is full (spool_max_bytes={self._max_bytes}); "
                                          f"dropped {said} new event(s) since the last warning.")
        return [encoded for _, encoded in group[kept:]]

    def ack(self, events: List[Encoded]) -> None:
        """An outcome was reached: the spool need not keep these any longer."""
        if self.disk is not None:
            try:
                self.disk.ack(events)
            except Exception:
                _log.exception("spool ack failed")

    def close(self) -> None:
        """The close finished: what is not acknowledged stays for the next start."""
        if self.disk is not None:
            try:
                self.disk.close()
            except Exception:
                _log.debug("spool close failed", exc_info=True)
