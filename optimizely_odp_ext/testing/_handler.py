"""The fake server's HTTP side: the socket server, and the handler that checks each request as ODP does."""

from __future__ import annotations

import contextlib
import copy
import datetime
import gzip
import http
import json
import math
import socket
import struct
import sys
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, List, cast

from ._records import EVENTS_PATH, NO_RESPONSE, Event, RecordedRequest

if TYPE_CHECKING:
    from ._server import FakeOdpServer

_IDLE_TIMEOUT = 5.0  # seconds a keep-alive connection may sit idle before the server closes it
_ALLOWED_KEYS = frozenset({"type", "action", "identifiers", "data"})

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
    # socketserver's listen backlog is 5: a client opening more connections at once (max_in_flight
    # goes up to 64) had the extra connects' SYNs dropped and retried a second later by the kernel.
    request_queue_size = 128

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
