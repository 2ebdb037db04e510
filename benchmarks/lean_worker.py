"""The lean-path benchmark's subprocess side (issue 19): the floor, the raw HTTP stacks, and the transport
that target ``ours`` sends through. Called from ``bench_worker.py`` (same line protocol, see there).

* ``run_floor``: the floor of issue 19. The same events built as plain dicts with a ``uuid4`` id (the
  caller's own id wins, as in ours, so delivery can be counted), ``json.dumps`` per batch of 100, POSTed
  with ``http.client`` over one keep-alive connection, no validation, all on the calling thread.
* ``run_stack``: pre-encoded batches of 100 POSTed over one keep-alive connection by one HTTP stack
  (``http.client``, ``urllib3``, ``requests``, or one of our transports): the client CPU of the stack alone.
* ``use_transport``: makes the manager's default transport ``requests`` or ``urllib3`` in this process, so
  both can be measured in one run whatever ``manager.py``'s default is.
"""

from __future__ import annotations

import gc
import http.client
import json
import time
import uuid
from typing import Any, Callable, Dict, List
from urllib.parse import urlsplit

BATCH = 100
DEFAULTS = {"data_source_type": "sdk", "data_source": "python-sdk", "data_source_version": "5.7.0"}


def use_transport(name: str) -> None:
    """Builds ``name``'s transport wherever the manager builds its default one (benchmark only)."""
    if name in ("", "default"):
        return
    from optimizely_odp_ext import manager, transport

    chosen: Any = {"requests": transport.RequestsTransport, "urllib3": transport.Urllib3Transport}[name]

    def factory(options: Any) -> Any:
        return chosen(pool_size=options.max_in_flight, gzip_body=options.gzip)

    init = manager.EventManager.__init__
    init.__defaults__ = tuple(factory if callable(d) else d for d in init.__defaults__ or ())


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)


def run_floor(cfg: Dict[str, Any], emit: Callable[..., None], wait_command: Callable[[], str],
              make_args: Callable[[str, int], Any]) -> int:
    tag, count = cfg["tag"], cfg["events"]
    calls = [make_args(tag, i) for i in range(count)]  # the same inputs as ours, built before the clock
    path = urlsplit(cfg["url"]).path.rstrip("/") + "/v3/events"
    headers = {"content-type": "application/json", "x-api-key": cfg["key"]}
    failed = 0
    gc.collect()
    cpu0 = time.process_time()
    t_first = time.monotonic()
    connection = _connection(cfg["url"])
    batch: List[Dict[str, Any]] = []
    dumps, uuid4 = json.dumps, uuid.uuid4
    for index, (action, identifiers, type_, data) in enumerate(calls, 1):
        batch.append({"type": type_, "action": action, "identifiers": identifiers,
                      "data": {"idempotence_id": str(uuid4()), **DEFAULTS, **data}})
        if len(batch) == BATCH or index == count:
            connection.request("POST", path, body=dumps(batch).encode(), headers=headers)
            response = connection.getresponse()
            response.read()
            failed += response.status != 202
            batch = []
    connection.close()
    cpu = time.process_time() - cpu0
    return _report(emit, wait_command, count=count, t_first=t_first, cpu0=cpu0, cpu=cpu, failed=failed)


def run_stack(cfg: Dict[str, Any], emit: Callable[..., None], wait_command: Callable[[], str],
              make_args: Callable[[str, int], Any]) -> int:
    tag, count, stack = cfg["tag"], cfg["events"], cfg["stack"]
    events = [{"type": t, "action": a, "identifiers": i, "data": {**DEFAULTS, **d}}
              for a, i, t, d in (make_args(tag, n) for n in range(count))]
    bodies = [json.dumps(events[n:n + BATCH], separators=(",", ":")).encode() for n in range(0, count, BATCH)]
    url = cfg["url"].rstrip("/") + "/v3/events"
    post = _poster(stack, url, cfg["key"])
    gc.collect()
    cpu0 = time.process_time()
    t_first = time.monotonic()
    failed = sum(post(body) != 202 for body in bodies)
    cpu = time.process_time() - cpu0
    return _report(emit, wait_command, count=count, t_first=t_first, cpu0=cpu0, cpu=cpu, failed=failed)


def _report(emit: Callable[..., None], wait_command: Callable[[], str], *, count: int, t_first: float,
            cpu0: float, cpu: float, failed: int) -> int:
    """What a side without a manager reports: the "sent" line, then "final" once told to finish."""
    emit("sent", sent=count, t_first=t_first, send_seconds=time.monotonic() - t_first, cpu0=cpu0,
         cpu_after_send_and_flush=cpu, failed=failed)
    wait_command()
    emit("final", cpu_seconds=cpu, close_seconds=0.0, drained=None, stats_before_close={})
    return 0


def _poster(stack: str, url: str, key: str) -> Callable[[bytes], int]:
    """``post(body) -> status`` over one keep-alive connection of ``stack``."""
    headers = {"content-type": "application/json", "x-api-key": key}
    if stack == "http.client":
        connection, path = _connection(url), urlsplit(url).path

        def post_http_client(body: bytes) -> int:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        return post_http_client
    if stack == "urllib3":
        import urllib3

        pool = urllib3.PoolManager(maxsize=1)
        return lambda body: int(pool.urlopen("POST", url, body=body, headers=headers, retries=False).status)
    if stack == "requests":
        import requests

        session = requests.Session()
        return lambda body: session.post(url, data=body, headers=headers, timeout=(10, 30)).status_code
    from optimizely_odp_ext import transport

    chosen = {"Urllib3Transport": transport.Urllib3Transport, "RequestsTransport": transport.RequestsTransport}
    sender = chosen[stack](pool_size=1)
    return lambda body: sender.send(url, key, body, (10.0, 30.0)).status
