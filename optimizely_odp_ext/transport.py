"""HTTP to ODP: one keep-alive connection pool, the request, and what the reply said.

The manager talks to a :class:`Transport`; tests of the manager alone inject a fake one, tests of
the whole path use the real ones against ``optimizely_odp_ext.testing.FakeOdpServer``.

Two real transports behave alike (proxies, CA bundle and TLS verification from the environment as
``requests`` reads them, gzip, timeouts, keep-alive, the reply's status and ``Retry-After``, status 0
on a network error, never an exception): :class:`Urllib3Transport`, the default
(:func:`default_transport`), posts through ``urllib3``'s pool directly, the layer ``requests`` itself
sends through, at about half of ``requests``' CPU per request (``benchmarks/RESULTS.md``);
:class:`RequestsTransport` posts through a ``requests.Session``.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import os
import platform
import threading
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_auth_from_url, prepend_scheme_if_needed, select_proxy
from typing_extensions import Protocol
from urllib3.exceptions import HTTPError as _Urllib3Error
from urllib3.exceptions import LocationValueError, NewConnectionError, ProxyError
from urllib3.exceptions import TimeoutError as _Urllib3Timeout

from . import _compat
from ._version import __version__
from .retry import NETWORK_ERROR, parse_retry_after

_log = logging.getLogger(__name__)

Timeout = Tuple[float, float]


class Reply(NamedTuple):
    """What one POST came back with.

    Attributes:
        status: The HTTP status, or 0 when no reply arrived (connection error, timeout).
        retry_after: Seconds from a ``Retry-After`` header, if any.
        detail: A short description for logs (never contains the API key).
    """

    status: int
    retry_after: Optional[float]
    detail: str


class Transport(Protocol):
    """Sends one batch body to ODP."""

    def send(self, url: str, api_key: str, body: bytes, timeout: Timeout) -> Reply:
        """POSTs ``body`` (a JSON array) to ``url`` with ``api_key``; never raises."""

    def close(self) -> None:
        """Releases connections."""


def user_agent(http: Optional[str] = None) -> str:
    """The ``User-Agent`` header: this package, the host SDK, Python and the HTTP library.

    Args:
        http: ``name/version`` of the HTTP library; ``requests``' by default.
    """
    return (
        f"optimizely-odp-ext/{__version__} optimizely-sdk/{_compat.sdk_version()} "
        f"python/{platform.python_version()} {http or 'requests/' + requests.__version__}"
    )


def events_url(host: str) -> str:
    """``{host}/v3/events``, tolerant of a trailing slash on the host."""
    return host.rstrip("/") + "/v3/events"


def mask_key(key: str) -> str:
    """The API key as it may appear in logs: its last four characters only."""
    return "****" + key[-4:] if len(key) > 8 else "****"


def check_host(host: str, allow_insecure_http: bool = False) -> Optional[str]:
    """Checks that the public key may be sent to ``host``.

    The key travels over https, or plain http to a loopback host (tests, local development);
    anything else needs ``allow_insecure_http=True``.

    Returns:
        None when the host is acceptable, else the error line to log.
    """
    try:
        parts = urlsplit(host)
    except ValueError:
        return f'ODP host "{host}" is not a valid URL.'
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme != "http" or not parts.hostname:
        return f'ODP host "{host}" is not a valid URL (expected https://...).'
    if allow_insecure_http or _is_loopback(parts.hostname):
        return None
    return (
        f'ODP host "{host}" uses plain http; refusing to send the API key unencrypted '
        f"(use https, or pass allow_insecure_http=True to install())."
    )


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class RequestsTransport:
    """The real transport: one ``requests.Session`` with keep-alive, shared by the senders.

    Args:
        pool_size: Connections kept alive per host (the number of requests in flight at once).
        gzip_body: Compress bodies with ``Content-Encoding: gzip``. ODP does not document gzip
            support, so this is off by default.
    """

    def __init__(self, pool_size: int = 4, gzip_body: bool = False) -> None:
        self._session = requests.Session()
        # Retries are ours (retry.py), never urllib3's; a redirect of a POST is not followed.
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=max(pool_size, 1), max_retries=0)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self.user_agent = user_agent()
        self._session.headers.update(
            {"content-type": "application/json", "user-agent": self.user_agent, "accept": "application/json"}
        )
        # requests reads proxy and CA-bundle settings from the environment on every request (15% of
        # a POST's CPU here); they are read once per URL instead (_environment), still honoured.
        self._session.trust_env = False
        self._environment: Dict[str, Dict[str, Any]] = {}
        self._gzip = gzip_body

    def send(self, url: str, api_key: str, body: bytes, timeout: Timeout) -> Reply:
        """POSTs one batch. Never raises: a failure is a :class:`Reply` with status 0."""
        headers: Dict[str, str] = {"x-api-key": api_key}
        if self._gzip:
            body = gzip.compress(body, compresslevel=5)
            headers["content-encoding"] = "gzip"
        try:
            environment = self._environment.get(url)
            if environment is None:
                environment = self._environment[url] = _environment_settings(url)
            response = self._session.post(url, data=body, headers=headers, timeout=timeout,
                                          allow_redirects=False, **environment)
        except requests.Timeout:
            return Reply(NETWORK_ERROR, None, "timeout")
        except requests.ConnectionError as exc:
            return Reply(NETWORK_ERROR, None, f"network error: {_short(exc)}")
        except Exception as exc:  # invalid URL, TLS setup, ...: reported, never raised into the worker
            return Reply(NETWORK_ERROR, None, f"{exc.__class__.__name__}: {_short(exc)}")
        reply = _reply(response.status_code, response.headers.get("retry-after"), lambda: response.text)
        response.close()
        return reply

    def close(self) -> None:
        """Closes the session's pooled connections."""
        self._session.close()


def default_transport(options: Any) -> Transport:
    """The transport the manager builds for ``options`` (their ``max_in_flight`` and ``gzip``)."""
    return Urllib3Transport(pool_size=options.max_in_flight, gzip_body=options.gzip)


class _Route(NamedTuple):
    """How one URL is reached: the pool (direct or through a proxy), or requests for what we leave to it."""

    pool: Optional[urllib3.PoolManager]
    fallback: Optional[RequestsTransport]


class Urllib3Transport:
    """The default transport: ``urllib3``'s connection pool, without the ``requests`` layer above it.

    What the environment says is read once per URL, as :class:`RequestsTransport` does, with
    ``requests``' own rules (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY``, credentials in
    the proxy URL, ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``, else ``certifi``'s bundle); TLS is always
    verified. A SOCKS proxy is left to ``requests`` (which needs PySocks for it). Safe to share between
    threads: ``urllib3``'s pools are, and a URL's route is built once, under a lock.

    Args:
        pool_size: Connections kept alive per host (the number of requests in flight at once).
        gzip_body: Compress bodies with ``Content-Encoding: gzip``.
    """

    def __init__(self, pool_size: int = 4, gzip_body: bool = False) -> None:
        self._pool_size = max(pool_size, 1)
        self._gzip = gzip_body
        self.user_agent = user_agent(f"urllib3/{getattr(urllib3, '__version__', '?')}")
        self._headers = {"content-type": "application/json", "user-agent": self.user_agent,
                         "accept": "application/json"}
        if gzip_body:
            self._headers["content-encoding"] = "gzip"
        self._routes: Dict[str, _Route] = {}
        # One pool manager per (proxy, CA bundle): normally one for the process's one ODP host.
        self._pools: Dict[Tuple[Optional[str], str], urllib3.PoolManager] = {}
        self._lock = threading.Lock()
        self._timeouts: Dict[Timeout, urllib3.Timeout] = {}

    def send(self, url: str, api_key: str, body: bytes, timeout: Timeout) -> Reply:
        """POSTs one batch. Never raises: a failure is a :class:`Reply` with status 0."""
        try:
            route = self._routes.get(url) or self._route(url)
            if route.fallback is not None:
                return route.fallback.send(url, api_key, body, timeout)
            assert route.pool is not None
            headers = self._headers.copy()
            headers["x-api-key"] = api_key
            if self._gzip:
                body = gzip.compress(body, compresslevel=5)
            limits = self._timeouts.get(timeout)
            if limits is None:
                limits = self._timeouts[timeout] = urllib3.Timeout(connect=timeout[0], read=timeout[1])
            # Retries are ours (retry.py), never urllib3's; a redirect of a POST is returned, not followed.
            response = route.pool.urlopen("POST", url, body=body, headers=headers, timeout=limits,
                                          retries=False, redirect=False, preload_content=True)
        except NewConnectionError as exc:  # a subclass of ConnectTimeoutError, but a refusal, not a timeout
            return Reply(NETWORK_ERROR, None, f"network error: {_short(exc, named=True)}")
        except ProxyError as exc:
            return Reply(NETWORK_ERROR, None, f"network error: {_short(exc, named=True)}")
        except _Urllib3Timeout:
            return Reply(NETWORK_ERROR, None, "timeout")
        except LocationValueError as exc:  # not a URL we can send to: no network involved
            return Reply(NETWORK_ERROR, None, f"{exc.__class__.__name__}: {_short(exc)}")
        except (_Urllib3Error, OSError) as exc:
            return Reply(NETWORK_ERROR, None, f"network error: {_short(exc, named=True)}")
        except Exception as exc:  # TLS set-up, a bad CA bundle path, ...: reported, never raised into the worker
            return Reply(NETWORK_ERROR, None, f"{exc.__class__.__name__}: {_short(exc)}")
        return _reply(response.status, response.headers.get("retry-after"),
                      lambda: response.data[:1200].decode("utf-8", "replace"))

    def _route(self, url: str) -> _Route:
        """Reads the environment for ``url`` (once) and picks or builds its pool."""
        with self._lock:
            route = self._routes.get(url)
            if route is not None:
                return route
            settings = _environment_settings(url)
            proxy = select_proxy(url, settings["proxies"])
            if proxy:
                # "host:3128" means http, as it does for requests.
                proxy = str(prepend_scheme_if_needed(proxy, "http"))  # type: ignore[no-untyped-call]
            if (proxy and not proxy.lower().startswith(("http://", "https://"))) or settings["cert"]:
                # SOCKS (or a client certificate, which the environment never sets): requests does it.
                route = _Route(None, RequestsTransport(self._pool_size, self._gzip))
            else:
                verify = settings["verify"]
                bundle = DEFAULT_CA_BUNDLE_PATH if verify is True or not verify else str(verify)
                key = (proxy or None, bundle)
                pool = self._pools.get(key)
                if pool is None:
                    pool = self._pools[key] = _pool_manager(proxy, bundle, self._pool_size)
                route = _Route(pool, None)
            self._routes[url] = route
            return route

    def close(self) -> None:
        """Closes the pooled connections (a later send opens new ones)."""
        with self._lock:
            routes, pools = list(self._routes.values()), list(self._pools.values())
            self._routes.clear()
            self._pools.clear()
        for pool in pools:
            pool.clear()
        for route in routes:
            if route.fallback is not None:
                route.fallback.close()


def _pool_manager(proxy: Optional[str], bundle: str, size: int) -> urllib3.PoolManager:
    """A pool with TLS verified against ``bundle`` (a file, or a directory of hashed certificates)."""
    tls: Dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
    tls["ca_cert_dir" if os.path.isdir(bundle) else "ca_certs"] = bundle
    if not proxy:
        return urllib3.PoolManager(num_pools=4, maxsize=size, block=False, **tls)
    username, password = get_auth_from_url(proxy)
    headers = urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
    return urllib3.ProxyManager(proxy, num_pools=4, maxsize=size, block=False, proxy_headers=headers, **tls)


def _reply(status: int, retry_after: Optional[str], text: Callable[[], str]) -> Reply:
    """The :class:`Reply` for a response: its ``Retry-After``, and for a failure the start of its body."""
    detail = ""
    if status >= 300:
        try:
            detail = text()[:300]
        except Exception:  # an undecodable (e.g. badly compressed) body: the status says enough
            detail = ""
    return Reply(status, parse_retry_after(retry_after), detail)


def _environment_settings(url: str) -> Dict[str, Any]:
    """Proxies, CA bundle and client certificate for ``url`` as requests takes them from the
    environment (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, ...). TLS verification stays on."""
    with requests.Session() as probe:
        settings = probe.merge_environment_settings(url, {}, None, True, None)
    return {"proxies": settings.get("proxies") or {}, "verify": settings.get("verify", True),
            "cert": settings.get("cert")}


def _short(exc: BaseException, named: bool = False) -> str:
    """The root cause (``Connection refused``, a TLS error...), not requests' wrapping of it; ``named``:
    with its class name also when ``exc`` is the root (urllib3's own errors, as requests shows them)."""
    root = exc
    for _ in range(6):  # requests wraps urllib3's MaxRetryError, which wraps the OS-level error
        # urllib3's innermost error names the host and port; its own cause (the OSError) does not.
        inner = getattr(root, "reason", None)
        if not isinstance(inner, BaseException):
            inner = root.args[0] if root.args and isinstance(root.args[0], BaseException) else None
        if inner is None:
            break
        root = inner
    text = str(exc) if root is exc and not named else f"{root.__class__.__name__}: {root}"
    return text if len(text) <= 500 else text[:500] + "..."
