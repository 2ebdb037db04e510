"""HTTP to ODP: one keep-alive ``requests.Session``, the request, and what the reply said.

The manager talks to a :class:`Transport`; tests of the manager alone inject a fake one, tests of
the whole path use :class:`RequestsTransport` against ``optimizely_odp_ext.testing.FakeOdpServer``.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import platform
from typing import Any, Dict, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from typing_extensions import Protocol

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


def user_agent() -> str:
    """The ``User-Agent`` header: this package, the host SDK and Python."""
    return (
        f"optimizely-odp-ext/{__version__} optimizely-sdk/{_compat.sdk_version()} "
        f"python/{platform.python_version()} requests/{requests.__version__}"
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
        self._session.headers.update(
            {"content-type": "application/json", "user-agent": user_agent(), "accept": "application/json"}
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
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        detail = ""
        if status >= 300:
            try:
                detail = response.text[:300]
            except Exception:  # undecodable body: the status says enough
                detail = ""
        response.close()
        return Reply(status, retry_after, detail)

    def close(self) -> None:
        """Closes the session's pooled connections."""
        self._session.close()


def _environment_settings(url: str) -> Dict[str, Any]:
    """Proxies, CA bundle and client certificate for ``url`` as requests takes them from the
    environment (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, ...). TLS verification stays on."""
    with requests.Session() as probe:
        settings = probe.merge_environment_settings(url, {}, None, True, None)
    return {"proxies": settings.get("proxies") or {}, "verify": settings.get("verify", True),
            "cert": settings.get("cert")}


def _short(exc: BaseException) -> str:
    """The root cause (``Connection refused``, a TLS error...), not requests' wrapping of it."""
    root = exc
    for _ in range(6):  # requests wraps urllib3's MaxRetryError, which wraps the OS-level error
        # urllib3's innermost error names the host and port; its own cause (the OSError) does not.
        inner = getattr(root, "reason", None)
        if not isinstance(inner, BaseException):
            inner = root.args[0] if root.args and isinstance(root.args[0], BaseException) else None
        if inner is None:
            break
        root = inner
    text = str(exc) if root is exc else f"{root.__class__.__name__}: {root}"
    return text if len(text) <= 500 else text[:500] + "..."
