"""What users see without configuring anything (issue 9, items 15 and 16; issue 10, Types): calls
refused before queueing are counted by reason, every stats key is documented, warnings and errors
reach Python's logging when the client's logger shows nothing, and uWSGI without threads is reported."""

from __future__ import annotations

import logging
import pathlib
import re
import sys
import threading
import types
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from optimizely import logger as sdk_logger

import optimizely_odp_ext
from optimizely_odp_ext import extension
from optimizely_odp_ext.event import Pending
from optimizely_odp_ext.manager import DROP_REASONS, REFUSE_REASONS, EventManager, OdpEventStats
from optimizely_odp_ext.settings import MIRROR_LOGGER, Options, VisibleLogger, make_options, visible
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


def test_every_stats_key_is_documented() -> None:
    doc = OdpEventStats.__doc__ or ""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for key in (*OdpEventStats.__annotations__, *DROP_REASONS, *REFUSE_REASONS):
        assert re.search(rf"\b{key}\b", doc), f"OdpEventStats does not describe {key!r}"
        assert f"`{key}`" in readme, f"README does not describe {key!r}"


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


# ----------------------------------------------------------------- uWSGI without threads


@pytest.fixture
def fake_uwsgi(monkeypatch: pytest.MonkeyPatch) -> Callable[[Dict[Any, Any]], None]:
    """Makes ``import uwsgi`` work as inside a uWSGI worker with the given options."""
    monkeypatch.setattr(extension, "_uwsgi_told", threading.Event())

    def run_with(opt: Dict[Any, Any]) -> None:
        monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(opt=opt))

    return run_with


UWSGI_LINE = ("optimizely_odp_ext: uWSGI runs without Python threads, so ODP events will never be sent (they pile "
              "up in memory). Add --enable-threads to the uWSGI command line (enable-threads = true in its ini).")


def _install_and_collect(caplog: pytest.LogCaptureFixture, client: Optional[Any] = None) -> List[str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        try:
            optimizely_odp_ext.install(client)
        finally:
            optimizely_odp_ext.uninstall(client)
    return [r.getMessage() for r in caplog.records if "uWSGI" in r.getMessage()]


@pytest.mark.parametrize("opt", [{"master": True}, {b"master": True, b"processes": b"4"},
                                 {"enable-threads": b"false"}, {b"threads": b"0"}, {}])
def test_uwsgi_without_threads_is_reported_once(fake_uwsgi: Callable[[Dict[Any, Any]], None],
                                                caplog: pytest.LogCaptureFixture, make_client: MakeClient,
                                                opt: Dict[Any, Any]) -> None:
    fake_uwsgi(opt)
    assert _install_and_collect(caplog) == [UWSGI_LINE]
    assert _install_and_collect(caplog, make_client("https://odp.example")) == []  # once per process


@pytest.mark.parametrize("opt", [{"enable-threads": True}, {b"enable-threads": b"1"}, {"enable-threads": b"true"},
                                 {b"threads": b"4"}, {"threads": "2"}, {b"enable-threads": [b"0", b"1"]}])
def test_uwsgi_with_threads_is_quiet(fake_uwsgi: Callable[[Dict[Any, Any]], None],
                                     caplog: pytest.LogCaptureFixture, opt: Dict[Any, Any]) -> None:
    fake_uwsgi(opt)
    assert _install_and_collect(caplog) == []


def test_uwsgi_line_goes_to_the_clients_logger(fake_uwsgi: Callable[[Dict[Any, Any]], None],
                                               make_client: MakeClient, log: Any) -> None:
    fake_uwsgi({"master": True})
    client = make_client("https://odp.example", logger=log[0])
    assert optimizely_odp_ext.install(client) is True
    assert log[1].errors() == [UWSGI_LINE]
