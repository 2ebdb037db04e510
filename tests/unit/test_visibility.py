"""What users see without configuring anything (issue 9, items 15 and 16; issue 10, Types): calls
refused before queueing are counted by reason, every stats key is documented, warnings and errors
reach Python's logging when the client's logger shows nothing, and uWSGI without threads is reported."""

from __future__ import annotations

import logging
import pathlib
import re
import sys
import threading
import time
import types
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from optimizely import logger as sdk_logger

import optimizely_odp_ext
from optimizely_odp_ext import _caller_queue, extension
from optimizely_odp_ext._state import STALL_SECONDS
from optimizely_odp_ext.event import Pending
from optimizely_odp_ext.extension import manager_of
from optimizely_odp_ext.manager import DROP_REASONS, REFUSE_REASONS, EventManager, OdpEventStats
from optimizely_odp_ext.settings import MIRROR_LOGGER, Options, VisibleLogger, make_options, visible
from optimizely_odp_ext.testing import FakeOdpServer
from optimizely_odp_ext.transport import Reply, Timeout
from tests.conftest import TEST_KEY, RecordingHandler

ROOT = pathlib.Path(__file__).resolve().parents[2]
MakeClient = Callable[..., Any]


# ----------------------------------------------------------------- refused, by reason


def _refused(client: Any) -> Dict[str, int]:
    return {reason: n for reason, n in client.odp_event_stats()["refused"].items() if n}


def _send_twice(client: Any, action: str = "a") -> None:
    for _ in range(2):
        client.send_odp_event(action, {"fs_user_id": "u"})


@pytest.mark.parametrize("level", ["class", "instance"])
def test_each_refusal_is_counted_by_its_reason(make_client: MakeClient, log: Any, level: str) -> None:
    host = "https://odp.example"
    cases: List[Tuple[str, Any, Dict[str, Any], str]] = [
        ("invalid_input", make_client(host, logger=log[0]), {}, ""),
        ("odp_disabled", make_client(host, logger=log[0]), {"odp_disabled": True}, "a"),
        ("odp_not_integrated", make_client(None, logger=log[0]), {}, "a"),
        ("host_refused", make_client("http://odp.example.invalid", logger=log[0]), {}, "a"),
        ("invalid_client", make_client(datafile_json="not a datafile", logger=log[0]), {}, "a"),
    ]
    if level == "class":
        assert optimizely_odp_ext.install() is True
    try:
        for reason, client, options, action in cases:
            if level == "instance":
                assert optimizely_odp_ext.install(client, **options) is True
            elif options:
                continue  # class-level options are shared: odp_disabled is covered per instance
            _send_twice(client, action)
            assert _refused(client) == {reason: 2}, reason
            stats = client.odp_event_stats()
            assert (stats["accepted"], stats["pending"]) == (0, 0), reason
    finally:
        optimizely_odp_ext.uninstall()


def test_refused_after_close_is_counted(make_client: MakeClient, log: Any) -> None:
    client = make_client("https://odp.example", logger=log[0])
    assert optimizely_odp_ext.install(client) is True
    client.close()
    _send_twice(client)
    assert _refused(client) == {"closed": 2}


# ----------------------------------------------------------------- the stats' shape and documentation


def test_stats_have_exactly_the_typed_keys(make_client: MakeClient) -> None:
    client = make_client("https://odp.example")
    assert optimizely_odp_ext.install(client) is True
    for stats in (client.odp_event_stats(), _after_one_refusal(client)):
        assert set(stats) == set(OdpEventStats.__annotations__)
        assert set(stats["dropped"]) == set(DROP_REASONS)
        assert set(stats["refused"]) == set(REFUSE_REASONS)
    assert optimizely_odp_ext.OdpEventStats is OdpEventStats
    assert "OdpEventStats" in optimizely_odp_ext.__all__


def _after_one_refusal(client: Any) -> OdpEventStats:
    client.send_odp_event("", {"fs_user_id": "u"})
    stats: OdpEventStats = client.odp_event_stats()
    return stats


def test_one_name_per_drop_reason() -> None:
    """``invalid`` is the top-level count of calls refused by validation; an event that fails to
    encode on the worker is dropped as ``unencodable``."""
    assert "invalid" not in DROP_REASONS
    assert "unencodable" in DROP_REASONS


def test_every_stats_key_is_in_the_docstring() -> None:
    """The pages under docs/ are checked by tests/unit/test_docs.py; this is the docstring editors show."""
    doc = OdpEventStats.__doc__ or ""
    for key in (*OdpEventStats.__annotations__, *DROP_REASONS, *REFUSE_REASONS):
        assert re.search(rf"\b{key}\b", doc), f"OdpEventStats does not describe {key!r}"


class _Transport:
    """Accepts every batch (this test is about what happens before sending)."""

    def send(self, url: str, api_key: str, body: bytes, timeout: Timeout) -> Reply:
        return Reply(202, None, "accepted")

    def close(self) -> None:
        """Nothing to release."""


def test_an_event_that_cannot_be_encoded_is_dropped_as_unencodable(log: Any) -> None:
    options = Options(api_host="http://127.0.0.1:9", api_key=TEST_KEY, flush_interval=0)
    manager = EventManager(options, log[0], "5.7.0", transport_factory=lambda _options: _Transport())
    try:
        # Past validation, a value json cannot encode (validate() would have refused it).
        bad: Pending = ("fullstack", "a", {"fs_user_id": "u"}, {"x": object()})  # type: ignore[dict-item]
        good: Pending = ("fullstack", "a", {"fs_user_id": "u"}, None)
        assert manager.enqueue(bad) is True
        assert manager.enqueue(good) is True
        assert manager.flush(10) is True
        stats = manager.stats()
        assert (stats["delivered"], stats["dropped"]["unencodable"], stats["refused"]["invalid_input"]) == (1, 1, 0)
    finally:
        manager.close()


# ----------------------------------------------------------------- visible by default


@pytest.fixture
def mirror() -> Iterator[RecordingHandler]:
    """Records what reaches the ``optimizely_odp_ext`` logger."""
    handler = RecordingHandler()
    target = logging.getLogger(MIRROR_LOGGER)
    target.addHandler(handler)
    try:
        yield handler
    finally:
        target.removeHandler(handler)


def _isolated(*handlers: logging.Handler) -> logging.Logger:
    """A logger that reaches only ``handlers`` (pytest's own capture sits on the root logger)."""
    logger = logging.getLogger(f"tests.visibility.{uuid.uuid4().hex}")
    logger.propagate = False
    for handler in handlers:
        logger.addHandler(handler)
    return logger


def test_lines_of_a_silent_logger_are_mirrored(mirror: RecordingHandler) -> None:
    wrapped = visible(_isolated(logging.NullHandler()))
    wrapped.debug("debug line")
    wrapped.info("info line")
    wrapped.warning("queue is full: %d dropped", 3)
    wrapped.error("host refused")
    assert [(r.levelno, r.getMessage()) for r in mirror.records] == [
        (logging.WARNING, "queue is full: 3 dropped"), (logging.ERROR, "host refused")]


def test_the_sdks_noop_logger_counts_as_silent(mirror: RecordingHandler) -> None:
    adapted = sdk_logger.adapt_logger(sdk_logger.NoOpLogger())
    adapted.propagate = False  # as in an application without logging configured
    try:
        visible(adapted).error("from the adapted NoOpLogger")
    finally:
        adapted.propagate = True
    assert mirror.lines() == ["from the adapted NoOpLogger"]
    option = make_options(logger=sdk_logger.NoOpLogger()).logger
    if not isinstance(option, logging.Logger):  # 5.x: the NoOpLogger object itself, with no-op methods
        visible(option).error("from a NoOpLogger object")
        assert mirror.lines() == ["from the adapted NoOpLogger", "from a NoOpLogger object"]


def test_a_logger_that_shows_lines_is_not_doubled(mirror: RecordingHandler) -> None:
    own = RecordingHandler()
    visible(_isolated(own)).error("once")
    # No handler at all: Python's last-resort handler prints it already.
    visible(_isolated()).error("last resort")
    visible(types.SimpleNamespace(debug=print, info=print, warning=lambda *a: None, error=lambda *a: None)).error("x")
    assert own.lines() == ["once"]
    assert mirror.records == []


def test_logging_configured_after_install_is_honoured(mirror: RecordingHandler) -> None:
    logger = _isolated(logging.NullHandler())
    wrapped = visible(logger)
    wrapped.error("before")
    own = RecordingHandler()
    logger.addHandler(own)
    wrapped.error("after")
    assert mirror.lines() == ["before"]
    assert own.lines() == ["after"]


def test_visible_wraps_once_and_forwards_everything_else() -> None:
    logger = _isolated()
    wrapped = visible(logger)
    assert isinstance(wrapped, VisibleLogger)
    assert visible(wrapped) is wrapped
    assert wrapped.name == logger.name
    assert wrapped.isEnabledFor(logging.ERROR) is logger.isEnabledFor(logging.ERROR)


def test_the_client_state_uses_a_visible_logger(make_client: MakeClient, log: Any) -> None:
    client = make_client("https://odp.example", logger=log[0])
    assert optimizely_odp_ext.install(client) is True
    manager = extension.manager_of(client)
    assert manager is not None
    assert isinstance(manager.logger, VisibleLogger)
    assert manager.logger.inner is log[0]


# ----------------------------------------------------------------- threads that never run (uWSGI)
#
# uWSGI without Python threads support runs the plugin's worker only while a request runs Python
# code, so events pile up. Which uWSGI options turn threads on differs between releases (2.0.31 on
# Python 3.11 turns them on by itself), so the plugin does not guess from options: it reports a
# worker that has not run for STALL_SECONDS while a full batch waits, once per process.


@pytest.fixture
def stalled_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[EventManager], threading.Event]]:
    """Makes a manager's worker stop running (as without threads support) until the returned
    event is set (at the latest when the test ends)."""
    monkeypatch.setattr(_caller_queue, "_stall_reported", False)
    release = threading.Event()
    stalled: List[EventManager] = []

    def stall(manager: EventManager) -> threading.Event:
        entered = threading.Event()

        def blocked_step() -> Optional[float]:
            entered.set()
            release.wait(30)
            return None

        monkeypatch.setattr(manager, "_step", blocked_step)
        manager._wake.set()
        assert entered.wait(5)
        manager._ledger.last_pass = time.monotonic() - STALL_SECONDS - 1  # as if it had not run since
        stalled.append(manager)
        return release

    yield stall
    release.set()


def _stall_lines(log: Any) -> List[str]:
    return [line for line in log[1].errors() if "worker thread has not run" in line]


def _lines_of_a_stalled_client(stall: Callable[[EventManager], threading.Event], make_client: MakeClient,
                               server: FakeOdpServer, log: Any) -> List[str]:
    client = make_client(server.url, logger=log[0])
    assert optimizely_odp_ext.install(client, batch_size=5, flush_interval=60) is True
    client.send_odp_event("a", {"fs_user_id": "u"})
    manager = manager_of(client)
    assert manager is not None
    release = stall(manager)
    for _ in range(20):  # four full batches: one line, not four
        client.send_odp_event("a", {"fs_user_id": "u"})
    release.set()
    optimizely_odp_ext.uninstall(client)
    return _stall_lines(log)


def test_a_worker_that_never_runs_under_uwsgi_is_reported_once_with_the_flag(
        stalled_worker: Callable[[EventManager], threading.Event], monkeypatch: pytest.MonkeyPatch,
        make_client: MakeClient, odp_server: FakeOdpServer, log: Any) -> None:
    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(opt={"master": True}))
    lines = _lines_of_a_stalled_client(stalled_worker, make_client, odp_server, log)
    assert len(lines) == 1, lines
    assert "Add --enable-threads to the uWSGI command line" in lines[0]


def test_a_worker_that_never_runs_elsewhere_is_reported_once(
        stalled_worker: Callable[[EventManager], threading.Event], make_client: MakeClient,
        odp_server: FakeOdpServer, log: Any) -> None:
    lines = _lines_of_a_stalled_client(stalled_worker, make_client, odp_server, log)
    assert len(lines) == 1, lines
    assert "Python threads are not running in this process" in lines[0]


def test_a_running_worker_is_never_reported(monkeypatch: pytest.MonkeyPatch, make_client: MakeClient,
                                            odp_server: FakeOdpServer, log: Any) -> None:
    monkeypatch.setattr(_caller_queue, "_stall_reported", False)
    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(opt={"master": True}))
    client = make_client(odp_server.url, logger=log[0])
    assert optimizely_odp_ext.install(client, batch_size=5, flush_interval=60) is True
    for _ in range(50):
        client.send_odp_event("a", {"fs_user_id": "u"})
    optimizely_odp_ext.uninstall(client)
    assert _stall_lines(log) == []
