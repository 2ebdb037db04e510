"""Production lifecycles in one process (issue 9): several clients at once, pathological values,
a datafile that never comes, key rotation during an outage, ODP refusing everything, one close
budget for many clients. Real clients, real HTTP to FakeOdpServer on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List

import pytest
from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY

from ._helpers import (
    FAST,
    FLUSH_TIMEOUT,
    assert_delivered_exactly_once,
    ids,
    polling_config_manager,
    send,
    stop_polling,
)

OLD_KEY = "old-odp-key-0000000001"
NEW_KEY = "new-odp-key-0000000002"


def _accounted(stats: Any) -> bool:
    return bool(stats["accepted"] == stats["delivered"] + sum(stats["dropped"].values()) + stats["pending"])


# ----------------------------------------------------------------- item 1: several clients, one process


def test_four_clients_sending_concurrently_deliver_every_event_once(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    # A request timeout that a loaded machine never reaches: a timed-out request that ODP did accept
    # is retried (at least once, same idempotence_id), and this test counts exactly once.
    clients = [installed(odp_server, flush_interval=0.01, request_timeout=30) for _ in range(4)]
    sent: List[List[str]] = [ids(f"c{n}", 5_000) for n in range(4)]
    # Ids drawn by the workers (no idempotence_id given): the workers of four managers draw at once.
    drawn = [f"drawn-{n}" for n in range(4)]

    def run(client: Any, mine: List[str], action: str) -> None:
        send(client, mine)
        for _ in range(2_000):
            client.send_odp_event(action, {"fs_user_id": "u"})

    threads = [threading.Thread(target=run, args=(c, s, a)) for c, s, a in zip(clients, sent, drawn)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(c.flush_odp_events(FLUSH_TIMEOUT) for c in clients)
    for client in clients:
        stats = client.odp_event_stats()
        assert (stats["accepted"], stats["delivered"], stats["pending"]) == (7_000, 7_000, 0), stats
    assert_delivered_exactly_once(odp_server, [i for s in sent for i in s] + [
        str(e["data"]["idempotence_id"]) for e in odp_server.events if e["action"] in drawn])
    drawn_ids = [e["data"]["idempotence_id"] for e in odp_server.events if e["action"] in drawn]
    assert len(drawn_ids) == len(set(drawn_ids)) == 8_000


# ----------------------------------------------------------------- item 2: any ingest error is accounted


class _Recursive(str):
    """A str subclass whose str() recurses: passes validation, fails on the worker (RecursionError)."""

    def __str__(self) -> str:
        return str(self)


def test_a_value_that_raises_recursion_error_is_dropped_and_counted(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server, flush_interval=60)
    send(client, ids("before", 3))
    client.send_odp_event("bad", {"fs_user_id": "u"}, data={"idempotence_id": _Recursive("loop")})
    send(client, ids("after", 3))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True

    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (7, 6, 0), stats
    assert sum(stats["dropped"].values()) == 1, stats
    assert _accounted(stats), stats
    assert_delivered_exactly_once(odp_server, ids("before", 3) + ids("after", 3))
    assert [line for line in log[1].errors() if "RecursionError" in line], log[1].errors()


# ----------------------------------------------------------------- item 6: flush without a datafile


def test_flush_without_timeout_is_bounded_when_no_datafile_ever_arrives(log: Any) -> None:
    # Port 1 on loopback refuses connections: the datafile never arrives.
    config_manager = polling_config_manager("http://127.0.0.1:1/datafile.json", log[0])
    client = optimizely.Optimizely(sdk_key="abc", config_manager=config_manager, logger=log[0])
    try:
        assert optimizely_odp_ext.install(client, **{**FAST, "close_timeout": 0.5}) is True
        send(client, ids("held", 5))
        result: List[bool] = []
        flusher = threading.Thread(target=lambda: result.append(client.flush_odp_events()), daemon=True)
        flusher.start()
        # Bounded by close_timeout (0.5 s), not by the retry window (300 s); the join only bounds a hang.
        flusher.join(20)
        assert not flusher.is_alive(), "flush_odp_events() without a timeout never returned"
        assert result == [False]
        gave_up = [line for line in log[1].lines() if line.startswith("flush_odp_events gave up")]
        assert len(gave_up) == 1, gave_up
        assert "no datafile has arrived yet" in gave_up[0], gave_up
    finally:
        optimizely_odp_ext.uninstall(client)
        stop_polling(config_manager)


# ----------------------------------------------------------------- item 7: key rotation during an outage


def test_events_refused_under_a_rotated_key_move_to_the_current_key_once(
        installed: Callable[..., Any], log: Any) -> None:
    with FakeOdpServer(NEW_KEY) as server:  # the old key is revoked: 401
        client = installed(server, key=OLD_KEY, flush_interval=60)
        send(client, ids("queued-old", 50))  # queued under the old key
        server.fail_for(0.3)  # an outage: the old-key batch is retried...
        client.config_manager._set_config(datafile(server.url, NEW_KEY, revision="2"))  # ...the key rotates
        send(client, ids("new", 10))
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True

        assert_delivered_exactly_once(server, ids("queued-old", 50) + ids("new", 10))
        assert set(server.events_by_key()) == {NEW_KEY}
        assert 401 in [r.status for r in server.requests]
        stats = client.odp_event_stats()
        assert (stats["delivered"], sum(stats["dropped"].values())) == (60, 0), stats
        moved = [line for line in log[1].lines() if line.startswith("ODP refused the previous key")]
        assert len(moved) == 1, moved
        assert "****0001" in moved[0], moved
        assert "****0002" in moved[0], moved
        assert all(OLD_KEY not in line and NEW_KEY not in line for line in log[1].lines())


def test_a_401_for_the_current_key_is_still_dropped(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, key="not-accepted-key-0099", flush_interval=60)
    send(client, ids("x", 5))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert [r.status for r in odp_server.requests] == [401]
    assert client.odp_event_stats()["dropped"]["rejected"] == 5


# ----------------------------------------------------------------- item 8: systemic rejections


def test_odp_refusing_every_event_costs_requests_per_batch_not_per_event(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    odp_server.reject_events(lambda event: True)  # a schema change: every event is refused
    client = installed(odp_server, flush_interval=0.01, batch_size=100, request_timeout=30)
    send(client, ids("refused", 5_000))
    assert client.flush_odp_events(FLUSH_TIMEOUT * 2) is True

    stats = client.odp_event_stats()
    assert (stats["delivered"], stats["pending"]) == (0, 0), stats
    assert _accounted(stats), stats
    assert stats["dropped"]["rejected"] + stats["dropped"]["rejected_systemic"] == 5_000, stats
    assert stats["dropped"]["rejected_systemic"] >= 4_500, stats
    batches = 50
    # Bisecting every event would cost 9,950 requests and ~5,000 error lines.
    assert len(odp_server.requests) <= 8 * batches, len(odp_server.requests)
    errors = log[1].errors()
    assert len(errors) <= 2 * batches, len(errors)
    assert any("rejected_systemic" in line and "HTTP 400" in line for line in errors), errors[:3]

    # ODP accepts again, but one event is bad: bisecting finds exactly that one, nothing else is lost.
    odp_server.reject_events(lambda event: event["data"]["idempotence_id"] == "mixed-37")
    send(client, ids("mixed", 100))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, ids("mixed", 100), lost=["mixed-37"])
    assert client.odp_event_stats()["dropped"]["rejected"] == stats["dropped"]["rejected"] + 1


def test_a_few_bad_events_in_every_quarter_are_still_isolated(
        odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    bad = {"q-3", "q-30", "q-55", "q-80"}  # one in each quarter of the batch of 100
    odp_server.reject_events(lambda event: event["data"]["idempotence_id"] in bad)
    client = installed(odp_server, flush_interval=60, batch_size=100)
    send(client, ids("q", 100))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    # Every quarter was refused, but halves of them were delivered: not systemic, nothing good lost.
    assert_delivered_exactly_once(odp_server, ids("q", 100), lost=bad)
    assert client.odp_event_stats()["dropped"]["rejected_systemic"] == 0


# ----------------------------------------------------------------- item 5: one budget for uninstall


def test_class_uninstall_closes_every_client_under_one_close_timeout(make_client: Callable[..., Any]) -> None:
    with FakeOdpServer(TEST_KEY) as server:
        server.hang_next(100, seconds=30)  # ODP never answers
        optimizely_odp_ext.install(**{**FAST, "close_timeout": 2.0, "flush_interval": 0.01, "request_timeout": 30})
        try:
            clients = [make_client(server.url) for _ in range(4)]
            for n, client in enumerate(clients):
                send(client, ids(f"hang{n}", 5))
            assert server.wait_for_requests(4, timeout=10)
        finally:
            started = time.monotonic()
            optimizely_odp_ext.uninstall()
            took = time.monotonic() - started
        # One shared deadline: about 2 s (plus the 1 s join margin). Closing one after another takes at
        # least 4 x 2 s (every request hangs): the bound is that, not a guess at this machine's speed.
        assert took < 4 * 2.0, took


@pytest.mark.parametrize("count", [1, 4])
def test_close_all_budget_does_not_grow_with_the_number_of_clients(
        count: int, installed: Callable[..., Any]) -> None:
    from optimizely_odp_ext import _lifecycle

    with FakeOdpServer(TEST_KEY) as server:
        server.hang_next(100, seconds=30)
        # The hung requests must still be in flight at close (request_timeout beyond the test).
        clients = [installed(server, close_timeout=2.0, flush_interval=0.01, request_timeout=30)
                   for _ in range(count)]
        for n, client in enumerate(clients):
            send(client, ids(f"c{n}", 3))
        assert server.wait_for_requests(count, timeout=10)
        started = time.monotonic()
        assert _lifecycle.close_all(why="test") == count
        # One 2 s deadline plus the join margin; one client after another takes at least count x 2 s.
        took = time.monotonic() - started
        assert took < max(count, 2.5) * 2.0, took
        for client in clients:
            assert client.odp_event_stats()["dropped"]["unconfirmed"] == 3
