"""Tests for the fake ODP server in optimizely_odp_ext.testing."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import struct
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from optimizely_odp_ext import testing as odp_testing
from optimizely_odp_ext.settings import MAX_IN_FLIGHT
from optimizely_odp_ext.testing import NO_RESPONSE, FakeOdpServer

pytest_plugins = ["pytester"]

# Use the fixture the module ships as a pytest plugin (works whether or not the package's
# entry point is installed).
fake_odp_server = odp_testing.fake_odp_server

KEY = "test-odp-key"
Response = Tuple[int, Dict[str, str], Any]


def event(i: int = 0, **data: Any) -> Dict[str, Any]:
    return {
        "type": "fullstack",
        "action": "identified",
        "identifiers": {"fs_user_id": f"user-{i}"},
        "data": {"idempotence_id": f"id-{i}", **data},
    }


def parse_body(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


def send(
    conn: http.client.HTTPConnection,
    body: bytes | str | Any,
    *,
    key: Optional[str] = KEY,
    path: str = "/v3/events",
    method: str = "POST",
    headers: Optional[Dict[str, str]] = None,
) -> Response:
    if isinstance(body, str):
        raw = body.encode("utf-8")
    elif isinstance(body, bytes):
        raw = body
    else:
        raw = json.dumps(body).encode("utf-8")
    all_headers = {"Content-Type": "application/json"}
    if key is not None:
        all_headers["x-api-key"] = key
    all_headers.update(headers or {})
    conn.request(method, path, body=raw, headers=all_headers)
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parse_body(resp.read())


def post(server: FakeOdpServer, body: bytes | str | Any, *, timeout: float = 5.0, **kw: Any) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        return send(conn, body, **kw)
    finally:
        conn.close()


def invalid_indexes(payload: Any) -> List[int]:
    return [item["event"] for item in payload["detail"]["invalids"]]


@pytest.fixture
def server() -> Iterator[FakeOdpServer]:
    with FakeOdpServer() as srv:
        yield srv


# -- happy path -----------------------------------------------------------------------------


def test_batch_is_accepted_with_202_and_recorded(server: FakeOdpServer) -> None:
    batch = [event(1), event(2)]
    status, headers, payload = post(server, batch)

    assert status == 202
    assert headers["content-type"] == "application/json"
    assert payload["title"] == "Accepted"
    assert payload["status"] == 202
    assert payload["timestamp"].endswith("Z")
    assert server.events == batch
    [req] = server.requests
    assert req.status == 202
    assert req.path == "/v3/events"
    assert req.headers["x-api-key"] == KEY
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.body) == batch
    assert req.connection_id == 1
    assert req.received_at <= time.monotonic()


def test_events_round_trip_exactly(server: FakeOdpServer) -> None:
    batch = [
        {
            "type": "fullstack",
            "action": "client_initialized",
            "identifiers": {"fs_user_id": "üser-1", "email": "a@b.c"},
            "data": {
                "s": "text ✓",
                "i": 42,
                "big": 2**62,
                "f": 1.5,
                "neg": -0.25,
                "t": True,
                "false": False,
                "none": None,
                "empty": "",
            },
        },
        event(7),
    ]
    status, _, _ = post(server, batch)

    assert status == 202
    got = server.events
    assert got == batch
    assert type(got[0]["data"]["i"]) is int
    assert type(got[0]["data"]["t"]) is bool
    assert server.events_by_key() == {KEY: batch}


def test_observers_return_copies(server: FakeOdpServer) -> None:
    post(server, [event(1)])
    server.events[0]["type"] = "mutated"
    server.events_by_key()[KEY].clear()
    server.requests[0].headers["x-api-key"] = "mutated"

    assert server.events[0]["type"] == "fullstack"
    assert len(server.events_by_key()[KEY]) == 1
    assert server.requests[0].headers["x-api-key"] == KEY


def test_single_event_object_is_accepted(server: FakeOdpServer) -> None:
    status, _, _ = post(server, event(3))
    assert status == 202
    assert server.events == [event(3)]


def test_gzip_body_is_decoded(server: FakeOdpServer) -> None:
    raw = gzip.compress(json.dumps([event(1)]).encode())
    status, _, _ = post(server, raw, headers={"Content-Encoding": "gzip"})
    assert status == 202
    assert server.events == [event(1)]
    assert server.requests[0].body == raw


def test_url_and_port(server: FakeOdpServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["wrong-key", "", None])
def test_wrong_or_missing_key_is_401(server: FakeOdpServer, key: Optional[str]) -> None:
    status, _, payload = post(server, [event()], key=key)
    assert status == 401
    assert payload["status"] == 401
    assert server.events == []
    assert [r.status for r in server.requests] == [401]


def test_accepted_keys_and_events_by_key() -> None:
    with FakeOdpServer("a", accepted_keys=["a", "b"]) as srv:
        assert post(srv, [event(1)], key="a")[0] == 202
        assert post(srv, [event(2)], key="b")[0] == 202
        assert post(srv, [event(3)], key="a")[0] == 202
        assert post(srv, [event(4)], key="c")[0] == 401
        assert srv.events_by_key() == {"a": [event(1), event(3)], "b": [event(2)]}
        assert srv.events == [event(1), event(2), event(3)]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v3/event"), ("POST", "/v2/events"), ("POST", "/"), ("GET", "/v3/events")],
)
def test_other_paths_and_methods_are_404(server: FakeOdpServer, method: str, path: str) -> None:
    status, _, payload = post(server, [event()], path=path, method=method)
    assert status == 404
    assert payload["status"] == 404
    assert server.events == []
    assert server.requests[0].path == path


def test_wrong_content_type_is_refused(server: FakeOdpServer) -> None:
    status, _, _ = post(server, [event()], headers={"Content-Type": "text/plain"})
    assert status == 415
    assert server.events == []


def test_content_type_with_charset_is_accepted(server: FakeOdpServer) -> None:
    status, _, _ = post(server, [event()], headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 202


def _bad(**changes: Any) -> Dict[str, Any]:
    ev = event(9)
    for field, value in changes.items():
        if value is _DELETE:
            del ev[field]
        else:
            ev[field] = value
    return ev


_DELETE = object()


@pytest.mark.parametrize(
    "bad_json",
    [
        pytest.param('{"type": "t", "action": "a", "identifiers": {"x": "1"}, "data": {"n": NaN}}', id="nan"),
        pytest.param('{"type": "t", "action": "a", "identifiers": {"x": "1"}, "data": {"n": Infinity}}', id="inf"),
        pytest.param('{"type": "t", "action": "a", "identifiers": {"x": "1"}, "data": {"n": -Infinity}}', id="-inf"),
        pytest.param("[{]", id="syntax"),
        pytest.param("[]", id="empty-batch"),
        pytest.param('"just a string"', id="not-array"),
    ],
)
def test_malformed_body_is_400(server: FakeOdpServer, bad_json: str) -> None:
    status, _, payload = post(server, bad_json)
    assert status == 400
    assert payload["title"] == "Bad Request"
    assert "invalids" in payload["detail"]
    assert server.events == []
    assert server.requests[0].status == 400


@pytest.mark.parametrize(
    "bad_event",
    [
        pytest.param(_bad(type=_DELETE), id="missing-type"),
        pytest.param(_bad(action=_DELETE), id="missing-action"),
        pytest.param(_bad(identifiers=_DELETE), id="missing-identifiers"),
        pytest.param(_bad(data=_DELETE), id="missing-data"),
        pytest.param(_bad(extra="x"), id="unknown-field"),
        pytest.param(_bad(type=""), id="empty-type"),
        pytest.param(_bad(action=3), id="non-string-action"),
        pytest.param(_bad(identifiers={"fs_user_id": 123}), id="non-string-identifier"),
        pytest.param(_bad(identifiers={"fs_user_id": None}), id="null-identifier"),
        pytest.param(_bad(identifiers={}), id="empty-identifiers"),
        pytest.param(_bad(identifiers=["fs_user_id"]), id="identifiers-not-object"),
        pytest.param(_bad(data={"nested": {"a": 1}}), id="nested-data-object"),
        pytest.param(_bad(data={"list": [1, 2]}), id="nested-data-list"),
        pytest.param(_bad(data="x"), id="data-not-object"),
        pytest.param("not an event", id="event-not-object"),
    ],
)
def test_invalid_event_refuses_whole_batch(server: FakeOdpServer, bad_event: Any) -> None:
    status, _, payload = post(server, [event(0), bad_event, event(2)])

    assert status == 400
    assert invalid_indexes(payload) == [1]
    assert payload["detail"]["invalids"][0]["message"]
    assert server.events == []


def test_number_overflowing_to_infinity_is_400(server: FakeOdpServer) -> None:
    body = '[{"type": "t", "action": "a", "identifiers": {"x": "1"}, "data": {"x": 1e400}}]'
    status, _, payload = post(server, body)
    assert status == 400
    assert invalid_indexes(payload) == [0]
    assert server.events == []


def test_invalid_batch_lists_every_bad_index(server: FakeOdpServer) -> None:
    batch = [_bad(data={"n": [1]}), event(1), _bad(identifiers={}), event(3)]
    status, _, payload = post(server, batch)
    assert status == 400
    assert invalid_indexes(payload) == [0, 2]


def test_reject_events_predicate(server: FakeOdpServer) -> None:
    server.reject_events(lambda e: e["data"].get("bad") is True)
    batch = [event(0), event(1, bad=True), event(2), event(3, bad=True)]

    status, _, payload = post(server, batch)
    assert status == 400
    assert invalid_indexes(payload) == [1, 3]
    assert server.events == []

    assert post(server, [event(0), event(2)])[0] == 202
    server.reject_events(None)
    assert post(server, batch)[0] == 202
    assert len(server.events) == 6


def test_raising_predicate_is_500_not_a_hang(server: FakeOdpServer) -> None:
    server.reject_events(lambda e: 1 / 0 > 0)
    status, _, payload = post(server, [event()])
    assert status == 500
    assert "ZeroDivisionError" in payload["detail"]["message"]
    assert server.events == []


def test_corrupt_gzip_is_400(server: FakeOdpServer) -> None:
    raw = gzip.compress(json.dumps([event()]).encode())
    status, _, payload = post(server, raw[:10] + b"garbage" + raw[17:], headers={"Content-Encoding": "gzip"})
    assert status == 400
    assert "gzip" in payload["detail"]["message"]


def test_unsupported_content_encoding_is_415(server: FakeOdpServer) -> None:
    status, _, _ = post(server, [event()], headers={"Content-Encoding": "br"})
    assert status == 415


def test_body_above_max_is_413() -> None:
    small = json.dumps([event(1)]).encode()
    with FakeOdpServer(max_body_bytes=len(small)) as srv:
        assert post(srv, small)[0] == 202
        big = json.dumps([event(1), event(2)]).encode()
        status, _, payload = post(srv, big)
        assert status == 413
        assert payload["status"] == 413
        assert srv.events == [event(1)]
        assert [r.status for r in srv.requests] == [202, 413]


# -- faults ---------------------------------------------------------------------------------


def test_fail_next_with_retry_after(server: FakeOdpServer) -> None:
    server.fail_next(2, status=500, retry_after="7")
    server.fail_next(1)  # queued after the first two

    first = post(server, [event(1)])
    second = post(server, [event(2)])
    third = post(server, [event(3)])
    fourth = post(server, [event(4)])

    assert (first[0], first[1]["retry-after"]) == (500, "7")
    assert (second[0], second[1]["retry-after"]) == (500, "7")
    assert third[0] == 503
    assert "retry-after" not in third[1]
    assert fourth[0] == 202
    assert server.events == [event(4)]
    assert [r.status for r in server.requests] == [500, 500, 503, 202]


def test_fail_next_does_not_consume_on_404(server: FakeOdpServer) -> None:
    server.fail_next(1)
    assert post(server, [event()], path="/nope")[0] == 404
    assert post(server, [event()])[0] == 503
    assert post(server, [event()])[0] == 202


def test_rate_limit_next(server: FakeOdpServer) -> None:
    server.rate_limit_next(1, retry_after="2")
    status, headers, payload = post(server, [event()])
    assert status == 429
    assert headers["retry-after"] == "2"
    assert payload["status"] == 429
    assert post(server, [event()])[0] == 202


def test_fail_for_window(server: FakeOdpServer) -> None:
    window = 0.3
    started = time.monotonic()
    server.fail_for(window, status=502, retry_after="1")

    status, headers, _ = post(server, [event(1)])
    assert status == 502
    assert headers["retry-after"] == "1"

    deadline = started + window + 3.0
    statuses = []
    while time.monotonic() < deadline:
        status = post(server, [event(2)])[0]
        statuses.append(status)
        if status == 202:
            break
        time.sleep(0.05)
    assert statuses[-1] == 202
    assert time.monotonic() - started >= window
    assert set(statuses[:-1]) <= {502}
    assert server.events == [event(2)]


def test_reset_connection_every_third_request(server: FakeOdpServer) -> None:
    server.reset_connection_every(3)
    assert post(server, [event(1)])[0] == 202
    assert post(server, [event(2)])[0] == 202
    with pytest.raises(ConnectionResetError):
        post(server, [event(3)])
    assert post(server, [event(4)])[0] == 202
    assert server.events == [event(1), event(2), event(4)]
    assert [r.status for r in server.requests] == [202, 202, NO_RESPONSE, 202]

    server.reset_connection_every(None)
    for i in range(3):
        assert post(server, [event(10 + i)])[0] == 202


def test_reset_connection_sends_rst(server: FakeOdpServer) -> None:
    server.reset_connection_every(1)
    with pytest.raises(ConnectionResetError) as info:
        post(server, [event()])
    # A graceful close would surface as RemoteDisconnected; an RST is a plain ECONNRESET.
    assert not isinstance(info.value, http.client.RemoteDisconnected)


def test_latency_delays_answers(server: FakeOdpServer) -> None:
    server.set_latency(0.2)
    started = time.monotonic()
    assert post(server, [event()])[0] == 202
    assert time.monotonic() - started >= 0.2
    server.set_latency(0)
    started = time.monotonic()
    assert post(server, [event()])[0] == 202
    assert time.monotonic() - started < 0.2


def test_hang_released_by_stop_quickly() -> None:
    srv = FakeOdpServer().start()
    try:
        srv.hang_next(1)
        outcome: List[BaseException | Response] = []

        def client() -> None:
            try:
                outcome.append(post(srv, [event()], timeout=10))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        assert srv.wait_for_requests(1, timeout=5)
        time.sleep(0.1)
        assert thread.is_alive()  # still hanging
    finally:
        started = time.monotonic()
        srv.stop()
        stop_took = time.monotonic() - started
    assert stop_took < 2.0
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], OSError)  # closed without an answer
    assert srv.events == []
    assert [r.status for r in srv.requests] == [NO_RESPONSE]


def test_hang_with_seconds_and_client_timeout(server: FakeOdpServer) -> None:
    server.hang_next(1, seconds=0.5)
    with pytest.raises(socket.timeout):
        post(server, [event(1)], timeout=0.1)

    server.hang_next(1, seconds=0.2)
    started = time.monotonic()
    with pytest.raises(http.client.RemoteDisconnected):
        post(server, [event(2)], timeout=5)
    assert 0.15 <= time.monotonic() - started < 2.0

    assert post(server, [event(3)])[0] == 202
    assert server.events == [event(3)]


def test_keep_alive_connection_is_counted_once(server: FakeOdpServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        assert send(conn, [event(1)])[0] == 202
        assert send(conn, [event(2)])[0] == 202
    finally:
        conn.close()
    assert server.connection_count == 1
    first, second = server.requests
    assert first.connection_id == second.connection_id

    assert post(server, [event(3)])[0] == 202
    assert server.connection_count == 2
    assert server.requests[2].connection_id != first.connection_id


def test_keep_alive_survives_refusals(server: FakeOdpServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        assert send(conn, [event()], key="bad")[0] == 401
        assert send(conn, "[{]")[0] == 400
        assert send(conn, [event()], path="/x")[0] == 404
        assert send(conn, [event()])[0] == 202
    finally:
        conn.close()
    assert server.connection_count == 1


def test_wait_for_events(server: FakeOdpServer) -> None:
    started = time.monotonic()
    assert server.wait_for_events(1, timeout=0.1) is False
    assert 0.09 <= time.monotonic() - started < 1.0

    timer = threading.Timer(0.05, lambda: post(server, [event(1), event(2)]))
    timer.start()
    try:
        assert server.wait_for_events(2, timeout=5) is True
    finally:
        timer.join(5)
    assert len(server.events) == 2
    assert server.wait_for_events(3, timeout=0.05) is False


def test_wait_for_requests_counts_failures(server: FakeOdpServer) -> None:
    assert server.wait_for_requests(1, timeout=0.05) is False
    post(server, [event()], key="nope")
    assert server.wait_for_requests(1, timeout=1) is True
    assert server.events == []


def test_reset_clears_records_and_faults(server: FakeOdpServer) -> None:
    post(server, [event(1)])
    server.fail_next(5)
    server.hang_next(1)
    server.set_latency(5)
    server.reject_events(lambda e: True)
    server.reset_connection_every(1)

    server.reset()

    assert server.events == []
    assert server.requests == []
    assert server.connection_count == 0
    started = time.monotonic()
    assert post(server, [event(2)])[0] == 202
    assert time.monotonic() - started < 1.0
    assert server.events == [event(2)]
    assert server.connection_count == 1


def test_stop_is_idempotent_and_closes_idle_keep_alive() -> None:
    srv = FakeOdpServer().start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        assert send(conn, [event()])[0] == 202  # connection stays open (keep-alive)
        started = time.monotonic()
        srv.stop()
        srv.stop()
        assert time.monotonic() - started < 2.0
        with pytest.raises(ConnectionError):  # the idle keep-alive connection was closed
            send(conn, [event()])
    finally:
        conn.close()
    with pytest.raises(ConnectionRefusedError):
        post(srv, [event()], timeout=1)
    with pytest.raises(RuntimeError):
        srv.start()


def test_argument_validation() -> None:
    srv = FakeOdpServer()
    with pytest.raises(ValueError, match="count"):
        srv.fail_next(-1)
    with pytest.raises(ValueError, match="status"):
        srv.fail_next(1, status=99)
    with pytest.raises(ValueError, match="seconds"):
        srv.set_latency(-1)
    with pytest.raises(ValueError, match="n must be"):
        srv.reset_connection_every(0)
    with pytest.raises(RuntimeError):
        _ = srv.port
    srv.stop()  # never started: no-op


# -- the pytest fixture ---------------------------------------------------------------------


def test_fixture_gives_a_running_server(fake_odp_server: FakeOdpServer) -> None:
    assert isinstance(fake_odp_server, FakeOdpServer)
    assert fake_odp_server.api_key == "test-odp-key"
    assert post(fake_odp_server, [event()])[0] == 202
    assert fake_odp_server.events == [event()]


def test_fixture_stops_the_server_after_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import json, urllib.error, urllib.request
        import pytest
        from optimizely_odp_ext import testing

        fake_odp_server = testing.fake_odp_server
        SEEN = []
        EVENT = {"type": "t", "action": "a", "identifiers": {"id": "1"}, "data": {}}

        def test_use(fake_odp_server):
            SEEN.append(fake_odp_server.url)
            req = urllib.request.Request(
                fake_odp_server.url + "/v3/events",
                data=json.dumps([EVENT]).encode(),
                headers={"content-type": "application/json", "x-api-key": fake_odp_server.api_key},
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=2) as resp:
                assert resp.status == 202
            assert fake_odp_server.events == [EVENT]

        def test_after():
            with pytest.raises(urllib.error.URLError) as info:
                urllib.request.urlopen(SEEN[0] + "/v3/events", timeout=2)
            assert not isinstance(info.value, urllib.error.HTTPError)  # refused, not answered
        """
    )
    # hypothesis's plugin is slow to set up and not needed here.
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    result.assert_outcomes(passed=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the listen backlog from Linux's TCP_INFO")
def test_the_listen_backlog_takes_every_connection_a_client_may_open_at_once(server: FakeOdpServer) -> None:
    # socketserver's default backlog (5) dropped the SYNs of a client opening more connections at
    # once (max_in_flight up to 64): the kernel retried them a second later, a stall no ODP shows.
    # For a listening socket, Linux reports its backlog in tcp_info's tcpi_sacked field.
    listening = server._server.socket  # type: ignore[union-attr]
    info = listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    backlog = struct.unpack_from("8B6I", info)[13]
    assert backlog >= MAX_IN_FLIGHT
