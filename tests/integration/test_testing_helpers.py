"""The public test helpers users build their own tests on: ``odp_datafile``, ``make_client``, the
``odp_client`` fixture (with its undelivered-events check and opt-out marker), and ``odp()``."""

from __future__ import annotations

import json
import logging
from typing import Any, Tuple

import pytest
from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext import OdpClient, odp
from optimizely_odp_ext.testing import FakeOdpServer, make_client, odp_datafile
from tests.conftest import RecordingHandler

pytest_plugins = ["pytester"]

Log = Tuple[logging.Logger, RecordingHandler]
NOT_INSTALLED = "optimizely_odp_ext is not installed on this client"


def test_odp_datafile_is_accepted_by_the_sdk_and_keeps_extra_fields(log: Log) -> None:
    text = odp_datafile("http://127.0.0.1:9", "key-1", revision="42", sdkKey="mine")
    data = json.loads(text)
    assert data["integrations"] == [{"key": "odp", "host": "http://127.0.0.1:9", "publicKey": "key-1"}]
    assert (data["revision"], data["sdkKey"]) == ("42", "mine")
    client = optimizely.Optimizely(datafile=text, logger=log[0])
    assert client.is_valid
    assert client.config_manager.get_config().get_revision() == "42"
    assert log[1].errors() == []


def test_make_client_sends_to_the_server_and_closes(log: Log) -> None:
    with FakeOdpServer("helper-key") as server:
        client = make_client(server, logger=log[0])
        odp(client).send_odp_event("purchased", {"fs_user_id": "u1"}, data={"price": 5.0})
        assert odp(client).flush_odp_events(5)
        client.close()
    assert [(e["action"], e["identifiers"]) for e in server.events] == [("purchased", {"fs_user_id": "u1"})]
    assert server.requests[0].headers["x-api-key"] == "helper-key"
    stats = odp(client).odp_event_stats()
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (1, 1, 0)
    # The plugin's lines and the SDK's go to the logger given.
    assert client.logger is log[0] or getattr(client.logger, "logger", None) is log[0]
    assert any(line.startswith("ODP event manager closed") for line in log[1].lines())


def test_make_client_logs_where_caplog_sees_it(caplog: pytest.LogCaptureFixture) -> None:
    with FakeOdpServer() as server, caplog.at_level(logging.INFO, logger="optimizely_odp_ext.testing.client"):
        client = make_client(server)
        client.send_odp_event("", {"fs_user_id": "u1"})
        client.close()
    assert "ODP action is not valid (cannot be empty)." in caplog.messages
    assert any(line.startswith("ODP event manager closed") for line in caplog.messages)


def test_make_client_install_options_override_the_test_defaults() -> None:
    with FakeOdpServer() as server:
        client = make_client(server, batch_size=2, flush_interval=10.0)
        try:
            for n in range(4):
                client.send_odp_event("a", {"fs_user_id": f"u{n}"})
            # Two full batches leave at once, however long the flush interval.
            assert server.wait_for_events(4, timeout=5)
            assert [len(json.loads(r.body)) for r in server.requests] == [2, 2]
        finally:
            client.close()


def test_odp_returns_the_same_client_and_logs_when_not_installed(log: Log) -> None:
    with FakeOdpServer() as server:
        bare = optimizely.Optimizely(datafile=odp_datafile(server.url, server.api_key), logger=log[0])
        assert odp(bare) is bare
        assert [line for line in log[1].errors() if NOT_INSTALLED in line] == [
            "optimizely_odp_ext is not installed on this client: call optimizely_odp_ext.install() "
            "or install(client) first."]
        log[1].records.clear()
        optimizely_odp_ext.install(bare, flush_interval=0.05)
        try:
            assert odp(bare) is bare
            assert isinstance(bare, OdpClient)
            assert log[1].errors() == []
        finally:
            optimizely_odp_ext.uninstall(bare)
            sdk_close = getattr(bare, "close", None)  # optimizely-sdk 4.1.1 has none
            if callable(sdk_close):
                sdk_close()


def test_odp_knows_a_class_level_install(log: Log, class_installed: None) -> None:
    with FakeOdpServer() as server:
        client = optimizely.Optimizely(datafile=odp_datafile(server.url, server.api_key), logger=log[0])
        try:
            assert odp(client) is client
            assert log[1].errors() == []
        finally:
            client.close()


def test_odp_never_raises_on_anything() -> None:
    thing: Any = object()
    assert odp(thing) is thing
    assert odp(None) is None


# ----------------------------------------------------------------- the odp_client fixture, as users run it

_USER_TESTS = '''
import pytest
from optimizely_odp_ext import odp

def checkout(client, user):
    client.send_odp_event("purchased", {"fs_user_id": user}, data={"price": 50.0})

def test_delivered(odp_client, fake_odp_server):
    checkout(odp_client, "u1")
    assert odp(odp_client).flush_odp_events(timeout=5)
    assert fake_odp_server.events[0]["identifiers"] == {"fs_user_id": "u1"}

def test_refused_fails_at_teardown(odp_client, fake_odp_server):
    fake_odp_server.reject_events(lambda event: True)
    checkout(odp_client, "u2")
    assert odp(odp_client).flush_odp_events(timeout=5)

@pytest.mark.odp_allow_undelivered
def test_refused_allowed(odp_client, fake_odp_server):
    fake_odp_server.reject_events(lambda event: True)
    checkout(odp_client, "u3")
    assert odp(odp_client).flush_odp_events(timeout=5)
    assert odp(odp_client).odp_event_stats()["dropped"]["rejected"] == 1

def test_closed_after_the_test(odp_client):
    pytest.odp_client_seen = odp_client

def test_the_previous_client_is_closed():
    client = pytest.odp_client_seen
    assert client._odp_ext_state.manager.closed
'''


def test_odp_client_fixture_in_a_users_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=_USER_TESTS)
    # --strict-markers: the plugin registers odp_allow_undelivered itself. hypothesis's plugin is
    # slow to set up and not needed here.
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                          "--strict-markers")
    result.assert_outcomes(passed=5, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_refused_fails_at_teardown*",
        "*1 of 1 ODP event(s) accepted by odp_client were not delivered (dropped: {'rejected': 1}, "
        "pending: 0); if the test means it, mark it @pytest.mark.odp_allow_undelivered*",
    ])
