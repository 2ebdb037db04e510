"""Helpers for the integration tests: sending numbered events, exact delivery outcomes, a
datafile server that answers when told to, and a polling config manager that can be stopped on
every supported SDK line."""

from __future__ import annotations

import collections
import http.server
import os
import threading
import time
from typing import Any, Callable, Counter, Dict, Iterable, List, Optional, Sequence

from optimizely import optimizely
from optimizely.config_manager import PollingConfigManager

import optimizely_odp_ext
from optimizely_odp_ext.testing import FakeOdpServer

# Fault windows are short by default so the suite stays fast; CI may stretch them
# (ODP_EXT_FAULT_SECONDS=10 reproduces the 10 s outage of issue 3).
FAULT_SECONDS = float(os.environ.get("ODP_EXT_FAULT_SECONDS", "1.0"))

# Options for install(): tiny timeouts and backoffs so faults resolve in well under a second.
FAST: Dict[str, Any] = {
    "request_timeout": 0.5,
    "connect_timeout": 0.5,
    "backoff_base": 0.05,
    "backoff_max": 0.3,
    "flush_interval": 0.05,
    "close_timeout": 5.0,
}

# Generous upper bound for a flush that should succeed (never reached when things work).
FLUSH_TIMEOUT = 15.0

ACTION = "integration"
CLOSED_LINE = "ODP event manager closed: "


def ids(prefix: str, count: int, start: int = 0) -> List[str]:
    """``count`` distinct idempotence ids: ``prefix-<n>``."""
    return [f"{prefix}-{n}" for n in range(start, start + count)]


def send(client: Any, event_ids: Iterable[str], action: str = ACTION, **data: Any) -> None:
    """One send_odp_event per id, with the id as the event's idempotence_id."""
    for event_id in event_ids:
        client.send_odp_event(action, {"fs_user_id": f"user-{event_id}"},
                              data={"idempotence_id": event_id, **data})


def delivered(server: FakeOdpServer) -> Counter[str]:
    """How many times the server accepted each idempotence id."""
    return collections.Counter(str(e["data"]["idempotence_id"]) for e in server.events)


class Outcome:
    """Exact delivery outcome of the ids sent: delivered (at least once), lost, duplicated, unknown."""

    def __init__(self, server: FakeOdpServer, sent: Sequence[str]) -> None:
        counts = delivered(server)
        sent_set = set(sent)
        assert len(sent_set) == len(sent), "the test sent an id twice"
        self.delivered = {i for i in sent if counts[i] > 0}
        self.lost = sent_set - self.delivered
        self.duplicates = {i: n for i, n in counts.items() if n > 1}
        self.unexpected = set(counts) - sent_set
        self._carriers = _carriers(server, list(self.duplicates)[:3])

    def __repr__(self) -> str:
        return (f"Outcome(delivered={len(self.delivered)}, lost={sorted(self.lost)[:10]}, "
                f"duplicates={dict(list(self.duplicates.items())[:10])}, unexpected={sorted(self.unexpected)[:10]})"
                + "".join(f"\n  requests carrying {event_id}: {carriers}"
                          for event_id, carriers in self._carriers.items()))


def _carriers(server: FakeOdpServer, event_ids: Sequence[str]) -> Dict[str, List[str]]:
    """For a failure message: each request that carried one of ``event_ids`` (status, when it was
    read in full, on which connection). A repeat after a slow answer is a retry of a request the
    sender gave up on (its ``request_timeout``); a repeat after a 2xx answered at once is a bug."""
    requests = server.requests
    start = requests[0].received_at if requests else 0.0
    found: Dict[str, List[str]] = {}
    for event_id in event_ids:
        needle = f'"{event_id}"'.encode()
        found[event_id] = [f"status {r.status} at +{r.received_at - start:.3f} s on connection {r.connection_id}"
                           for r in requests if needle in r.body]
    return found


def assert_delivered_exactly_once(server: FakeOdpServer, sent: Sequence[str],
                                  lost: Iterable[str] = ()) -> Outcome:
    """Every id in ``sent`` arrived exactly once, except ``lost`` (never arrived); nothing else arrived."""
    outcome = Outcome(server, sent)
    expected_lost = set(lost)
    assert outcome.lost == expected_lost, outcome
    assert outcome.delivered == set(sent) - expected_lost, outcome
    assert outcome.duplicates == {}, outcome
    assert outcome.unexpected == set(), outcome
    return outcome


def no_drops(stats: Dict[str, Any]) -> Dict[str, int]:
    """The ``dropped`` counters of ``stats`` that are not zero."""
    return {reason: n for reason, n in stats["dropped"].items() if n}


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` seconds pass (a bounded deadline loop)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        pause.wait(min(interval, remaining))


def lines_with(records: Sequence[str], needle: str) -> List[str]:
    return [line for line in records if needle in line]


# ----------------------------------------------------------------- a datafile server


class DatafileServer:
    """A tiny HTTP server on 127.0.0.1 that serves one datafile, only once released.

    ``requested`` is set when a datafile request arrives; the answer waits for :meth:`release`
    (at most ``hold_limit`` seconds, so a failing test cannot hang a thread forever).
    """

    def __init__(self, datafile_json: str, hold_limit: float = 15.0) -> None:
        self.datafile_json = datafile_json.encode("utf-8")
        self.requested = threading.Event()
        self._released = threading.Event()
        self._hold_limit = hold_limit
        self._answered = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requested.set()
                owner._released.wait(owner._hold_limit)
                body = owner.datafile_json
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with owner._lock:
                    owner._answered += 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/datafile.json"

    @property
    def answered(self) -> int:
        with self._lock:
            return self._answered

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> DatafileServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="datafile-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join(5)


class _StoppablePollingConfigManager(PollingConfigManager):  # type: ignore[misc]
    """optimizely-sdk 4.x's PollingConfigManager has no stop(): its thread sleeps forever in
    time.sleep(update_interval). This one waits on an event instead, so a test can stop it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._halt = threading.Event()
        super().__init__(*args, **kwargs)

    def _run(self) -> None:
        while not self._halt.is_set():
            self.fetch_datafile()
            self._halt.wait(self.update_interval)

    def stop(self) -> None:
        self._halt.set()
        self._polling_thread.join(5)


def polling_config_manager(url: str, logger: Any, sdk_key: str = "abc") -> Any:
    """A real PollingConfigManager fetching ``url`` (once: the interval is the SDK's default, 5 min).

    On 5.x the SDK's own class (it has stop()); on 4.x a subclass that can be stopped.
    """
    cls = PollingConfigManager if callable(getattr(PollingConfigManager, "stop", None)) \
        else _StoppablePollingConfigManager
    return cls(sdk_key=sdk_key, url=url, blocking_timeout=30, logger=logger)


def stop_polling(config_manager: Any) -> None:
    """Stops a polling config manager and waits for its thread."""
    config_manager.stop()
    thread = getattr(config_manager, "_polling_thread", None)
    if thread is not None:
        thread.join(5)
        assert not thread.is_alive(), "the datafile polling thread did not stop"


def polling_client(datafile_server: DatafileServer, logger: Any, **options: Any) -> Any:
    """A real client whose datafile comes from ``datafile_server``, with the plugin installed."""
    config_manager = polling_config_manager(datafile_server.url, logger)
    client = optimizely.Optimizely(sdk_key="abc", config_manager=config_manager, logger=logger)
    assert optimizely_odp_ext.install(client, **{**FAST, **options}) is True
    return client


def close_polling_client(client: Any, datafile_server: DatafileServer) -> None:
    """Closes the client and stops its polling thread (released first: a thread waiting for its
    datafile cannot stop)."""
    datafile_server.release()
    client.close()  # ours (and on 5.x the SDK's, which stops the polling thread)
    stop_polling(client.config_manager)
