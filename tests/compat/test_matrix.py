"""The same behaviour on every cell of the support matrix (SDK 4.1.1, 5.0.x, 5.x latest; Python 3.8+).

Class-level and instance-level install; clients made before and after install; several clients
with their own ODP keys in one process; a client whose datafile is polled from an HTTP server;
and, on 5.x, the SDK's own ODP traffic through our manager (one sender per client).
"""

from __future__ import annotations

import http.server
import threading
from typing import Any, Callable, Dict, Iterator

import pytest
from optimizely import config_manager, optimizely

import optimizely_odp_ext
from optimizely_odp_ext import _compat
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import SDK5, TEST_KEY, requires_sdk5

FAST = {"flush_interval": 0.05, "close_timeout": 5.0}
OTHER_KEY = "other-odp-key-9876543210"


def _ids(server: FakeOdpServer) -> list:  # type: ignore[type-arg]
    return sorted(e["data"]["idempotence_id"] for e in server.events)


@pytest.fixture
def class_level() -> Iterator[None]:
    optimizely_odp_ext.install(**FAST)
    yield
    optimizely_odp_ext.uninstall()


def test_clients_made_before_and_after_class_install_both_deliver(
        odp_server: FakeOdpServer, make_client: Callable[..., Any]) -> None:
    before = make_client(odp_server.url)
    optimizely_odp_ext.install(**FAST)
    try:
        after = make_client(odp_server.url)
        before.send_odp_event("a", {"fs_user_id": "u1"}, data={"idempotence_id": "before"})
        after.send_odp_event("a", {"fs_user_id": "u2"}, data={"idempotence_id": "after"})
        assert before.flush_odp_events(5)
        assert after.flush_odp_events(5)
        assert _ids(odp_server) == ["after", "before"]
        agents = {r.headers.get("user-agent", "").split(" ")[0] for r in odp_server.requests}
        assert agents == {f"optimizely-odp-ext/{optimizely_odp_ext.__version__}"}
    finally:
        optimizely_odp_ext.uninstall()


def test_instance_install_on_one_client_leaves_the_other_alone(
        odp_server: FakeOdpServer, make_client: Callable[..., Any]) -> None:
    ours, theirs = make_client(odp_server.url), make_client(odp_server.url)
    assert optimizely_odp_ext.install(ours, **FAST)
    assert "send_odp_event" in ours.__dict__
    assert "send_odp_event" not in theirs.__dict__
    ours.send_odp_event("a", {"fs_user_id": "u1"}, data={"idempotence_id": "ours"})
    assert ours.flush_odp_events(5)
    assert _ids(odp_server) == ["ours"]
    if SDK5:
        # The other client still has the SDK's own method, untouched.
        assert type(theirs).send_odp_event is optimizely.Optimizely.send_odp_event
        assert not getattr(type(theirs).send_odp_event, "_odp_ext_applied", False)
    else:
        assert not hasattr(theirs, "send_odp_event")


def test_several_clients_with_their_own_odp_keys(make_client: Callable[..., Any], class_level: None) -> None:
    with FakeOdpServer(TEST_KEY, accepted_keys={TEST_KEY, OTHER_KEY}) as server:
        first = make_client(server.url, TEST_KEY, datafile_json=datafile(server.url, TEST_KEY, sdk_key="sdk-a"))
        second = make_client(server.url, OTHER_KEY,
                             datafile_json=datafile(server.url, OTHER_KEY, sdk_key="sdk-b"))
        for i in range(30):
            first.send_odp_event("a", {"fs_user_id": "u"}, data={"idempotence_id": f"a-{i}"})
            second.send_odp_event("b", {"fs_user_id": "u"}, data={"idempotence_id": f"b-{i}"})
        assert first.flush_odp_events(5)
        assert second.flush_odp_events(5)
        by_key = {key: sorted(e["data"]["idempotence_id"] for e in events)
                  for key, events in server.events_by_key().items()}
        assert by_key == {TEST_KEY: sorted(f"a-{i}" for i in range(30)),
                          OTHER_KEY: sorted(f"b-{i}" for i in range(30))}
        workers = [t for t in threading.enumerate() if t.name == "odp-ext-worker"]
        assert len(workers) >= 2


class _DatafileServer:
    """Serves one datafile at /<sdk_key>.json on 127.0.0.1."""

    def __init__(self, body: str) -> None:
        self.body = body.encode()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.template = f"http://127.0.0.1:{self.httpd.server_address[1]}/{{sdk_key}}.json"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.mark.parametrize("level", ["class", "instance"])
def test_client_with_sdk_key_and_polling_config_manager(odp_server: FakeOdpServer, level: str) -> None:
    datafiles = _DatafileServer(datafile(odp_server.url, TEST_KEY, sdk_key="polled"))
    manager = config_manager.PollingConfigManager(sdk_key="polled", url_template=datafiles.template,
                                                  update_interval=30, blocking_timeout=5)
    client = optimizely.Optimizely(sdk_key="polled", config_manager=manager)
    try:
        if level == "class":
            optimizely_odp_ext.install(**FAST)
        else:
            optimizely_odp_ext.install(client, **FAST)
        assert client.config_manager.get_config() is not None  # waits for the first poll
        client.send_odp_event("polled", {"fs_user_id": "u"}, data={"idempotence_id": "p-1"})
        assert client.flush_odp_events(5)
        assert _ids(odp_server) == ["p-1"]
        assert odp_server.requests[0].headers["x-api-key"] == TEST_KEY
    finally:
        optimizely_odp_ext.uninstall(None if level == "class" else client)
        if hasattr(client, "close"):  # 4.1.1 has no close() of its own
            client.close()
        # 4.1.1's poller has no stop(): its daemon thread sleeps update_interval (30 s) between polls
        # and finds the datafile server gone; nothing of the plugin's is left running.
        if callable(getattr(manager, "stop", None)):
            manager.stop()
        datafiles.stop()


def _odp_threads() -> Dict[str, int]:
    names: Dict[str, int] = {}
    for thread in threading.enumerate():
        names[thread.name] = names.get(thread.name, 0) + 1
    return names


@requires_sdk5
def test_sdk_identify_events_go_through_our_manager_and_back_after_uninstall(
        odp_server: FakeOdpServer, make_client: Callable[..., Any], class_level: None) -> None:
    from optimizely.odp.odp_event_manager import OdpEventManager

    client = make_client(odp_server.url)
    sdk_manager = client.odp_manager.event_manager
    assert isinstance(sdk_manager, OdpEventManager)
    # The SDK's own identify path (create_user_context calls it; 5.0 passes a user id, later 5.x a dict).
    if _compat.sdk_version_tuple() < (5, 1, 0):
        client.create_user_context("user-1")
    else:
        client._identify_user({"fs_user_id": "user-1", "email": "u@example.com"})
    bridge = client.odp_manager.event_manager
    assert type(bridge).__name__ == "SdkEventManagerBridge"
    # The SDK's thread is handed over and stopped in the background (its stop() joins the thread).
    sdk_manager.thread.join(10)
    assert not sdk_manager.is_running
    assert client.flush_odp_events(5)
    identified = [e for e in odp_server.events if e["action"] == "identified"]
    assert [e["identifiers"]["fs_user_id"] for e in identified] == ["user-1"]
    assert all(r.headers["user-agent"].startswith("optimizely-odp-ext/") for r in odp_server.requests)

    optimizely_odp_ext.uninstall()
    restored = client.odp_manager.event_manager
    assert isinstance(restored, OdpEventManager)
    assert restored.is_running
    optimizely_odp_ext.install(**FAST)  # the fixture's uninstall() expects it installed


def test_setup_cfg_and_compat_agree_on_the_supported_range() -> None:
    import configparser
    import pathlib

    cfg = configparser.ConfigParser()
    cfg.read(pathlib.Path(__file__).resolve().parents[2] / "setup.cfg")
    line = next(x for x in cfg["options"]["install_requires"].splitlines() if x.startswith("optimizely-sdk"))
    assert line.replace(" ", "") == "optimizely-sdk" + _compat.SUPPORTED_SDK.replace(" ", "")
    assert _compat.is_supported_sdk(_compat.sdk_version_tuple())
