"""Issue 2 over real HTTP: what arrives at ODP when a real Optimizely client sends events.

Each test builds a real ``optimizely.Optimizely`` client from a datafile whose ODP integration
points at a FakeOdpServer on 127.0.0.1, installs the plugin, and checks what the server received.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import uuid
from typing import Any, Callable, Dict, List

import pytest

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import NO_RESPONSE, FakeOdpServer
from tests.conftest import TEST_KEY, requires_sdk5

from ._helpers import (
    FLUSH_TIMEOUT,
    DatafileServer,
    assert_delivered_exactly_once,
    close_polling_client,
    ids,
    no_drops,
    polling_client,
    send,
)

SDK_VERSION = importlib.metadata.version("optimizely-sdk")
EXT_VERSION = importlib.metadata.version("optimizely-odp-ext")
NOT_INTEGRATED = "ODP is not integrated."
OLD_KEY = "old-odp-key-0000000001"
NEW_KEY = "new-odp-key-0000000002"


def _defaults(idempotence_id: str) -> Dict[str, Any]:
    return {"idempotence_id": idempotence_id, "data_source_type": "sdk", "data_source": "python-sdk",
            "data_source_version": SDK_VERSION}


def _bodies(server: FakeOdpServer) -> List[List[Dict[str, Any]]]:
    return [json.loads(r.body) for r in server.requests]


# ----------------------------------------------------------------- payload and headers


def test_exact_payload_and_headers(odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server)
    identifiers = {"FS-USER-ID": "user123", "email": "a@b.com"}
    data = {"item": "shirt", "price": 50.0, "count": 2, "gift": False, "note": None, "idempotence_id": "id-1"}

    client.send_odp_event("purchased", identifiers, "fullstack", data)
    client.send_odp_event("viewed", {"fs_user_id": "user456"}, data={"idempotence_id": "id-2"})
    client.send_odp_event("custom", {"FS_USER_ID": "user789"}, type="",  # empty type means "fullstack"
                          data={"idempotence_id": "id-3", "data_source": "my-app", "data_source_type": "batch",
                                "data_source_version": "9.9"})
    client.send_odp_event("typed", {"fs_user_id": "real", "fs-user-id": "variant"}, "customtype",
                          {"idempotence_id": "id-4"})
    client.send_odp_event("no-id", {"fs_user_id": "u"})

    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    events = odp_server.events
    assert events[:4] == [
        {"type": "fullstack", "action": "purchased",
         "identifiers": {"fs_user_id": "user123", "email": "a@b.com"},
         "data": {**_defaults("id-1"), "item": "shirt", "price": 50.0, "count": 2, "gift": False, "note": None}},
        {"type": "fullstack", "action": "viewed", "identifiers": {"fs_user_id": "user456"},
         "data": _defaults("id-2")},
        {"type": "fullstack", "action": "custom", "identifiers": {"fs_user_id": "user789"},
         "data": {"idempotence_id": "id-3", "data_source_type": "batch", "data_source": "my-app",
                  "data_source_version": "9.9"}},
        # A real fs_user_id is never overwritten by a variant spelling.
        {"type": "customtype", "action": "typed", "identifiers": {"fs_user_id": "real", "fs-user-id": "variant"},
         "data": _defaults("id-4")},
    ]
    generated = events[4]
    assert generated["action"] == "no-id"
    assert uuid.UUID(generated["data"]["idempotence_id"]).version == 4
    assert generated["data"] == _defaults(generated["data"]["idempotence_id"])
    assert len(events) == 5
    # The caller's dicts are not touched.
    assert identifiers == {"FS-USER-ID": "user123", "email": "a@b.com"}
    assert data == {"item": "shirt", "price": 50.0, "count": 2, "gift": False, "note": None, "idempotence_id": "id-1"}

    requests = odp_server.requests
    assert requests, "nothing was sent"
    for request in requests:
        assert request.path == "/v3/events"
        assert request.status == 202
        assert request.headers["x-api-key"] == TEST_KEY
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"].startswith(f"optimizely-odp-ext/{EXT_VERSION} ")
        assert f" optimizely-sdk/{SDK_VERSION} " in request.headers["user-agent"]
        assert isinstance(json.loads(request.body), list)
    assert optimizely_odp_ext.__version__ == EXT_VERSION
    assert log[1].errors() == []
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["delivered"], stats["pending"], no_drops(stats)) == (5, 5, 0, {})


def test_bad_calls_are_discarded_with_one_line_each_and_do_not_disturb_good_ones(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server)
    send(client, ["good-1"])
    client.send_odp_event("", {"fs_user_id": "u"})
    client.send_odp_event("a", {})
    client.send_odp_event("a", {"fs_user_id": "u"}, data={"price": float("nan")})
    client.send_odp_event("a", {"fs_user_id": "u"}, data={"nested": {"x": 1}})
    send(client, ["good-2"])

    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, ["good-1", "good-2"])
    assert log[1].errors() == [
        "ODP action is not valid (cannot be empty).",
        "ODP events must have at least one key-value pair in identifiers.",
        'ODP data is not valid (value of "price" is not a finite number).',
        "ODP data is not valid.",
    ]
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["delivered"], stats["refused"]["invalid_input"]) == (2, 2, 4)


# ----------------------------------------------------------------- batching


def test_one_hundred_events_make_one_request(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    # A long flush interval: only a full batch (or a flush) sends anything.
    client = installed(odp_server, batch_size=100, flush_interval=60)
    sent = ids("b", 250)

    send(client, sent)
    assert odp_server.wait_for_events(200, timeout=FLUSH_TIMEOUT)
    # Two full batches went out on their own; the last 50 wait for the flush interval.
    assert [len(b) for b in _bodies(odp_server)] == [100, 100]
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    bodies = _bodies(odp_server)
    assert [len(b) for b in bodies] == [100, 100, 50]
    # Each batch holds consecutive events in the order they were sent (two full batches may be
    # in flight at once, so the server may see them in either order).
    batches = sorted(([e["data"]["idempotence_id"] for e in b] for b in bodies), key=lambda b: sent.index(b[0]))
    assert batches == [sent[:100], sent[100:200], sent[200:]]
    assert_delivered_exactly_once(odp_server, sent)


def test_batches_respect_the_byte_cap(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, batch_size=100, max_batch_bytes=2_000)
    sent = ids("bytes", 60)

    send(client, sent)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, sent)
    requests = odp_server.requests
    assert len(requests) > 1
    assert all(r.status == 202 and len(r.body) <= 2_000 for r in requests), [len(r.body) for r in requests]


def test_gzip_bodies_arrive_intact(odp_server: FakeOdpServer, installed: Callable[..., Any]) -> None:
    client = installed(odp_server, gzip=True)
    sent = ids("gz", 20)
    send(client, sent)
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, sent)
    assert all(r.headers.get("content-encoding") == "gzip" for r in odp_server.requests)


def test_api_host_and_key_options_override_the_datafile(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    # The datafile has no ODP integration; the explicit options are enough.
    client = installed(datafile_json=datafile(None, None), api_host=odp_server.url, api_key=TEST_KEY)
    send(client, ids("explicit", 3))
    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, ids("explicit", 3))
    assert log[1].errors() == []


@requires_sdk5
def test_odp_disabled_in_sdk_settings_discards_with_the_sdk_line(
        odp_server: FakeOdpServer, make_client: Callable[..., Any], log: Any) -> None:
    from optimizely.helpers.sdk_settings import OptimizelySdkSettings

    client = make_client(odp_server.url, logger=log[0], settings=OptimizelySdkSettings(odp_disabled=True))
    assert optimizely_odp_ext.install(client, flush_interval=0.05) is True
    send(client, ids("disabled", 2))
    assert client.flush_odp_events(1) is True
    assert log[1].errors() == ["ODP is not enabled.", "ODP is not enabled."]
    assert odp_server.requests == []


@requires_sdk5
def test_request_timeout_comes_from_sdk_settings(
        odp_server: FakeOdpServer, make_client: Callable[..., Any], log: Any) -> None:
    from optimizely.helpers.sdk_settings import OptimizelySdkSettings

    # odp_event_request_timeout=1: a hung request is abandoned after 1 s (the plugin's default is 5 s).
    client = make_client(odp_server.url, logger=log[0],
                         settings=OptimizelySdkSettings(odp_event_request_timeout=1, odp_event_flush_interval=0))
    assert optimizely_odp_ext.install(client, backoff_base=0.05, backoff_max=0.3) is True
    odp_server.hang_next(1)
    send(client, ids("timeout", 3))
    assert client.flush_odp_events(4) is True
    assert_delivered_exactly_once(odp_server, ids("timeout", 3))
    requests = odp_server.requests
    (hung,) = [r for r in requests if r.status == NO_RESPONSE]
    retry = next(r for r in requests if r.status == 202 and r.body == hung.body)
    assert retry.received_at - hung.received_at >= 0.95


# ----------------------------------------------------------------- class-level and instance-level install


def test_class_level_install_covers_clients_made_before_and_after(
        odp_server: FakeOdpServer, make_client: Callable[..., Any], log: Any) -> None:
    before = make_client(odp_server.url, logger=log[0])
    assert optimizely_odp_ext.install(flush_interval=0.05) is True
    try:
        after = make_client(odp_server.url, logger=log[0])
        send(before, ids("before", 3))
        send(after, ids("after", 3))
        assert before.flush_odp_events(FLUSH_TIMEOUT) is True
        assert after.flush_odp_events(FLUSH_TIMEOUT) is True
        assert_delivered_exactly_once(odp_server, ids("before", 3) + ids("after", 3))
        # Each client has its own manager and counts.
        assert before.odp_event_stats()["delivered"] == 3
        assert after.odp_event_stats()["delivered"] == 3
        assert log[1].errors() == []
    finally:
        optimizely_odp_ext.uninstall()
    # After uninstall the client no longer has our method (4.x) or has the SDK's own back (5.x).
    assert not getattr(getattr(type(before), "send_odp_event", None), "_odp_ext_applied", False)


def test_instance_level_install_touches_only_that_client(
        odp_server: FakeOdpServer, installed: Callable[..., Any], make_client: Callable[..., Any]) -> None:
    client = installed(odp_server)
    other = make_client(odp_server.url)
    send(client, ids("mine", 2))

    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    assert_delivered_exactly_once(odp_server, ids("mine", 2))
    assert "send_odp_event" in vars(client)
    assert "send_odp_event" not in vars(other)
    assert not hasattr(other, "odp_event_stats")


# ----------------------------------------------------------------- following datafile updates


def test_key_rotation_applies_to_new_events_only(installed: Callable[..., Any], log: Any) -> None:
    with FakeOdpServer(OLD_KEY, accepted_keys={OLD_KEY, NEW_KEY}) as server:
        client = installed(server, key=OLD_KEY, flush_interval=60)
        send(client, ids("old", 3))
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True
        send(client, ids("old", 3, start=3))  # queued, not sent yet (long flush interval)
        assert len(server.requests) == 1

        # A new datafile (new revision) reaches the client's config manager: the SDK notifies
        # OPTIMIZELY_CONFIG_UPDATE, exactly as a polled datafile update would.
        client.config_manager._set_config(datafile(server.url, NEW_KEY, revision="2"))
        send(client, ids("new", 3))
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True
        client.close()

        by_key = {key: [e["data"]["idempotence_id"] for e in events] for key, events in server.events_by_key().items()}
        assert by_key == {OLD_KEY: ids("old", 6), NEW_KEY: ids("new", 3)}
        assert all(r.status == 202 for r in server.requests)
        assert f"ODP events go to {server.url}/v3/events (key ****0002)." in log[1].lines()
        assert all(OLD_KEY not in line and NEW_KEY not in line for line in log[1].lines())


def test_host_change_applies_to_new_events_only(installed: Callable[..., Any]) -> None:
    with FakeOdpServer(TEST_KEY) as first, FakeOdpServer(TEST_KEY) as second:
        client = installed(first, flush_interval=60)
        send(client, ids("first", 4))
        client.config_manager._set_config(datafile(second.url, TEST_KEY, revision="2"))
        send(client, ids("second", 4))
        assert client.flush_odp_events(FLUSH_TIMEOUT) is True
        client.close()

        assert_delivered_exactly_once(first, ids("first", 4))
        assert_delivered_exactly_once(second, ids("second", 4))


def test_odp_not_integrated_logs_the_sdk_line_and_sends_nothing(
        installed: Callable[..., Any], log: Any) -> None:
    client = installed(datafile_json=datafile(None, None))
    send(client, ids("x", 2))

    assert log[1].errors() == [NOT_INTEGRATED, NOT_INTEGRATED]
    stats = client.odp_event_stats()
    assert (stats["state"], stats["accepted"], stats["requests"]) == ("not_integrated", 0, 0)
    assert client.flush_odp_events(1) is True


def test_datafile_update_removing_odp_stops_new_events_and_keeps_queued_ones(
        odp_server: FakeOdpServer, installed: Callable[..., Any], log: Any) -> None:
    client = installed(odp_server, flush_interval=60)
    send(client, ids("queued", 3))
    client.config_manager._set_config(datafile(None, None, revision="2"))
    send(client, ids("after", 2))

    assert client.flush_odp_events(FLUSH_TIMEOUT) is True
    # Queued under the old settings: still delivered. Sent after: discarded with the SDK's line.
    assert_delivered_exactly_once(odp_server, ids("queued", 3))
    assert log[1].errors() == [NOT_INTEGRATED, NOT_INTEGRATED]


# ----------------------------------------------------------------- events sent before the datafile arrives


def _send_while_datafile_is_held(client: Any, datafile_server: DatafileServer, sent: List[str]) -> None:
    """Sends from another thread while the datafile request is held; proves the sends return first."""
    assert datafile_server.requested.wait(10), "the client never asked for its datafile"
    returned = threading.Event()

    def sender() -> None:
        send(client, sent)
        returned.set()

    thread = threading.Thread(target=sender, name="test-sender")
    thread.start()
    try:
        # The datafile is only released after every send returned: a send that waited for the
        # datafile (as 5.x's own does, in get_config(), up to blocking_timeout=30 s) fails here.
        assert returned.wait(10), "send_odp_event blocked while the datafile was loading"
    finally:
        datafile_server.release()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")  # optimizely-sdk 4.1.1's polling thread
def test_events_sent_before_the_datafile_are_held_then_sent(
        odp_server: FakeOdpServer, log: Any) -> None:
    sent = ids("early", 5)
    with DatafileServer(datafile(odp_server.url, TEST_KEY)) as datafile_server:
        client = polling_client(datafile_server, log[0])
        try:
            assert datafile_server.requested.wait(10)
            assert datafile_server.answered == 0
            assert client.odp_event_stats()["state"] == "undetermined"
            returned = threading.Event()

            def sender() -> None:
                send(client, sent)
                returned.set()

            thread = threading.Thread(target=sender, name="test-sender")
            thread.start()
            try:
                assert returned.wait(10), "send_odp_event blocked while the datafile was loading"
                held = client.odp_event_stats()
                assert (held["state"], held["accepted"], held["queued"], held["requests"]) == \
                    ("undetermined", 5, 5, 0)
                assert datafile_server.answered == 0
                assert odp_server.requests == []
            finally:
                datafile_server.release()
                thread.join(10)

            assert odp_server.wait_for_events(5, timeout=FLUSH_TIMEOUT)
            assert client.flush_odp_events(FLUSH_TIMEOUT) is True
            assert_delivered_exactly_once(odp_server, sent)
            assert log[1].errors() == []
        finally:
            close_polling_client(client, datafile_server)


@pytest.mark.filterwarnings("ignore:setDaemon:DeprecationWarning")
def test_events_sent_before_a_datafile_without_odp_are_discarded_with_one_line(log: Any) -> None:
    sent = ids("early", 5)
    with DatafileServer(datafile(None, None)) as datafile_server:
        client = polling_client(datafile_server, log[0])
        try:
            _send_while_datafile_is_held(client, datafile_server, sent)
            assert client.flush_odp_events(FLUSH_TIMEOUT) is True
            stats = client.odp_event_stats()
            assert (stats["state"], stats["accepted"], stats["pending"], stats["requests"]) == \
                ("not_integrated", 5, 0, 0)
            assert no_drops(stats) == {"not_integrated": 5}
            errors = log[1].errors()
            assert [line for line in errors if line.startswith(NOT_INTEGRATED)] == errors
            assert len(errors) == 1, errors
            # After the datafile, each send is discarded at once with the SDK's own line.
            send(client, ["late"])
            assert log[1].errors()[1:] == [NOT_INTEGRATED]
        finally:
            close_polling_client(client, datafile_server)

