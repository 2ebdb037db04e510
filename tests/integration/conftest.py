"""Integration fixtures: real Optimizely clients with the plugin installed per instance, talking
real HTTP to a FakeOdpServer; and a check that every test stops the plugin threads it started."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator, Optional, Set, Tuple

import pytest

import optimizely_odp_ext
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import TEST_KEY, RecordingHandler

from ._helpers import FAST, wait_until

# Threads the plugin names; each one a test starts must be gone when the test ends.
_PLUGIN_THREAD_PREFIX = "odp-ext-"


def _plugin_threads() -> Set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(_PLUGIN_THREAD_PREFIX)}


@pytest.fixture(autouse=True)
def _no_leaked_plugin_threads() -> Iterator[None]:
    before = _plugin_threads()
    yield
    # A sender blocked in a request that the server never answers leaves at its request timeout.
    assert wait_until(lambda: not (_plugin_threads() - before), timeout=5.0), \
        f"threads left running: {sorted(t.name for t in _plugin_threads() - before)}"


Log = Tuple[logging.Logger, RecordingHandler]


@pytest.fixture
def installed(make_client: Callable[..., Any], log: Log) -> Callable[..., Any]:
    """Builds a real Optimizely client whose datafile points ODP at ``server`` (or ``host``), and
    installs the plugin on that one client with the FAST options plus ``options``.

    The client logs to the ``log`` fixture; make_client closes it at teardown.
    """

    def build(server: Optional[FakeOdpServer] = None, *, key: str = TEST_KEY, host: Optional[str] = None,
              datafile_json: Optional[str] = None, **options: Any) -> Any:
        if datafile_json is None:
            datafile_json = datafile(host if host is not None else (server.url if server else None), key)
        client = make_client(datafile_json=datafile_json, logger=log[0])
        assert optimizely_odp_ext.install(client, **{**FAST, **options}) is True
        return client

    return build
