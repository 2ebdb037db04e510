"""Unit tests for optimizely_odp_ext.transport: host checks, key masking, and the real HTTP transport.

The transport tests run for each real transport (Urllib3Transport, the default, and RequestsTransport)
and talk real HTTP to the FakeOdpServer on loopback; proxies and TLS are in test_transport_env.py.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import re
import socket
import time
from typing import Callable, List

import pytest

from optimizely_odp_ext import _compat
from optimizely_odp_ext._version import __version__
from optimizely_odp_ext.event import default_data, encode, join
from optimizely_odp_ext.testing import NO_RESPONSE, FakeOdpServer
from optimizely_odp_ext.transport import (
    Reply,
    RequestsTransport,
    check_host,
    events_url,
    mask_key,
    user_agent,
)
from tests.conftest import TEST_KEY
from tests.unit.conftest import Real

TIMEOUT = (2.0, 2.0)


# ----------------------------------------------------------------- check_host


@pytest.mark.parametrize(
    "host",
    ["https://api.zaius.com", "https://api.zaius.com/", "https://10.0.0.1:8443", "http://127.0.0.1",
     "http://127.0.0.1:8080", "http://127.0.0.2:1", "http://localhost", "http://localhost:3000/",
     "http://LOCALHOST:1", "http://[::1]", "http://[::1]:8080", "HTTPS://API.ZAIUS.COM"],
)
def test_accepted_hosts(host: str) -> None:
    assert check_host(host) is None


def test_plain_http_to_a_remote_host_is_refused() -> None:
    line = check_host("http://example.com")
    assert line == ('ODP host "http://example.com" uses plain http; refusing to send the API key unencrypted '
                    "(use https, or pass allow_insecure_http=True to install()).")
    assert "allow_insecure_http" in line


@pytest.mark.parametrize("host", ["http://example.com", "http://10.1.2.3:80", "http://localhost.evil.com"])
def test_plain_http_allowed_on_request(host: str) -> None:
    assert check_host(host) is not None
    assert check_host(host, allow_insecure_http=True) is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("garbage", 'ODP host "garbage" is not a valid URL (expected https://...).'),
        ("", 'ODP host "" is not a valid URL (expected https://...).'),
        ("ftp://example.com", 'ODP host "ftp://example.com" is not a valid URL (expected https://...).'),
        ("https://", 'ODP host "https://" is not a valid URL (expected https://...).'),
        ("api.zaius.com", 'ODP host "api.zaius.com" is not a valid URL (expected https://...).'),
        ("http://[::1", 'ODP host "http://[::1" is not a valid URL.'),
    ],
)
def test_garbage_hosts_are_refused(host: str, expected: str) -> None:
    assert check_host(host) == expected
    assert check_host(host, allow_insecure_http=True) == expected


# ----------------------------------------------------------------- small helpers


@pytest.mark.parametrize(
    ("host", "url"),
    [("https://api.zaius.com", "https://api.zaius.com/v3/events"),
     ("https://api.zaius.com/", "https://api.zaius.com/v3/events"),
     ("http://127.0.0.1:9///", "http://127.0.0.1:9/v3/events")],
)
def test_events_url(host: str, url: str) -> None:
    assert events_url(host) == url


@pytest.mark.parametrize(
    ("key", "masked"),
    [("W4WzcEs-ABgXorzY7h1LCQ", "****1LCQ"), ("123456789", "****6789"), ("12345678", "****"),
     ("abc", "****"), ("", "****")],
)
def test_mask_key(key: str, masked: str) -> None:
    assert mask_key(key) == masked


@pytest.mark.parametrize("length", range(0, 40))
def test_mask_key_never_reveals_more_than_the_last_four(length: int) -> None:
    key = "".join(chr(ord("a") + i % 26) for i in range(length))
    # Short keys show nothing at all; longer ones their last four characters only.
    assert mask_key(key) == ("****" + key[-4:] if length > 8 else "****")


def test_user_agent() -> None:
    agent = user_agent()
    assert agent.startswith(f"optimizely-odp-ext/{__version__} ")
    assert f" optimizely-sdk/{_compat.sdk_version()} " in agent
    assert " python/" in agent
    assert agent.endswith(" requests/" + __import__("requests").__version__)
    assert user_agent("urllib3/9.9").endswith(" python/" + __import__("platform").python_version() + " urllib3/9.9")


# ----------------------------------------------------------------- the real transports, real HTTP


def _body(count: int = 1) -> bytes:
    defaults = default_data(_compat.sdk_version())
    return join([encode(("fullstack", "bought", {"fs_user_id": f"u{i}"}, {"n": i}), defaults)
                 for i in range(count)])


@pytest.fixture
def transport(make: Callable[..., Real]) -> Real:
    return make()


def test_202(odp_server: FakeOdpServer, transport: Real) -> None:
    body = _body(3)
    reply = transport.send(events_url(odp_server.url), TEST_KEY, body, TIMEOUT)
    assert reply == Reply(202, None, "")
    assert [e["identifiers"] for e in odp_server.events] == [{"fs_user_id": f"u{i}"} for i in range(3)]
    [request] = odp_server.requests
    assert request.path == "/v3/events"
    assert request.body == body


def test_headers(odp_server: FakeOdpServer, transport: Real) -> None:
    transport.send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT)
    [request] = odp_server.requests
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-api-key"] == TEST_KEY
    assert request.headers["user-agent"] == transport.user_agent
    assert transport.user_agent.startswith(user_agent("x")[:-1])
    assert request.headers["user-agent"].startswith("optimizely-odp-ext/")
    assert "content-encoding" not in request.headers


def test_wrong_key_is_401(odp_server: FakeOdpServer, transport: Real) -> None:
    reply = transport.send(events_url(odp_server.url), "wrong-key-000000", _body(), TIMEOUT)
    assert reply.status == 401
    assert reply.retry_after is None
    assert json.loads(reply.detail)["status"] == 401
    assert "wrong-key-000000" not in reply.detail
    assert odp_server.events == []


def test_detail_of_a_400_is_the_servers_body_truncated(odp_server: FakeOdpServer,
                                                       transport: Real) -> None:
    odp_server.reject_events(lambda e: True)
    reply = transport.send(events_url(odp_server.url), TEST_KEY, _body(40), TIMEOUT)
    assert reply.status == 400
    assert len(reply.detail) == 300  # the server's long error body, cut for the log line
    assert re.search(r'"status":\s*400', reply.detail)


def test_network_error_on_a_closed_port(transport: Real) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more: the connection is refused.
    reply = transport.send(f"http://127.0.0.1:{port}/v3/events", TEST_KEY, _body(), TIMEOUT)
    assert reply.status == 0
    assert reply.retry_after is None
    assert reply.detail.startswith("network error: ")
    assert TEST_KEY not in reply.detail


def test_invalid_url_is_a_failed_attempt_not_an_exception(transport: Real) -> None:
    reply = transport.send("nonsense://x/v3/events", TEST_KEY, _body(), TIMEOUT)
    assert reply.status == 0
    expected = "InvalidSchema: " if isinstance(transport, RequestsTransport) else "URLSchemeUnknown: "
    assert reply.detail.startswith(expected)


def test_timeout(odp_server: FakeOdpServer, transport: Real) -> None:
    odp_server.hang_next(1)  # until the server stops: only the client's read timeout ends the request
    reply = transport.send(events_url(odp_server.url), TEST_KEY, _body(), (1.0, 0.2))
    assert reply == Reply(0, None, "timeout")
    assert [r.status for r in odp_server.requests] == [NO_RESPONSE]
    assert odp_server.events == []


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds(odp_server: FakeOdpServer, transport: Real, status: int) -> None:
    odp_server.fail_next(1, status, retry_after="7")
    reply = transport.send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT)
    assert reply.status == status
    assert reply.retry_after == 7.0


def test_retry_after_http_date(odp_server: FakeOdpServer, transport: Real) -> None:
    odp_server.rate_limit_next(1, email.utils.formatdate(time.time() + 120, usegmt=True))
    reply = transport.send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT)
    assert reply.status == 429
    assert reply.retry_after is not None
    assert 100.0 < reply.retry_after <= 120.0


def test_garbage_retry_after_is_none(odp_server: FakeOdpServer, transport: Real) -> None:
    odp_server.rate_limit_next(1, "later")
    reply = transport.send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT)
    assert (reply.status, reply.retry_after) == (429, None)


def test_gzip(odp_server: FakeOdpServer, make: Callable[..., Real]) -> None:
    body = _body(5)
    reply = make(gzip_body=True).send(events_url(odp_server.url), TEST_KEY, body, TIMEOUT)
    assert reply.status == 202
    [request] = odp_server.requests
    assert request.headers["content-encoding"] == "gzip"
    assert gzip.decompress(request.body) == body
    assert len(odp_server.events) == 5
    assert odp_server.events == json.loads(body)


def test_one_keep_alive_connection_for_sequential_requests(odp_server: FakeOdpServer,
                                                          transport: Real) -> None:
    statuses: List[int] = []
    for _ in range(5):
        statuses.append(transport.send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT).status)
    assert statuses == [202] * 5
    assert odp_server.connection_count == 1
    assert len({r.connection_id for r in odp_server.requests}) == 1
    assert len(odp_server.events) == 5


def test_keep_alive_survives_error_replies(odp_server: FakeOdpServer, transport: Real) -> None:
    odp_server.fail_next(1, 503)
    url = events_url(odp_server.url)
    statuses = [transport.send(url, TEST_KEY, _body(), TIMEOUT).status for _ in range(2)]
    statuses.append(transport.send(url, "bad-key-xxxxxxxx", _body(), TIMEOUT).status)
    assert statuses == [503, 202, 401]
    assert odp_server.connection_count == 1


def test_unknown_path_is_a_status_not_an_exception(odp_server: FakeOdpServer, transport: Real) -> None:
    reply = transport.send(odp_server.url + "/elsewhere", TEST_KEY, _body(), TIMEOUT)
    assert reply.status == 404
    assert odp_server.events == []


def test_close_drops_the_pooled_connection_and_is_harmless_twice(odp_server: FakeOdpServer,
                                                                 make: Callable[..., Real]) -> None:
    transport = make()
    url = events_url(odp_server.url)
    assert transport.send(url, TEST_KEY, _body(), TIMEOUT).status == 202
    assert transport.send(url, TEST_KEY, _body(), TIMEOUT).status == 202  # kept alive: the same connection
    transport.close()
    transport.close()
    assert transport.send(url, TEST_KEY, _body(), TIMEOUT).status == 202  # a new one: the old one was closed
    transport.close()
    connections = [r.connection_id for r in odp_server.requests]
    assert connections[0] == connections[1] != connections[2]
    assert odp_server.connection_count == 2


def test_environment_settings_are_read_once_per_url_and_honour_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizely_odp_ext.transport import _environment_settings

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/custom.pem")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    settings = _environment_settings("https://api.zaius.com/v3/events")
    assert settings["proxies"].get("https") == "http://proxy.invalid:3128"
    assert settings["verify"] == "/etc/ssl/certs/custom.pem"
    monkeypatch.setenv("NO_PROXY", "api.zaius.com")
    assert "https" not in _environment_settings("https://api.zaius.com/v3/events")["proxies"]
