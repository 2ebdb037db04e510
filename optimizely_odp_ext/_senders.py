"""The sender pool: ``max_in_flight`` threads that POST batches through the :class:`Transport`.

Senders touch no delivery state: they take a batch from ``_send_queue``, make one request and hand
``(batch, reply)`` back on ``_results`` for the worker, which decides what the reply means.
"""

from __future__ import annotations

import threading

from ._state import ManagerState
from ._threads import start_quiet
from .event import join
from .retry import NETWORK_ERROR
from .transport import Reply


class SenderPool(ManagerState):
    """Starts, feeds and stops the sender threads."""

    __slots__ = ()

    def _start_senders(self) -> None:
        for index in range(self.options.max_in_flight):
            sender = threading.Thread(target=self._send_loop, name=f"odp-ext-sender-{index}", daemon=True)
            start_quiet(sender)
            self._senders.append(sender)

    def _stop_senders(self) -> None:
        """Tells every sender to stop once the batches handed to it are sent (no waiting here)."""
        for _ in self._senders:
            self._send_queue.append(None)
            self._send_ready.release()

    def _send_loop(self) -> None:
        while True:
            self._send_ready.acquire()
            try:
                next_batch = self._send_queue.popleft()
            except IndexError:
                continue
            if next_batch is None:
                return
            batch = next_batch
            transport = self._transport
            if transport is None:
                reply = Reply(NETWORK_ERROR, None, "transport closed")
            else:
                try:
                    reply = transport.send(batch.target.url, batch.target.key, join(batch.events), self._timeout)
                except Exception as exc:  # a transport must not raise; if one does, it is a failed attempt
                    reply = Reply(NETWORK_ERROR, None, f"{exc.__class__.__name__}: {exc}")
            self._results.append((batch, reply))
            self._wake.set()
