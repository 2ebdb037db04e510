"""The sender pool: ``max_in_flight`` threads that POST batches through the :class:`Transport`.

A component that owns its state: the worker hands a batch over with :meth:`Senders.submit` and takes
``(batch, reply)`` back with :meth:`Senders.take`; it never reads the pool's insides. Senders touch
no delivery state: they make one request per batch, and the worker decides what the reply means.
The hand-offs between the threads are the two deques below, a semaphore and the worker's wake-up.

How many of the handed-over batches are on the wire at once is the adaptive limit's
(:mod:`._concurrency`): it starts at ``INITIAL_IN_FLIGHT`` (4), doubles per round trip while round
trips stay flat and the senders want more (slow start), then grows by one per round trip; it is cut
on push-back (429, 5xx, 408, timeouts, network errors) or rising round trips, and never passes
``max_in_flight``. Sender threads are started as the limit grows (one per batch handed over while
every thread has one), so an idle or fast link keeps four. A sender with a batch waits for a slot (a
condition, each wait bounded) before it sends.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from ._batch import _Batch
from ._concurrency import AdaptiveConcurrency
from ._threads import Wake, start_quiet
from .event import join
from .retry import NETWORK_ERROR
from .settings import Options
from .transport import Reply, Transport

_log = logging.getLogger(__name__)

# Requests in flight (and sender threads) to start with: the adaptive limit grows from here, doubling
# per round trip while round trips stay flat, up to max_in_flight.
INITIAL_IN_FLIGHT = 4


class Senders:
    """The sender threads of one manager, in one process, and the batches they hold.

    Args:
        options: The manager's options (``max_in_flight``, the timeouts).
        transport_factory: Builds the transport when the threads start.
        wake: Set after each reply, to wake the worker.
    """

    __slots__ = ("_batches", "_control", "_factory", "_flying", "_options", "_ready", "_replies", "_slot",
                 "_threads", "_timeout", "_transport", "_wake", "events")

    def __init__(self, options: Options, transport_factory: Callable[[Options], Transport], wake: Wake) -> None:
        self._options = options
        self._factory = transport_factory
        self._wake = wake
        self._timeout = (options.connect_timeout, options.request_timeout)
        self._threads: List[threading.Thread] = []
        self._transport: Optional[Transport] = None
        # Worker -> senders (None: stop) and back: the only hand-offs between those threads.
        self._batches: Deque[Optional[_Batch]] = collections.deque()
        self._ready = threading.Semaphore(0)
        self._replies: Deque[Tuple[_Batch, Reply]] = collections.deque()
        # Which of the senders holding a batch may send now; waiters are woken on every reply.
        self._control = self._new_control()
        self._slot = threading.Condition()
        # Written by the worker (or the close's finisher) under the ledger only.
        self._flying: Dict[int, _Batch] = {}  # handed over, reply not taken yet
        self.events = 0  # events in those batches

    def remake(self, wake: Wake) -> None:
        """Green primitives for a process patched since (see ManagerState._remake_primitives)."""
        if self._threads:
            return  # started: in use (never the case: _start() remakes before it starts them)
        self._wake = wake
        self._ready = threading.Semaphore(0)
        self._slot = threading.Condition()
        self._control = self._new_control()  # its lock too

    def _new_control(self) -> AdaptiveConcurrency:
        ceiling = self._options.max_in_flight
        return AdaptiveConcurrency(ceiling=ceiling, initial=min(INITIAL_IN_FLIGHT, ceiling), slow_start=True)

    def start(self) -> None:
        """Builds the transport and starts the first threads (the caller holds the manager's start lock).
        Once: a second call (the worker could not start, the next event tries again) does nothing."""
        if self._threads:
            return
        self._transport = self._factory(self._options)
        for _ in range(self._control.limit):
            self._add_thread()

    def _add_thread(self) -> None:
        sender = threading.Thread(target=self._send_loop, name=f"odp-ext-sender-{len(self._threads)}", daemon=True)
        start_quiet(sender)
        self._threads.append(sender)

    def stop(self) -> None:
        """Tells every sender to stop once the batches handed to it are sent (no waiting here), and
        closes the transport (a request in flight fails and its sender ends)."""
        for _ in self._threads:
            self._batches.append(None)
            self._ready.release()
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.close()
            except Exception:  # closing is best effort
                _log.debug("transport close failed", exc_info=True)

    def submit(self, batch: _Batch) -> None:
        """Hands ``batch`` to the next free sender."""
        self._flying[id(batch)] = batch
        self.events += len(batch.events)
        self._batches.append(batch)
        self._ready.release()
        self._grow()

    def _grow(self) -> None:
        """One more thread when every thread has a batch and the adaptive limit has grown past them
        (never past max_in_flight): an idle link costs INITIAL_IN_FLIGHT threads, a slow busy one more.
        On the worker (at each hand-over and each reply taken)."""
        threads = len(self._threads)
        if threads < self._control.limit and len(self._flying) > threads and self._transport is not None:
            try:
                self._add_thread()
            except RuntimeError:  # can't start new thread: the ones running carry on
                _log.debug("could not start another sender thread", exc_info=True)

    def take(self) -> Optional[Tuple[_Batch, Reply]]:
        """The next ``(batch, reply)`` a sender handed back, or None."""
        try:
            batch, reply = self._replies.popleft()
        except IndexError:
            return None
        if self._flying.pop(id(batch), None) is not None:
            self.events -= len(batch.events)
        self._grow()
        return batch, reply

    def in_flight(self) -> int:
        """Batches handed over whose reply was not taken yet."""
        return len(self._flying)

    def limit(self) -> int:
        """How many requests may be on the wire now (the adaptive limit, at most ``max_in_flight``)."""
        return self._control.limit

    def let_go(self) -> List[_Batch]:
        """At close: the batches still in flight, no longer ours (a reply to them is never taken)."""
        flying = list(self._flying.values())
        self._flying.clear()
        self.events = 0
        return flying

    def _send_loop(self) -> None:
        while True:
            self._ready.acquire()
            try:
                next_batch = self._batches.popleft()
            except IndexError:
                continue
            if next_batch is None:
                return
            batch = next_batch
            self._replies.append((batch, self._send(batch)))
            self._wake.set()

    def _send(self, batch: _Batch) -> Reply:
        """One request for ``batch``, once the adaptive limit has a slot for it."""
        slot = self._slot
        with slot:
            # Bounded: a slot frees when another sender's request ends (its timeouts bound it); past
            # this many waits the batch goes anyway, as it would have before the limit existed.
            for _ in range(int((self._timeout[0] + self._timeout[1]) * 20) + 1):
                if self._control.try_acquire():
                    acquired = True
                    break
                slot.wait(0.05)
            else:
                acquired = False
        started = time.monotonic()
        transport = self._transport
        if transport is None:
            reply = Reply(NETWORK_ERROR, None, "transport closed")
        else:
            try:
                reply = transport.send(batch.target.url, batch.target.key, join(batch.events), self._timeout)
            except Exception as exc:  # a transport must not raise; if one does, it is a failed attempt
                reply = Reply(NETWORK_ERROR, None, f"{exc.__class__.__name__}: {exc}")
        if acquired:
            # A closed transport is no news about the link: its slot is given back without a verdict.
            self._control.release(time.monotonic() - started if transport is not None else None,
                                  reply.status if transport is not None else 202)
            with slot:
                slot.notify()
        return reply
