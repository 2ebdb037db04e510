"""install(client, on_outcome=fn): one call per batch outcome, every accepted event reported once,
a raising callback contained (issue 10, "Callbacks and metrics"). Real HTTP to FakeOdpServer."""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Dict, List, Tuple

from optimizely_odp_ext.testing import FakeOdpServer

from ._helpers import FLUSH_TIMEOUT, assert_delivered_exactly_once, ids, send

Report = Tuple[str, List[Dict[str, Any]], str, str]


class Recorder:
    def __init__(self) -> None:
        self.calls: List[Report] = []
        self.lock = threading.Lock()

    def __call__(self, outcome: str, events: List[Dict[str, Any]], detail: str) -> None:
        with self.lock:
            self.calls.append((outcome, events, detail, threading.current_thread().name))

    def by_outcome(self) -> Dict[str, List[str]]:
        found: Dict[str, List[str]] = collections.defaultdict(list)
        for outcome, events, _, _ in self.calls:
            found[outcome] += [str(e["idempotence_id"]) for e in events]
        return dict(found)


def test_every_accepted_event_is_reported_once_with_its_outcome(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    recorder = Recorder()
    odp_server.reject_events(lambda event: event["data"]["idempotence_id"] == "ok-3")
    # batch_size 11: the 10 queued events are no full batch, so the worker leaves them queued (for
    # flush_interval) rather than taking them while the two below are sent: no race on the room.
    client = installed(odp_server, flush_interval=60, batch_size=11, queue_capacity=10, request_timeout=30,
                       on_outcome=recorder)
    send(client, ids("ok", 10))
    send(client, ids("over", 2))  # the queue holds 10: these two are dropped as queue_full
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    found = recorder.by_outcome()
    assert sorted(found["delivered"]) == sorted(set(ids("ok", 10)) - {"ok-3"})
    assert found["rejected"] == ["ok-3"]
    assert sorted(found["queue_full"]) == ids("over", 2)
    stats = client.odp_event_stats()
    assert sum(len(v) for v in found.values()) == stats["accepted"] == 12
    delivered = next(call for call in recorder.calls if call[0] == "delivered")
    event = delivered[1][0]
    assert event["action"] == "integration"
    assert event["identifiers"] == {"fs_user_id": f"user-{event['idempotence_id']}"}
    assert event["data"]["idempotence_id"] == event["idempotence_id"]
    assert delivered[2] == "HTTP 202"
    assert delivered[3] == "odp-ext-worker"  # on the worker thread, never the caller's


def test_events_left_at_the_close_deadline_are_reported(installed: Callable[..., Any]) -> None:
    recorder = Recorder()
    with FakeOdpServer("test-odp-key-0123456789") as server:
        server.hang_next(10, seconds=30)
        client = installed(server, key="test-odp-key-0123456789", flush_interval=0.01, batch_size=5, max_batch_size=5,
                           max_in_flight=1, close_timeout=0.5, request_timeout=20, on_outcome=recorder)
        send(client, ids("late", 10))
        assert server.wait_for_requests(1, timeout=10)
        client.close()
    found = recorder.by_outcome()
    assert sorted(found["unconfirmed"]) == ids("late", 5)  # the batch in flight: ODP may have it
    assert sorted(found["shutdown"]) == ids("late", 5, start=5)  # never sent
    stats = client.odp_event_stats()
    assert (stats["dropped"]["unconfirmed"], stats["dropped"]["shutdown"]) == (5, 5)


def test_a_raising_callback_is_logged_once_and_never_stops_delivery(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    calls: List[Tuple[str, str]] = []

    def broken(outcome: str, events: List[Dict[str, Any]], detail: str) -> None:
        calls.extend((outcome, str(event["idempotence_id"])) for event in events)
        raise RuntimeError("metrics backend down")

    client = installed(odp_server, flush_interval=0.01, batch_size=5, on_outcome=broken)
    for round_ in range(3):
        send(client, ids(f"r{round_}", 5))
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, ids("r0", 5) + ids("r1", 5) + ids("r2", 5))
    # Still called for every batch after raising: each event reported once, as delivered.
    assert sorted(calls) == sorted(("delivered", event_id) for r in range(3) for event_id in ids(f"r{r}", 5))
    raised = [line for line in log[1].errors() if "on_outcome callback raised RuntimeError" in line]
    assert len(raised) == 1, raised
