"""Shared fixtures: a fake ODP server, real Optimizely clients, a logger that records lines."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext import _compat
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.testing import FakeOdpServer

SDK = _compat.sdk_version_tuple()
SDK5 = SDK >= (5, 0, 0)
TEST_KEY = "test-odp-key-0123456789"

requires_sdk5 = pytest.mark.skipif(not SDK5, reason="needs optimizely-sdk 5.x (ODP code in the SDK)")


class RecordingHandler(logging.Handler):
    """Keeps every record, for assertions on exact log lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: Optional[int] = None) -> List[str]:
        return [r.getMessage() for r in self.records if level is None or r.levelno == level]

    def errors(self) -> List[str]:
        return self.lines(logging.ERROR)


@pytest.fixture
def log() -> Iterator[Tuple[logging.Logger, RecordingHandler]]:
    """A fresh logger (as a client's logger) and the handler recording it."""
    logger = logging.getLogger(f"tests.client.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = RecordingHandler()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


@pytest.fixture
def odp_server() -> Iterator[FakeOdpServer]:
    """A FakeOdpServer on 127.0.0.1 that accepts TEST_KEY."""
    with FakeOdpServer(TEST_KEY) as server:
        yield server


@pytest.fixture
def make_client() -> Iterator[Callable[..., Any]]:
    """Builds real Optimizely clients from a datafile; closes them (and uninstalls) at teardown."""
    clients: List[Any] = []

    def build(host: Optional[str] = None, key: Optional[str] = TEST_KEY, *, datafile_json: Optional[str] = None,
              logger: Optional[logging.Logger] = None, **kwargs: Any) -> Any:
        if datafile_json is None:
            datafile_json = datafile(host, key if host else None)
        client = optimizely.Optimizely(datafile_json, logger=logger, **kwargs)
        clients.append(client)
        return client

    yield build
    for client in clients:
        optimizely_odp_ext.uninstall(client)
        close = getattr(client, "close", None)
        if callable(close):
            close()


@pytest.fixture
def class_installed() -> Iterator[None]:
    """optimizely_odp_ext.install() for the test, uninstall() after."""
    optimizely_odp_ext.install(flush_interval=0.05)
    yield
    optimizely_odp_ext.uninstall()
