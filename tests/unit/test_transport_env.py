"""The real transports and the environment: proxies, CA bundles and TLS, each against real loopback servers.

``requests`` reads ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``
(``trust_env``); both transports must honour them the same way. The https server is the FakeOdpServer with
its listening socket wrapped in TLS (a self-signed certificate for 127.0.0.1 made with the ``openssl``
command line); the proxy is a small forwarding proxy below (absolute-URI requests and ``CONNECT``), which
records what it was asked. Everything listens on 127.0.0.1 only and is stopped by the test that starts it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest

from optimizely_odp_ext.event import default_data, encode, join
from optimizely_odp_ext.manager import EventManager
from optimizely_odp_ext.settings import make_options
from optimizely_odp_ext.testing import FakeOdpServer
from optimizely_odp_ext.transport import RequestsTransport, Urllib3Transport, default_transport, events_url
from tests.conftest import TEST_KEY
from tests.unit.conftest import Real

TIMEOUT = (5.0, 5.0)
_ENVIRONMENT = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test states the proxy and CA variables it means (this machine sets CA bundles globally)."""
    for name in _ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def _body(count: int = 2) -> bytes:
    return join([encode(("fullstack", "bought", {"fs_user_id": f"u{i}"}, {"n": i}), default_data("5.7.0"))
                 for i in range(count)])


# ----------------------------------------------------------------- a loopback forwarding proxy


class _ProxyHandler(socketserver.BaseRequestHandler):
    server: LoopbackProxy

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(10)
        reader = client.makefile("rb")
        while True:  # one client connection may carry several requests (keep-alive)
            line = reader.readline(65537).decode("latin-1")
            if not line.strip():
                return
            method, target, _version = line.split(" ", 2)
            headers = http.client.parse_headers(reader)  # type: ignore[arg-type]
            self.server.record(method, target, headers.get("proxy-authorization"))
            if method == "CONNECT":
                self._tunnel(client, reader, target)
                return
            self._forward(client, reader, method, target, headers)

    def _tunnel(self, client: socket.socket, reader: Any, target: str) -> None:
        host, port = target.rsplit(":", 1)
        if host != "127.0.0.1":
            client.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            return
        with socket.create_connection((host, int(port)), timeout=10) as upstream:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            pending = reader.peek(0) if hasattr(reader, "peek") else b""
            if pending:
                upstream.sendall(reader.read(len(pending)))
            pump = threading.Thread(target=_pipe, args=(upstream, client), name="test-proxy-pump", daemon=True)
            pump.start()
            _pipe(client, upstream)
            pump.join(10)

    def _forward(self, client: socket.socket, reader: Any, method: str, target: str, headers: Any) -> None:
        parts = target.split("/", 3)  # http:, '', host:port, path
        host, port = parts[2].rsplit(":", 1)
        assert host == "127.0.0.1", target
        body = reader.read(int(headers.get("content-length", 0)))
        forwarded = {k: v for k, v in headers.items() if not k.lower().startswith("proxy-")}
        upstream = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            upstream.request(method, "/" + parts[3], body=body, headers=forwarded)
            reply = upstream.getresponse()
            data = reply.read()
        finally:
            upstream.close()
        head = [f"HTTP/1.1 {reply.status} {reply.reason}"]
        head += [f"{k}: {v}" for k, v in reply.getheaders() if k.lower() not in ("content-length", "connection")]
        head.append(f"content-length: {len(data)}")
        client.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copies bytes until either side closes (every read bounded by the sockets' timeouts)."""
    try:
        for _ in range(100_000):
            chunk = source.recv(65536)
            if not chunk:
                break
            sink.sendall(chunk)
    except OSError:
        pass
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class LoopbackProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy on 127.0.0.1 that forwards only to 127.0.0.1 and records every request line."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.seen: List[Tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="test-proxy", daemon=True)

    def record(self, method: str, target: str, authorization: Any) -> None:
        with self._lock:
            self.seen.append((method, target, authorization))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> LoopbackProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


# ----------------------------------------------------------------- TLS on loopback


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own trust anchor) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-addext",
                    "basicConstraints=critical,CA:TRUE", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_server(certificate: Tuple[Path, Path]) -> Iterator[FakeOdpServer]:
    """The FakeOdpServer speaking https: its listening socket wrapped before any client connects."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    with FakeOdpServer(TEST_KEY) as server:
        inner = server._server
        assert inner is not None
        # The handshake happens in the handler thread, on its first read: a client that rejects the
        # certificate costs the accept loop nothing.
        inner.socket = context.wrap_socket(inner.socket, server_side=True, do_handshake_on_connect=False)
        yield server


def https_url(server: FakeOdpServer) -> str:
    return events_url(f"https://127.0.0.1:{server.port}")


# ----------------------------------------------------------------- the tests


def test_an_untrusted_certificate_fails_as_a_network_error(tls_server: FakeOdpServer,
                                                           make: Callable[..., Real]) -> None:
    reply = make().send(https_url(tls_server), TEST_KEY, _body(), TIMEOUT)
    assert reply.status == 0
    assert "certificate" in reply.detail.lower()
    assert tls_server.events == []


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_ca_bundle_from_the_environment_is_trusted(tls_server: FakeOdpServer, make: Callable[..., Real],
                                                     certificate: Tuple[Path, Path], variable: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, str(certificate[0]))
    body = _body(3)
    transport = make()
    replies = [transport.send(https_url(tls_server), TEST_KEY, body, TIMEOUT).status for _ in range(2)]
    assert replies == [202, 202]
    assert [r.body for r in tls_server.requests] == [body, body]
    assert tls_server.connection_count == 1  # kept alive over TLS too


def test_a_bundle_that_does_not_hold_the_certificate_fails(tls_server: FakeOdpServer, make: Callable[..., Real],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other",
                    "-keyout", str(tmp_path / "other.key"), "-out", str(other)],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other))
    assert make().send(https_url(tls_server), TEST_KEY, _body(), TIMEOUT).status == 0
    assert tls_server.events == []


@pytest.mark.parametrize(("form", "credentials"), [("http://user:s%40cret@{}", b"user:s@cret"),
                                                    ("{}", None)])  # no scheme: http, as for requests
def test_http_proxy_forwards_with_its_credentials(odp_server: FakeOdpServer, make: Callable[..., Real],
                                                  monkeypatch: pytest.MonkeyPatch, form: str,
                                                  credentials: Optional[bytes]) -> None:
    with LoopbackProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", form.format(proxy.url[len("http://"):]))
        body = _body(2)
        transport = make()
        statuses = [transport.send(events_url(odp_server.url), TEST_KEY, body, TIMEOUT).status for _ in range(2)]
    assert statuses == [202, 202]
    assert [r.body for r in odp_server.requests] == [body, body]
    expected = None if credentials is None else "Basic " + base64.b64encode(credentials).decode()
    assert proxy.seen == [("POST", events_url(odp_server.url), expected)] * 2


def test_https_goes_through_the_proxy_by_connect(tls_server: FakeOdpServer, make: Callable[..., Real],
                                                 certificate: Tuple[Path, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    with LoopbackProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        reply = make().send(https_url(tls_server), TEST_KEY, _body(4), TIMEOUT)
    assert reply.status == 202
    assert len(tls_server.events) == 4
    assert proxy.seen == [("CONNECT", f"127.0.0.1:{tls_server.port}", None)]


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1:1,127.0.0.1", "*"])
def test_no_proxy_bypasses_the_proxy(odp_server: FakeOdpServer, make: Callable[..., Real], no_proxy: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with LoopbackProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        reply = make().send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT)
    assert reply.status == 202
    assert proxy.seen == []
    assert len(odp_server.events) == 2


def test_a_proxy_that_is_down_is_a_network_error(odp_server: FakeOdpServer, make: Callable[..., Real],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    reply = make().send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT)
    assert reply.status == 0
    assert reply.detail.startswith("network error: ")
    assert odp_server.requests == []


def test_the_environment_is_read_once_per_url(odp_server: FakeOdpServer, make: Callable[..., Real],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    transport = make()
    assert transport.send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT).status == 202
    # A proxy named later is not seen by this transport (requests' merge_environment_settings is the
    # costly part of a POST); a new transport (after a fork, a new client) reads it.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert transport.send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT).status == 202


def test_socks_proxies_are_left_to_requests_and_http_ones_are_not(odp_server: FakeOdpServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:9")
    transport = Urllib3Transport()
    try:
        url = "http://127.0.0.1:9/v3/events"
        reply = transport.send(url, TEST_KEY, _body(), (0.5, 0.5))
        assert reply.status == 0  # PySocks missing or nothing listening: a failed attempt, never a raise
        assert isinstance(transport._routes[url].fallback, RequestsTransport)
        monkeypatch.setenv("HTTP_PROXY", "127.0.0.1:9")  # read for a URL not seen yet
        assert transport.send(events_url(odp_server.url), TEST_KEY, _body(), TIMEOUT).status == 0
        assert transport._routes[events_url(odp_server.url)].fallback is None
    finally:
        transport.close()


def test_timeouts_are_passed_as_connect_and_read(odp_server: FakeOdpServer) -> None:
    transport = Urllib3Transport()
    try:
        assert transport.send(events_url(odp_server.url), TEST_KEY, _body(), (1.5, 2.5)).status == 202
        [limits] = transport._timeouts.values()
        assert (limits.connect_timeout, limits.read_timeout) == (1.5, 2.5)
    finally:
        transport.close()


def test_concurrent_senders_share_the_pool(odp_server: FakeOdpServer) -> None:
    transport = Urllib3Transport(pool_size=4)
    statuses: List[int] = []
    url = events_url(odp_server.url)

    def post(count: int) -> None:
        for _ in range(count):
            statuses.append(transport.send(url, TEST_KEY, _body(1), TIMEOUT).status)

    threads = [threading.Thread(target=post, args=(25,), name=f"test-post-{n}") for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        transport.close()
    assert statuses == [202] * 100
    assert len(odp_server.events) == 100
    assert odp_server.connection_count <= 4


def test_default_transport_is_urllib3_with_the_options() -> None:
    options = make_options(api_host="https://api.zaius.com", api_key=TEST_KEY, max_in_flight=7, gzip=True)
    transport = default_transport(options)
    try:
        assert isinstance(transport, Urllib3Transport)
        assert (transport._pool_size, transport._gzip) == (7, True)
    finally:
        transport.close()


def test_a_manager_on_the_default_transport_delivers(odp_server: FakeOdpServer) -> None:
    """The manager built with default_transport, end to end (manager.py's default is switched at merge)."""
    options = make_options(api_host=odp_server.url, api_key=TEST_KEY, flush_at_exit=False, gzip=True)
    built: List[Any] = []

    def factory(opts: Any) -> Any:
        built.append(default_transport(opts))
        return built[-1]

    events = EventManager(options, logging.getLogger("test"), transport_factory=factory)
    try:
        for i in range(250):
            events.enqueue(("fullstack", "bought", {"fs_user_id": f"u{i}"}, {"idempotence_id": f"id-{i}"}))
        assert events.flush(30.0)
    finally:
        events.close()
    assert [type(t) for t in built] == [Urllib3Transport]
    assert sorted(e["data"]["idempotence_id"] for e in odp_server.events) == sorted(f"id-{i}" for i in range(250))
    assert all(r.headers["content-encoding"] == "gzip" for r in odp_server.requests)
    assert all(" urllib3/" in r.headers["user-agent"] for r in odp_server.requests)
