"""bulk.send_partition without Spark: rows as mappings and Row-like objects, over real HTTP to FakeOdpServer."""

from __future__ import annotations

import json
import logging
import pickle
import threading
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest

from optimizely_odp_ext import bulk
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.settings import ConfigurationError
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY, RecordingHandler

FAST = {"retry_window": 0.5, "request_timeout": 2.0}


def rows(count: int, start: int = 0) -> Iterator[Dict[str, Any]]:
    for i in range(start, start + count):
        yield {"action": "purchased", "identifiers": {"fs_user_id": f"u{i}"}, "data": {"order": i}}


def send(server: FakeOdpServer, events: Any, **kwargs: Any) -> bulk.Summary:
    return bulk.send_partition(events, host=server.url, api_key=TEST_KEY, dataset=kwargs.pop("dataset", "test"),
                               **kwargs)


def ids(server: FakeOdpServer) -> List[str]:
    return [e["data"]["idempotence_id"] for e in server.events]


def expected_id(dataset: str, event: Dict[str, Any]) -> str:
    """The documented formula, computed with the standard library's uuid module."""
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "odp-bulk:" + dataset)
    return str(uuid.uuid5(namespace, json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)))


class FakeRow(tuple):  # type: ignore[type-arg]
    """Like pyspark.sql.Row: a tuple with asDict(recursive=...), not a mapping."""

    def __new__(cls, fields: Dict[str, Any]) -> FakeRow:
        row = super().__new__(cls, tuple(fields.values()))
        row._fields = fields  # type: ignore[attr-defined]
        return row

    def asDict(self, recursive: bool = False) -> Dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, FakeRow):
                return value.asDict(True) if recursive else value
            return value
        return {k: plain(v) for k, v in self._fields.items()}  # type: ignore[attr-defined]


@pytest.fixture
def recorded() -> Iterator[tuple]:  # type: ignore[type-arg]
    logger = logging.getLogger(f"tests.bulk.{uuid.uuid4().hex}")
    logger.propagate = False
    handler = RecordingHandler()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def test_mappings_are_delivered_once_each_with_the_documented_ids(odp_server: FakeOdpServer) -> None:
    summary = send(odp_server, rows(1200), batch_size=100)
    assert (summary["read"], summary["delivered"], summary["invalid"], summary["dropped"]) == (1200, 1200, 0, {})
    received = odp_server.events
    assert sorted(e["identifiers"]["fs_user_id"] for e in received) == sorted(f"u{i}" for i in range(1200))
    first = next(e for e in received if e["identifiers"]["fs_user_id"] == "u7")
    assert first["type"] == "fullstack"
    assert first["data"]["order"] == 7
    assert first["data"]["idempotence_id"] == expected_id(
        "test", {"action": "purchased", "data": {"order": 7}, "identifiers": {"fs_user_id": "u7"}, "type": "fullstack"})
    assert summary["seconds"] > 0
    assert summary["peak_rss_bytes"] > 0


def test_a_rerun_sends_the_same_ids_and_another_dataset_other_ones(odp_server: FakeOdpServer) -> None:
    send(odp_server, rows(300))
    first = ids(odp_server)
    odp_server.reset()
    send(odp_server, rows(300), batch_size=7, max_in_flight=1)  # other batching, same ids
    assert sorted(ids(odp_server)) == sorted(first)
    assert len(set(first)) == 300
    odp_server.reset()
    send(odp_server, rows(300), dataset="another")
    assert not set(ids(odp_server)) & set(first)


def test_identical_rows_are_one_id_and_a_given_id_is_kept(odp_server: FakeOdpServer) -> None:
    same = {"action": "viewed", "identifiers": {"fs_user_id": "u1"}}
    own = {"action": "viewed", "identifiers": {"fs_user_id": "u1"}, "data": {"idempotence_id": "mine-1"}}
    summary = send(odp_server, [same, dict(same), own])
    assert summary["delivered"] == 3
    got = ids(odp_server)
    assert len(got) == 3
    assert len(set(got)) == 2
    assert "mine-1" in got


def test_row_like_objects_are_read_recursively_and_nulls_are_absent(odp_server: FakeOdpServer) -> None:
    row = FakeRow({"action": "purchased", "type": None,
                   "identifiers": FakeRow({"fs-user-id": "u1", "email": None}),
                   "data": FakeRow({"price": 9.5, "coupon": None, "idempotence_id": None})})
    summary = send(odp_server, [row])
    assert summary["delivered"] == 1
    (event,) = odp_server.events
    assert event["identifiers"] == {"fs_user_id": "u1"}  # normalized, the null email left out
    assert event["type"] == "fullstack"
    assert event["data"]["price"] == 9.5
    assert "coupon" not in event["data"]
    assert event["data"]["idempotence_id"] == expected_id(
        "test", {"action": "purchased", "data": {"price": 9.5}, "identifiers": {"fs_user_id": "u1"},
                 "type": "fullstack"})


def test_invalid_rows_are_counted_and_logged_with_their_position(odp_server: FakeOdpServer, recorded: tuple) -> None:  # type: ignore[type-arg]
    logger, handler = recorded
    bad: List[Any] = [
        {"action": "", "identifiers": {"fs_user_id": "secret@example.com"}},
        {"action": "a", "identifiers": {"email": 5}},
        {"action": "a", "identifiers": {"fs_user_id": "x"}, "extra": 1},
        ["not", "a", "mapping"],
        {"action": "a", "identifiers": {"fs_user_id": "x"}, "data": {"idempotence_id": 7}},
        {"action": "a", "identifiers": {"fs_user_id": "x"}, "data": {"v": float("nan")}},
    ]
    events = [*rows(2), *bad, *rows(2, start=2)]
    summary = send(odp_server, events, logger=logger)
    assert (summary["read"], summary["invalid"], summary["delivered"]) == (10, 6, 4)
    assert len(odp_server.events) == 4
    lines = handler.errors()
    assert len(lines) == 4, lines  # the first three one by one, then one line for the rest
    assert "row 3:" in lines[0]
    assert "ODP action is not valid" in lines[0]
    assert "row 4:" in lines[1]
    assert '"email"' in lines[1]
    assert "row 5:" in lines[2]
    assert '"extra"' in lines[2]
    assert "6 invalid row(s)" in lines[3]
    assert "3 not logged" in lines[3]
    assert not any("secret@example.com" in line for line in lines)


def test_events_odp_refuses_are_counted_not_raised(odp_server: FakeOdpServer) -> None:
    odp_server.reject_events(lambda event: event["data"].get("order", 0) % 10 == 3)
    summary = send(odp_server, rows(100), batch_size=20)
    assert summary["dropped"] == {"rejected": 10}
    assert summary["delivered"] == 90
    assert sorted(e["data"]["order"] for e in odp_server.events) == [i for i in range(100) if i % 10 != 3]


def test_an_outage_past_the_retry_window_raises_partition_not_delivered(odp_server: FakeOdpServer) -> None:
    odp_server.fail_for(600.0)
    with pytest.raises(bulk.PartitionNotDelivered) as caught:
        send(odp_server, rows(5000), batch_size=50, max_in_flight=2, **FAST)
    summary = caught.value.summary
    assert summary["delivered"] == 0
    assert summary["dropped"].get("retry_expired", 0) > 0
    message = str(caught.value)
    assert "not delivered" in message
    assert "retry_expired" in message
    assert "HTTP 503" in message
    assert "stopped after reading" in message
    assert summary["read"] < 5000
    assert TEST_KEY not in message
    assert odp_server.events == []
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == message
    assert again.summary == summary


def test_an_unreachable_host_raises() -> None:
    server = FakeOdpServer(TEST_KEY).start()
    url = server.url
    server.stop()  # nothing listens on that port any more
    with pytest.raises(bulk.PartitionNotDelivered, match="not delivered"):
        bulk.send_partition(rows(10), host=url, api_key=TEST_KEY, dataset="d", **FAST)


def test_reading_waits_for_delivery(odp_server: FakeOdpServer) -> None:
    """Back-pressure: the rows are read only a bounded distance ahead of what ODP received."""
    odp_server.set_latency(0.01)
    lead: List[int] = []

    def watched() -> Iterator[Dict[str, Any]]:
        for i, row in enumerate(rows(1000)):
            if i % 5 == 0:  # server.events copies every event: not on each row
                lead.append(i - len(odp_server.events))
            yield row

    summary = send(odp_server, watched(), batch_size=10, max_in_flight=2)
    assert summary["delivered"] == 1000
    # queue (batch * (in flight + 2)) + the batches in flight + one being built, and nothing like 1000
    assert max(lead) <= 10 * (2 + 2) + 10 * 2 + 10 * 2, max(lead)


def test_an_error_from_the_rows_propagates_and_stops_the_sender(odp_server: FakeOdpServer) -> None:
    def broken() -> Iterator[Dict[str, Any]]:
        yield from rows(5)
        raise RuntimeError("upstream failed")

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="upstream failed"):
        send(odp_server, broken())
    assert len(odp_server.events) == 5  # what was read before is still delivered by the close
    # The manager was closed: its threads were told to stop (close does not join its senders).
    ours = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("odp")]
    for thread in ours:
        thread.join(30.0)
    assert not [t for t in ours if t.is_alive()]


def test_the_sender_masks_the_key_and_pickles(odp_server: FakeOdpServer) -> None:
    sender = bulk.PartitionSender(host=odp_server.url, api_key=TEST_KEY, dataset="d", batch_size=50)
    assert TEST_KEY not in repr(sender)
    assert TEST_KEY[-4:] in repr(sender)
    copy = pickle.loads(pickle.dumps(sender))
    assert copy(rows(60))["delivered"] == 60


def test_the_sender_from_a_datafile(odp_server: FakeOdpServer) -> None:
    sender = bulk.PartitionSender.from_datafile(datafile(odp_server.url, TEST_KEY), dataset="d")
    assert (sender.host, sender.api_key) == (odp_server.url, TEST_KEY)
    with pytest.raises(ConfigurationError, match="no ODP integration"):
        bulk.PartitionSender.from_datafile(datafile(None, None), dataset="d")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        bulk.PartitionSender.from_datafile("{", dataset="d")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dataset": ""}, "dataset"),
    ({"batch_size": 501}, "at most 500"),
    ({"host": "ftp://x"}, "not a valid URL"),
    ({"host": "http://odp.example.com"}, "plain http"),  # the key would travel unencrypted
])
def test_configuration_mistakes_raise(kwargs: Dict[str, Any], match: str) -> None:
    args: Dict[str, Optional[Any]] = {"host": "https://api.zaius.com", "api_key": TEST_KEY, "dataset": "d", **kwargs}
    with pytest.raises(ConfigurationError, match=match) as caught:
        bulk.send_partition([], **args)  # type: ignore[arg-type]
    assert TEST_KEY not in str(caught.value)
    with pytest.raises(ConfigurationError, match="unknown option"):
        bulk.PartitionSender(host="https://api.zaius.com", api_key=TEST_KEY, dataset="d", batch=5)
