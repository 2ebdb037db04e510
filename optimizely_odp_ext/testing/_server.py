"""`FakeOdpServer`: its records, its faults (`_Faults`), and starting and stopping it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import socket
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any, Callable, Deque, Iterable, Optional, Tuple

from .._threads import start_quiet
from ._handler import _Server
from ._records import Event, EventPredicate, RecordedRequest

_STOP_GRACE = 2.0  # seconds stop() waits for handler threads to close their sockets

def _check_status(status: int) -> None:
    if not 200 <= status <= 599:
        raise ValueError(f"status must be between 200 and 599, got {status}")


def _check_seconds(name: str, seconds: float) -> None:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")


class _Faults:
    """The faults a :class:`FakeOdpServer` injects, and how far each has gone. Guarded by the server's
    condition: every method is called with it held."""

    __slots__ = ("fail_queue", "fail_window", "hang_queue", "latency", "reject", "reset_counter", "reset_every")

    def __init__(self) -> None:
        self.fail_queue: Deque[Tuple[int, Optional[str]]] = deque()
        self.hang_queue: Deque[Optional[float]] = deque()
        self.clear()

    def clear(self) -> None:
        self.latency = 0.0
        self.fail_queue.clear()
        self.fail_window: tuple[float, int, str | None] | None = None
        self.reset_every: int | None = None
        self.reset_counter = 0
        self.hang_queue.clear()
        self.reject: EventPredicate | None = None

    def begin_request(self) -> tuple[bool, bool, float | None, float]:
        """Apply the per-request faults: (reset?, hang?, hang seconds, latency)."""
        if self.reset_every is not None:
            self.reset_counter += 1
            if self.reset_counter % self.reset_every == 0:
                return True, False, None, 0.0
        if self.hang_queue:
            return False, True, self.hang_queue.popleft(), 0.0
        return False, False, None, self.latency

    def take_failure(self) -> tuple[int, str | None] | None:
        if self.fail_queue:
            return self.fail_queue.popleft()
        if self.fail_window is not None:
            until, status, retry_after = self.fail_window
            if time.monotonic() < until:
                return status, retry_after
            self.fail_window = None
        return None


class FakeOdpServer:
    """An in-process fake of the ODP events endpoint, for tests.

    Start it with :meth:`start` or a ``with`` block, point the client at :attr:`url`, and
    inspect :attr:`events` / :attr:`requests` afterwards. All observation and fault methods
    are thread-safe and may be called while requests are in flight.

    Args:
        api_key: The key tests are meant to use (available as :attr:`api_key`).
        host: Interface to bind (``"::1"`` for IPv6).
        port: Port to bind; 0 picks a free one.
        accepted_keys: Every ``x-api-key`` the server accepts; defaults to ``{api_key}``.
            An empty iterable makes every request a 401.
        max_body_bytes: Requests whose body (as sent, before gzip decoding) is larger than
            this get 413. ``None``: no limit.
    """

    def __init__(
        self,
        api_key: str = "test-odp-key",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        accepted_keys: Iterable[str] | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        if max_body_bytes is not None and max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {max_body_bytes}")
        self._api_key = api_key
        self._host = host
        self._requested_port = port
        self._accepted_keys = frozenset(accepted_keys) if accepted_keys is not None else frozenset({api_key})
        self._max_body_bytes = max_body_bytes

        self._cond = threading.Condition()
        self._stop_event = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

        # Records (guarded by _cond).
        self._requests: list[RecordedRequest] = []
        self._events: list[tuple[str, Event]] = []
        self._connection_count = 0
        self._next_connection_id = 0
        self._open: dict[socket.socket, int] = {}

        self._faults = _Faults()  # guarded by _cond

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeOdpServer:
        """Bind the port and start serving in a background thread.

        Returns:
            The server itself, so ``server = FakeOdpServer().start()`` works.

        Raises:
            RuntimeError: If the server was already stopped (servers are single-use).
        """
        with self._cond:
            if self._stopped:
                raise RuntimeError("FakeOdpServer cannot be restarted after stop(); create a new one")
            if self._server is not None:
                return self
            server = _Server((self._host, self._requested_port), self)
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.01},
                name=f"FakeOdpServer:{server.server_address[1]}",
                daemon=True,
            )
            start_quiet(self._thread)
        return self

    def stop(self) -> None:
        """Stop serving and close every socket. Idempotent and quick.

        Hung requests and delayed answers are released at once (their clients see the
        connection close without an answer), open keep-alive connections are shut down,
        and the listening socket is closed. Waits at most about two seconds for handler
        threads to finish.
        """
        with self._cond:
            if self._server is None or self._stopped:
                return
            self._stopped = True
            server = self._server
            thread = self._thread
        self._stop_event.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(_STOP_GRACE)
        with self._cond:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._cond.wait_for(lambda: not self._open, _STOP_GRACE)

    def __enter__(self) -> FakeOdpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self._server is not None else "not started")
        where = self.url if self._server is not None else f"{self._host}:{self._requested_port}"
        return f"<FakeOdpServer {where} {state}>"

    # -- configuration ----------------------------------------------------------------------

    @property
    def api_key(self) -> str:
        """The key tests are meant to send (the ``api_key`` argument)."""
        return self._api_key

    @property
    def accepted_keys(self) -> frozenset[str]:
        """Every ``x-api-key`` value the server accepts."""
        return self._accepted_keys

    @property
    def max_body_bytes(self) -> int | None:
        """The body size above which requests get 413, or ``None``."""
        return self._max_body_bytes

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: If the server was created with ``port=0`` and not started yet.
        """
        if self._server is not None:
            return int(self._server.server_address[1])
        if self._requested_port:
            return self._requested_port
        raise RuntimeError("the port is chosen by start(); start the server first")

    @property
    def url(self) -> str:
        """Base URL for the client's ODP host setting, e.g. ``http://127.0.0.1:54321``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    # -- observation ------------------------------------------------------------------------

    @property
    def events(self) -> list[dict[str, Any]]:
        """Copies of every accepted event, in arrival order."""
        with self._cond:
            return [copy.deepcopy(event) for _, event in self._events]

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (accepted, refused, failed, hung or reset), in order."""
        with self._cond:
            return [dataclasses.replace(r, headers=dict(r.headers)) for r in self._requests]

    def events_by_key(self) -> dict[str, list[dict[str, Any]]]:
        """Copies of the accepted events grouped by the ``x-api-key`` they came with.

        Returns:
            A dict from API key to that key's events in arrival order.
        """
        grouped: dict[str, list[dict[str, Any]]] = {}
        with self._cond:
            for key, event in self._events:
                grouped.setdefault(key, []).append(copy.deepcopy(event))
        return grouped

    @property
    def connection_count(self) -> int:
        """Number of TCP connections accepted (since start or the last :meth:`reset`)."""
        with self._cond:
            return self._connection_count

    def wait_for_events(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` events have been accepted.

        Args:
            count: Number of accepted events to wait for (in total, not new ones).
            timeout: Seconds to wait at most.

        Returns:
            True if ``len(events) >= count`` was reached, False on timeout.
        """
        with self._cond:
            return self._cond.wait_for(lambda: len(self._events) >= count, timeout)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` requests (of any outcome) have been received.

        Hung and reset requests count as soon as they arrive.

        Args:
            count: Number of requests to wait for (in total, not new ones).
            timeout: Seconds to wait at most.

        Returns:
            True if ``len(requests) >= count`` was reached, False on timeout.
        """
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= count, timeout)

    def reset(self) -> None:
        """Forget recorded events and requests, zero :attr:`connection_count`, clear all faults.

        Connection ids keep increasing (they stay unique for the server's lifetime).
        Requests already hung stay hung until their time is up or :meth:`stop`.
        """
        with self._cond:
            self._requests.clear()
            self._events.clear()
            self._connection_count = 0
            self._faults.clear()
            self._cond.notify_all()

    # -- fault injection --------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        """Delay the answer to every request by ``seconds`` (0 disables)."""
        _check_seconds("seconds", seconds)
        with self._cond:
            self._faults.latency = float(seconds)

    def fail_next(self, count: int, status: int = 503, retry_after: str | None = None) -> None:
        """Answer the next ``count`` requests to ``/v3/events`` with ``status``; record no events.

        Calls queue up: ``fail_next(1, 500); fail_next(1, 429)`` answers 500 then 429.

        Args:
            count: Number of requests to fail.
            status: HTTP status to answer (200-599).
            retry_after: Value of a ``Retry-After`` header to add (seconds or an HTTP date).
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        _check_status(status)
        with self._cond:
            self._faults.fail_queue.extend([(status, retry_after)] * count)

    def fail_for(self, seconds: float, status: int = 503, retry_after: str | None = None) -> None:
        """Answer every request to ``/v3/events`` during the next ``seconds`` with ``status``.

        The window starts now (``time.monotonic()``) and replaces any earlier window;
        ``seconds=0`` clears it. Queued :meth:`fail_next` failures are used first.

        Args:
            seconds: Length of the failure window.
            status: HTTP status to answer (200-599).
            retry_after: Value of a ``Retry-After`` header to add.
        """
        _check_seconds("seconds", seconds)
        _check_status(status)
        with self._cond:
            self._faults.fail_window = (time.monotonic() + seconds, status, retry_after) if seconds > 0 else None

    def rate_limit_next(self, count: int, retry_after: str = "1") -> None:
        """Answer the next ``count`` requests with 429 and ``Retry-After: retry_after``."""
        self.fail_next(count, 429, retry_after)

    def reset_connection_every(self, n: int | None) -> None:
        """Answer every ``n``-th request by resetting the TCP connection (RST, no response).

        Counting starts at this call and covers every request, whatever its outcome, so
        ``reset_connection_every(3)`` resets the 3rd, 6th, ... request from now on.

        Args:
            n: Period (>= 1; 1 resets every request), or ``None`` to disable.
        """
        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1 or None, got {n}")
        with self._cond:
            self._faults.reset_every = n
            self._faults.reset_counter = 0

    def hang_next(self, count: int, seconds: float | None = None) -> None:
        """Leave the next ``count`` requests unanswered for ``seconds``, then close the connection.

        The request is recorded (status :data:`NO_RESPONSE`) when it arrives, its events are
        never accepted, and :meth:`stop` releases it at once. Calls queue up.

        Args:
            count: Number of requests to hang.
            seconds: How long to hang each one; ``None`` hangs until :meth:`stop`.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if seconds is not None:
            _check_seconds("seconds", seconds)
        with self._cond:
            self._faults.hang_queue.extend([seconds] * count)

    def reject_events(self, predicate: Callable[[dict[str, Any]], bool] | None) -> None:
        """Refuse batches containing events for which ``predicate`` is true (400).

        Models a server-side rule: the whole batch is refused and ``detail.invalids`` lists
        the index of each matching event. The predicate gets a copy of each (already valid)
        event and runs on a server thread; if it raises, the request gets 500 with the error in
        ``detail.message``. ``None`` removes the rule.
        """
        with self._cond:
            self._faults.reject = predicate

    # -- internals used by the handler ------------------------------------------------------

    def _track_connection(self, sock: socket.socket) -> None:
        with self._cond:
            self._connection_count += 1
            self._next_connection_id += 1
            self._open[sock] = self._next_connection_id

    def _untrack_connection(self, sock: socket.socket) -> None:
        with self._cond:
            if self._open.pop(sock, None) is not None:
                self._cond.notify_all()

    def _connection_id(self, sock: socket.socket) -> int:
        with self._cond:
            return self._open.get(sock, 0)

    def _record(self, request: RecordedRequest, events: list[Event] | None, api_key: str) -> None:
        with self._cond:
            self._requests.append(request)
            if events:
                self._events.extend((api_key, event) for event in events)
            self._cond.notify_all()

    def _begin_request(self) -> tuple[bool, bool, float | None, float]:
        """Apply the per-request faults: (reset?, hang?, hang seconds, latency)."""
        with self._cond:
            return self._faults.begin_request()

    def _take_failure(self) -> tuple[int, str | None] | None:
        with self._cond:
            return self._faults.take_failure()

    def _reject_predicate(self) -> EventPredicate | None:
        with self._cond:
            return self._faults.reject
