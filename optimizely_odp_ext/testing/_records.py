"""What the fake server records: one request as it arrived, and the constants its callers check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

EVENTS_PATH = "/v3/events"
"""The only path the fake server answers (other paths get 404)."""

NO_RESPONSE = 0
"""``RecordedRequest.status`` of a request that got no HTTP answer (hung, reset, or cut by stop())."""


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
