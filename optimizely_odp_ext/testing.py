"""A fake Optimizely Data Platform (ODP) server and helpers for testing your application.

:class:`FakeOdpServer` is a real HTTP/1.1 server on a local port that speaks the
subset of the ODP REST API this package uses (``POST /v3/events``). It checks
every request as strictly as the real service does, records what it accepted,
and can be told to misbehave (slow answers, 5xx, 429, hung requests, reset
connections, rejected events). The module itself imports only the standard
library (optimizely-sdk only inside :func:`make_client`, pytest only for the fixtures).

Helpers:

- :func:`odp_datafile` builds a datafile (valid for every supported optimizely-sdk)
  whose ODP integration points at a host with a key;
- :func:`make_client` builds an Optimizely client from that datafile (no network: no
  CDN polling, Optimizely's own decision events go nowhere) with the plugin installed,
  sending to a :class:`FakeOdpServer`.

Basic use::

    from optimizely_odp_ext import odp
    from optimizely_odp_ext.testing import FakeOdpServer, make_client

    with FakeOdpServer() as server:
        client = make_client(server)
        client.send_odp_event("purchased", {"fs_user_id": "user123"})
        assert odp(client).flush_odp_events(timeout=5)
        assert server.events[0]["action"] == "purchased"
        client.close()

As pytest fixtures (the package registers this module as a pytest plugin, so no
import is needed once it is installed): ``fake_odp_server``, a started server, and
``odp_client``, a :func:`make_client` client sending to it. At teardown
``odp_client`` is closed, and the test fails if any event the client accepted was
not delivered (``@pytest.mark.odp_allow_undelivered`` turns that check off, for
tests that make delivery fail on purpose)::

    def test_checkout_sends_purchase(odp_client, fake_odp_server):
        checkout(odp_client)                    # your code calls send_odp_event
        assert odp(odp_client).flush_odp_events(timeout=5)
        assert fake_odp_server.events[0]["action"] == "purchased"

Fault injection (thread-safe; may be changed while clients are sending)::

    server.set_latency(0.2)               # every answer is 200 ms late
    server.fail_next(2, status=500)       # the next two requests get 500
    server.rate_limit_next(1, "3")        # then one 429 with Retry-After: 3
    server.fail_for(1.5)                  # every request for 1.5 s gets 503
    server.hang_next(1)                   # next request never answered (until stop())
    server.reset_connection_every(3)      # every 3rd request: TCP RST, no answer
    server.reject_events(lambda e: e["action"] == "bad")   # batch refused with 400
    server.reset()                        # forget records and clear every fault

What the server checks, in this order, for each request: reset-connection fault,
hang fault, latency, path (``/v3/events``, else 404), ``fail_next``/``fail_for``
faults, ``x-api-key`` (else 401), body size (else 413), ``content-type:
application/json`` (else 415), ``content-encoding`` (``gzip`` or none, else 415),
then the JSON body: an array of events (or one event object), each exactly
``{"type": str, "action": str, "identifiers": {str: str, ...}, "data": {str:
str | int | float | bool | null}}`` with non-empty ``type``, ``action`` and
``identifiers`` and finite numbers only. One bad event refuses the whole batch
with 400 and ``detail.invalids`` listing the bad indexes; nothing from that batch
is recorded. A good batch is recorded and answered 202.

Observation: :attr:`FakeOdpServer.events`, :meth:`FakeOdpServer.events_by_key`,
:attr:`FakeOdpServer.requests` (every request, including refused ones, as
:class:`RecordedRequest`), :attr:`FakeOdpServer.connection_count`, and the
blocking :meth:`FakeOdpServer.wait_for_events` /
:meth:`FakeOdpServer.wait_for_requests`. Every request is recorded before its
answer is sent, so a client that got an answer can inspect it at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gzip
import http
import json
import logging
import math
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, cast

from ._threads import start_quiet

if TYPE_CHECKING:
    from optimizely.optimizely import Optimizely

__all__ = ["EVENTS_PATH", "NO_RESPONSE", "FakeOdpServer", "RecordedRequest", "make_client", "odp_datafile"]

EVENTS_PATH = "/v3/events"
"""The only path the fake server answers (other paths get 404)."""

NO_RESPONSE = 0
"""``RecordedRequest.status`` of a request that got no HTTP answer (hung, reset, or cut by stop())."""

_IDLE_TIMEOUT = 5.0  # seconds a keep-alive connection may sit idle before the server closes it
_STOP_GRACE = 2.0  # seconds stop() waits for handler threads to close their sockets
_ALLOWED_KEYS = frozenset({"type", "action", "identifiers", "data"})

Event = Dict[str, Any]
EventPredicate = Callable[[Dict[str, Any]], bool]


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the fake server received, whatever its outcome.

    Attributes:
        path: The request target as sent, including any query string.
        headers: Request headers with lower-cased names (repeated headers joined by ``", "``).
        body: The body bytes exactly as received on the wire (still gzip-compressed if the
            client compressed it).
        status: The HTTP status answered, or :data:`NO_RESPONSE` (0) if the request got no
            answer (hung, connection reset, or cut short by ``stop()``).
        connection_id: 1-based id of the TCP connection the request came on; unique for the
            server's lifetime, so requests sharing a keep-alive connection share it.
        received_at: ``time.monotonic()`` when the request had been read in full.
    """

    path: str
    headers: Dict[str, str]
    body: bytes
    status: int
    connection_id: int
    received_at: float


class _BadFraming(Exception):
    """The request's body framing (Content-Length / chunked) cannot be trusted."""


class _BadRequest(Exception):
    """The request is refused (400/415, or 500 if a predicate failed); carries status and detail."""

    def __init__(self, status: int, message: str, invalids: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.invalids = invalids if invalids is not None else []


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _timestamp() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _check_status(status: int) -> None:
    if not 200 <= status <= 599:
        raise ValueError(f"status must be between 200 and 599, got {status}")


def _check_seconds(name: str, seconds: float) -> None:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")


def _event_problems(event: object) -> list[str]:
    """Return what is wrong with one event (an empty list if it is valid)."""
    if not isinstance(event, dict):
        return [f"event must be a JSON object, got {type(event).__name__}"]
    problems: list[str] = []
    keys = set(event)
    problems.extend(f"missing field '{k}'" for k in sorted(_ALLOWED_KEYS - keys))
    problems.extend(f"unknown field '{k}'" for k in sorted(keys - _ALLOWED_KEYS))
    for field in ("type", "action"):
        if field in event and (not isinstance(event[field], str) or not event[field]):
            problems.append(f"'{field}' must be a non-empty string")
    if "identifiers" in event:
        identifiers = event["identifiers"]
        if not isinstance(identifiers, dict) or not identifiers:
            problems.append("'identifiers' must be a non-empty object")
        else:
            problems.extend(
                f"identifier '{k}' must be a string, got {type(v).__name__}"
                for k, v in identifiers.items()
                if not isinstance(v, str)
            )
    if "data" in event:
        data = event["data"]
        if not isinstance(data, dict):
            problems.append("'data' must be an object")
        else:
            for k, v in data.items():
                if v is not None and not isinstance(v, (str, int, float, bool)):
                    problems.append(f"data '{k}' must be a string, number, boolean or null, got {type(v).__name__}")
                elif isinstance(v, float) and not math.isfinite(v):
                    problems.append(f"data '{k}' must be a finite number")
    return problems


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that reports connections to its :class:`FakeOdpServer`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: FakeOdpServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._track_connection(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.owner._untrack_connection(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients going away (or stop() cutting connections) is routine; anything else is a
        # bug in the fake server and is worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOdpServer/1.0"
    timeout = _IDLE_TIMEOUT
    disable_nagle_algorithm = True  # headers and body are separate writes; don't stall on delayed ACKs
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean: no per-request stderr lines."""

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_OPTIONS(self) -> None:
        self._handle()

    # -- request plumbing -----------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise _BadFraming(f"invalid Content-Length {length_text!r}") from None
        if length < 0:
            raise _BadFraming(f"invalid Content-Length {length_text!r}")
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionError("client closed the connection mid-body")
        return body

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadFraming("invalid chunk size") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # skip trailers
                return b"".join(chunks)
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise ConnectionError("client closed the connection mid-body")
            chunks.append(chunk)
            self.rfile.readline(65537)  # CRLF after the chunk

    def _lower_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return headers

    def _send_json(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _abort(self) -> None:
        """Close the connection abruptly: RST, no response."""
        sock = self.connection
        self.server.owner._untrack_connection(sock)
        self.close_connection = True
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The buffered reader holds a reference to the socket; the fd is only really closed
        # (and the RST only sent) once both are closed.
        self.rfile.close()
        sock.close()

    # -- the ODP logic ----------------------------------------------------------------------

    def _handle(self) -> None:
        owner = self.server.owner
        conn_id = owner._connection_id(self.connection)
        headers = self._lower_headers()

        def record(status: int, body: bytes, events: list[Event] | None = None) -> None:
            owner._record(
                RecordedRequest(
                    path=self.path,
                    headers=headers,
                    body=body,
                    status=status,
                    connection_id=conn_id,
                    received_at=received_at,
                ),
                events,
                headers.get("x-api-key", ""),
            )

        try:
            body = self._read_body()
        except _BadFraming as exc:
            received_at = time.monotonic()
            self.close_connection = True  # the stream position is unknown now
            record(400, b"")
            self._send_json(400, self._error_payload(400, str(exc)))
            return
        except OSError:  # client went away or idled out mid-body
            self.close_connection = True
            return
        received_at = time.monotonic()

        reset, hang, hang_seconds, latency = owner._begin_request()
        if reset:
            record(NO_RESPONSE, body)
            self._abort()
            return
        if hang:
            record(NO_RESPONSE, body)
            owner._stop_event.wait(hang_seconds)
            self.close_connection = True
            return
        if latency > 0 and owner._stop_event.wait(latency):
            record(NO_RESPONSE, body)  # stop() interrupted the delay
            self.close_connection = True
            return

        if self.command != "POST" or self.path.split("?", 1)[0] != EVENTS_PATH:
            record(404, body)
            self._send_json(404, self._payload(404))
            return

        failure = owner._take_failure()
        if failure is not None:
            status, retry_after = failure
            record(status, body)
            extra = {"Retry-After": retry_after} if retry_after else None
            self._send_json(status, self._payload(status), extra)
            return

        if headers.get("x-api-key") not in owner.accepted_keys:
            record(401, body)
            self._send_json(401, self._payload(401))
            return

        if owner.max_body_bytes is not None and len(body) > owner.max_body_bytes:
            record(413, body)
            self._send_json(413, self._payload(413))
            return

        try:
            events = self._parse(headers, body)
            predicate = owner._reject_predicate()
            if predicate is not None:
                try:
                    rejected = [
                        {"event": i, "message": "event rejected by a server-side rule"}
                        for i, event in enumerate(events)
                        if predicate(copy.deepcopy(event))
                    ]
                except Exception as exc:  # a bug in the test's predicate: make it loud, not a hang
                    raise _BadRequest(500, f"reject_events predicate raised {exc!r}") from exc
                if rejected:
                    raise _BadRequest(400, "events rejected", rejected)
        except _BadRequest as exc:
            record(exc.status, body)
            self._send_json(exc.status, self._error_payload(exc.status, exc.message, exc.invalids))
            return

        record(202, body, events)
        self._send_json(202, self._payload(202))

    @staticmethod
    def _parse(headers: dict[str, str], body: bytes) -> list[Event]:
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise _BadRequest(415, f"content-type must be application/json, got {content_type!r}")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error) as exc:
                raise _BadRequest(400, f"body is not valid gzip: {exc}") from None
        elif encoding not in ("", "identity"):
            raise _BadRequest(415, f"unsupported content-encoding {encoding!r}")
        try:
            parsed = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _BadRequest(400, f"body is not valid JSON: {exc}") from None
        if isinstance(parsed, dict):
            parsed = [parsed]
        if not isinstance(parsed, list):
            raise _BadRequest(400, "body must be a JSON array of events or one event object")
        if not parsed:
            raise _BadRequest(400, "body contains no events")
        invalids = []
        for index, event in enumerate(parsed):
            problems = _event_problems(event)
            if problems:
                invalids.append({"event": index, "message": "; ".join(problems)})
        if invalids:
            raise _BadRequest(400, "invalid events", invalids)
        return cast(List[Event], parsed)

    @staticmethod
    def _payload(status: int) -> dict[str, Any]:
        return {"title": _phrase(status), "status": status, "timestamp": _timestamp()}

    @classmethod
    def _error_payload(cls, status: int, message: str, invalids: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        payload = cls._payload(status)
        payload["detail"] = {"invalids": invalids or [], "message": message}
        return payload


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

        # Faults (guarded by _cond).
        self._latency = 0.0
        self._fail_queue: Deque[Tuple[int, Optional[str]]] = deque()
        self._fail_window: tuple[float, int, str | None] | None = None
        self._reset_every: int | None = None
        self._reset_counter = 0
        self._hang_queue: Deque[Optional[float]] = deque()
        self._reject: EventPredicate | None = None

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
            self._latency = 0.0
            self._fail_queue.clear()
            self._fail_window = None
            self._reset_every = None
            self._reset_counter = 0
            self._hang_queue.clear()
            self._reject = None
            self._cond.notify_all()

    # -- fault injection --------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        """Delay the answer to every request by ``seconds`` (0 disables)."""
        _check_seconds("seconds", seconds)
        with self._cond:
            self._latency = float(seconds)

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
            self._fail_queue.extend([(status, retry_after)] * count)

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
            self._fail_window = (time.monotonic() + seconds, status, retry_after) if seconds > 0 else None

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
            self._reset_every = n
            self._reset_counter = 0

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
            self._hang_queue.extend([seconds] * count)

    def reject_events(self, predicate: Callable[[dict[str, Any]], bool] | None) -> None:
        """Refuse batches containing events for which ``predicate`` is true (400).

        Models a server-side rule: the whole batch is refused and ``detail.invalids`` lists
        the index of each matching event. The predicate gets a copy of each (already valid)
        event and runs on a server thread; if it raises, the request gets 500 with the error in
        ``detail.message``. ``None`` removes the rule.
        """
        with self._cond:
            self._reject = predicate

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
            if self._reset_every is not None:
                self._reset_counter += 1
                if self._reset_counter % self._reset_every == 0:
                    return True, False, None, 0.0
            if self._hang_queue:
                return False, True, self._hang_queue.popleft(), 0.0
            return False, False, None, self._latency

    def _take_failure(self) -> tuple[int, str | None] | None:
        with self._cond:
            if self._fail_queue:
                return self._fail_queue.popleft()
            if self._fail_window is not None:
                until, status, retry_after = self._fail_window
                if time.monotonic() < until:
                    return status, retry_after
                self._fail_window = None
            return None

    def _reject_predicate(self) -> EventPredicate | None:
        with self._cond:
            return self._reject


# -- helpers for testing an application ---------------------------------------------------------

# make_client()'s install options unless given: a test should not wait a second for a batch.
_TEST_OPTIONS: Dict[str, Any] = {"flush_interval": 0.05, "close_timeout": 5.0}

ALLOW_UNDELIVERED = "odp_allow_undelivered"
"""The pytest marker that keeps ``odp_client`` from failing a test whose events were not all delivered."""


def odp_datafile(host: str, api_key: str, **extra: Any) -> str:
    """A datafile that every supported optimizely-sdk accepts, with ODP integrated at ``host``.

    Args:
        host: The ODP host, e.g. ``server.url`` of a :class:`FakeOdpServer`.
        api_key: The ODP public key, e.g. ``server.api_key``.
        **extra: Top-level datafile fields to add or replace, by their datafile names, e.g.
            ``revision="2"`` or ``featureFlags=[...]``.

    Returns:
        The datafile as a JSON string (give it to ``Optimizely(datafile=...)``).
    """
    from ._datafile import datafile

    data: Dict[str, Any] = json.loads(datafile(host, api_key))
    data.update(extra)
    return json.dumps(data)


class _OfflineEventDispatcher:
    """Optimizely's own decision and conversion events go nowhere: tests stay off the network."""

    @staticmethod
    def dispatch_event(event: Any) -> None:
        """Discards the event."""


def make_client(server: FakeOdpServer, **install_options: Any) -> Optimizely:
    """An Optimizely client whose ODP events go to ``server``, with this plugin installed on it.

    Built from :func:`odp_datafile` (no SDK key: nothing polls the CDN), with an event dispatcher
    that discards Optimizely's own impression/conversion events, so nothing leaves the machine.
    The client and the plugin log to the ``optimizely_odp_ext.testing.client`` logger (so pytest's
    ``caplog`` sees their lines) unless ``logger`` is given. The caller closes it (the
    ``odp_client`` fixture does).

    Args:
        server: A started :class:`FakeOdpServer`.
        **install_options: Options for ``install(client, ...)``; by default ``flush_interval=0.05``
            and ``close_timeout=5.0``. A ``logger`` is used by the client itself too.

    Returns:
        The client (``optimizely.optimizely.Optimizely``); ``optimizely_odp_ext.odp(client)`` types
        the plugin's methods.
    """
    from optimizely import optimizely

    from .extension import install

    options = {**_TEST_OPTIONS, **install_options}
    if options.get("logger") is None:
        options["logger"] = logging.getLogger(f"{__name__}.client")
    client = optimizely.Optimizely(datafile=odp_datafile(server.url, server.api_key),
                                   logger=options["logger"], event_dispatcher=_OfflineEventDispatcher())
    install(client, **options)
    return client


def _undelivered(stats: Dict[str, Any]) -> str:
    """What went wrong with the accepted events, or "" when every one was delivered."""
    missing = int(stats["accepted"]) - int(stats["delivered"])
    if missing <= 0:
        return ""
    dropped = {reason: n for reason, n in stats["dropped"].items() if n}
    return (f"{missing} of {stats['accepted']} ODP event(s) accepted by odp_client were not delivered "
            f"(dropped: {dropped}, pending: {stats['pending']}); if the test means it, mark it "
            f"@pytest.mark.{ALLOW_UNDELIVERED}")


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def pytest_configure(config: pytest.Config) -> None:
        """Registers the ``odp_allow_undelivered`` marker (so ``--strict-markers`` accepts it)."""
        config.addinivalue_line(
            "markers", f"{ALLOW_UNDELIVERED}: the odp_client fixture does not fail the test when some "
                       "of its events were not delivered")

    @pytest.fixture
    def fake_odp_server() -> Iterator[FakeOdpServer]:
        """A started :class:`FakeOdpServer` (key ``"test-odp-key"``), stopped after the test."""
        server = FakeOdpServer().start()
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def odp_client(request: pytest.FixtureRequest, fake_odp_server: FakeOdpServer) -> Iterator[Optimizely]:
        """A :func:`make_client` client sending to ``fake_odp_server``; closed after the test.

        The test fails at teardown if an event the client accepted was not delivered, unless it is
        marked ``@pytest.mark.odp_allow_undelivered``.
        """
        client = make_client(fake_odp_server)
        try:
            yield client
        finally:
            client.close()
        if request.node.get_closest_marker(ALLOW_UNDELIVERED) is None:
            problem = _undelivered(client.odp_event_stats())
            assert not problem, problem
