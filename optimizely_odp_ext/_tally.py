"""The outcome counters of one manager, and what is to be said about each outcome.

A component that owns its state: every outcome goes through one of its methods, by the party that
takes the events from their owner, under the ledger's lock (``Ledger.lock``, see _ledger). What is to
be said (``on_outcome`` calls, log lines) waits in its outbox until the ledger is released: the
holder takes the outbox (:meth:`Tally.take`) under the ledger and says it (:meth:`Tally.say_all`)
after, so a slow, raising or re-entrant callback, or a blocking log handler, changes timing, never
counts.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ._stats import DROP_REASONS
from .event import Encoded, Pending
from .settings import OutcomeCallback

_log = logging.getLogger(__name__)

Outbox = List[Tuple[Callable[..., Any], Tuple[Any, ...]]]


class Tally:
    """Delivered, dropped (by reason) and kept-in-the-spool events; requests and retries.

    Args:
        on_outcome: The user's callback, or None.
        logger: Where user-facing lines go.
    """

    __slots__ = ("_failures", "_failures_lock", "_logger", "_on_outcome", "_outbox", "delivered", "dropped",
                 "left_in_spool", "requests", "retries")

    def __init__(self, on_outcome: Optional[OutcomeCallback], logger: Any) -> None:
        self._on_outcome = on_outcome
        self._logger = logger
        self._outbox: Outbox = []
        self._failures = 0  # on_outcome raised this often (any thread that says the outbox)
        self._failures_lock = threading.Lock()
        self.delivered = 0
        self.dropped: Dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.left_in_spool = 0  # kept in the spool at close: the next process with it sends them
        self.requests = 0
        self.retries = 0

    def remake(self) -> None:
        """Green primitives for a process patched since (see ManagerState._remake_primitives)."""
        self._failures_lock = threading.Lock()

    def deliver(self, events: List[Encoded], detail: str) -> None:
        self.delivered += len(events)
        self.report("delivered", events, detail)

    def drop(self, events: Sequence[Union[Encoded, Pending]], reason: str, line: Optional[str],
             detail: Optional[str] = None) -> None:
        """Counts ``events`` as dropped for ``reason``; ``line`` (if any) is logged as an error."""
        self.dropped[reason] += len(events)
        if line:
            self.later(self._logger.error, line)
        self.report(reason, events, detail or line or reason)

    def keep_in_spool(self, events: List[Encoded], detail: str) -> None:
        self.left_in_spool += len(events)
        self.report("left_in_spool", events, detail)

    def later(self, say: Callable[..., Any], *args: Any) -> None:
        """Says something (a log line) once the ledger is released, in order with the reports."""
        self._outbox.append((say, args))

    def report(self, outcome: str, events: Sequence[Union[Encoded, Pending]], detail: str) -> None:
        """Reports ``events`` to ``on_outcome`` (once the ledger is released)."""
        if self._on_outcome is not None and events:
            self._outbox.append((self._call_on_outcome, (outcome, list(events), detail)))

    def take(self) -> Outbox:
        """What is to be said; taken under the ledger, said after it (:meth:`say_all`)."""
        outbox = self._outbox
        if outbox:
            self._outbox = []
        return outbox

    @staticmethod
    def say_all(outbox: Outbox) -> None:
        for say, args in outbox:
            try:
                say(*args)
            except Exception:  # a logging handler that raises: its line is lost, nothing else
                _log.debug("saying %r failed", say, exc_info=True)

    def _call_on_outcome(self, outcome: str, events: List[Union[Encoded, Pending]], detail: str) -> None:
        """Calls ``on_outcome(outcome, events, detail)``; an exception in it is logged once and contained."""
        callback = self._on_outcome
        if callback is None:
            return
        try:
            callback(outcome, [_as_dict(e) for e in events], detail)
        except Exception as exc:
            with self._failures_lock:
                self._failures += 1
                first = self._failures == 1
            if first:
                _log.debug("on_outcome raised", exc_info=True)
                self._logger.error(f"ODP on_outcome callback raised {exc.__class__.__name__}: {str(exc)[:200]} "
                                   "(logged once; delivery goes on).")


def _as_dict(event: Union[Encoded, Pending]) -> Dict[str, Any]:
    """One event as on_outcome gets it: type, action, identifiers, data (with idempotence_id)."""
    if isinstance(event, Encoded):
        body: Dict[str, Any] = json.loads(event.body)
        body["idempotence_id"] = event.idempotence_id
        return body
    type_, action, identifiers, data = event
    idempotence_id = data.get("idempotence_id") if data else None
    return {"type": type_, "action": action, "identifiers": dict(identifiers), "data": dict(data or {}),
            "idempotence_id": idempotence_id}


def reasons(dropped: Dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.items() if count)
