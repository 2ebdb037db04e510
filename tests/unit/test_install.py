"""Unit tests for install()/uninstall() and the methods they attach, with real Optimizely clients."""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest
from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext import _compat
from optimizely_odp_ext.extension import manager_of
from optimizely_odp_ext.settings import ConfigurationError
from optimizely_odp_ext.testing import FakeOdpServer
from tests.conftest import SDK5, TEST_KEY, RecordingHandler, requires_sdk5

Log = Tuple[logging.Logger, RecordingHandler]
MakeClient = Callable[..., Any]
Optimizely = optimizely.Optimizely
PATCHED = ("send_odp_event", "flush_odp_events", "odp_event_stats", "close", "__getstate__")
TAG = "_odp_ext_applied"
WAIT = 5.0
INVALID = 'Optimizely instance is not valid. Failing "send_odp_event".'
INVALID_CONFIG = 'Invalid config. Optimizely instance is not valid. Failing "send_odp_event".'


def _class_snapshot() -> Dict[str, Any]:
    return dict(Optimizely.__dict__)


def _same_dict(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    assert sorted(after) == sorted(before)
    changed = [name for name in before if after[name] is not before[name]]
    assert changed == []


@pytest.fixture
def pristine() -> Iterator[Dict[str, Any]]:
    """The Optimizely class as the SDK made it; any class-level install is undone after the test."""
    before = _class_snapshot()
    assert not any(getattr(v, TAG, False) for v in before.values()), "a previous test left an install behind"
    yield before
    optimizely_odp_ext.uninstall()
    _same_dict(before, _class_snapshot())


def _errors(log: Log) -> list:  # type: ignore[type-arg]
    return log[1].errors()


# ----------------------------------------------------------------- class level


def test_install_patches_the_class_and_tags_every_attribute(pristine: Dict[str, Any]) -> None:
    assert optimizely_odp_ext.install() is True
    for name in PATCHED:
        attribute = Optimizely.__dict__[name]
        assert getattr(attribute, TAG) is True, name
        original = pristine.get(name)
        assert attribute._odp_ext_replaced is original, name
        assert not hasattr(attribute, "__wrapped__"), name
    changed = {name for name, value in _class_snapshot().items() if pristine.get(name) is not value}
    expected = set(PATCHED) | ({"_identify_user"} if "_identify_user" in pristine else set())
    assert changed == expected


def test_install_twice_returns_false_and_warns(pristine: Dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    assert optimizely_odp_ext.install() is True
    installed = _class_snapshot()
    with caplog.at_level(logging.WARNING, logger="optimizely_odp_ext"):
        assert optimizely_odp_ext.install(batch_size=5) is False
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "optimizely_odp_ext.install() was already called; nothing changed."]
    _same_dict(installed, _class_snapshot())


def test_uninstall_restores_exactly_the_original_class(pristine: Dict[str, Any]) -> None:
    optimizely_odp_ext.install()
    assert optimizely_odp_ext.uninstall() is True
    _same_dict(pristine, _class_snapshot())
    assert "flush_odp_events" not in Optimizely.__dict__
    assert "odp_event_stats" not in Optimizely.__dict__
    if SDK5:
        assert Optimizely.__dict__["send_odp_event"] is pristine["send_odp_event"]
        assert Optimizely.__dict__["close"] is pristine["close"]
        assert not getattr(Optimizely.send_odp_event, TAG, False)
    else:
        assert "close" not in Optimizely.__dict__
        assert "send_odp_event" not in Optimizely.__dict__
    assert optimizely_odp_ext.uninstall() is False


def test_install_uninstall_install_again(pristine: Dict[str, Any]) -> None:
    assert optimizely_odp_ext.install() is True
    assert optimizely_odp_ext.uninstall() is True
    assert optimizely_odp_ext.install() is True
    assert getattr(Optimizely.__dict__["send_odp_event"], TAG) is True
    assert optimizely_odp_ext.uninstall() is True
    _same_dict(pristine, _class_snapshot())


def test_uninstall_leaves_someone_elses_later_patch_alone(pristine: Dict[str, Any]) -> None:
    optimizely_odp_ext.install()

    def theirs(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    Optimizely.flush_odp_events = theirs  # type: ignore[attr-defined]
    try:
        optimizely_odp_ext.uninstall()
        assert Optimizely.__dict__["flush_odp_events"] is theirs
    finally:
        del Optimizely.flush_odp_events  # type: ignore[attr-defined]


def test_class_install_serves_clients_made_before_and_after(pristine: Dict[str, Any], make_client: MakeClient,
                                                           odp_server: FakeOdpServer, log: Log) -> None:
    before = make_client(odp_server.url, logger=log[0])
    optimizely_odp_ext.install(flush_interval=0.01)
    after = make_client(odp_server.url, logger=log[0])
    before.send_odp_event("a", {"fs_user_id": "before"})
    after.send_odp_event("a", {"fs_user_id": "after"})
    assert before.flush_odp_events(WAIT) is True
    assert after.flush_odp_events(WAIT) is True
    assert sorted(e["identifiers"]["fs_user_id"] for e in odp_server.events) == ["after", "before"]
    assert _errors(log) == []


def test_uninstall_class_delivers_queued_events_first(pristine: Dict[str, Any], make_client: MakeClient,
                                                      odp_server: FakeOdpServer, log: Log) -> None:
    optimizely_odp_ext.install(flush_interval=60.0)
    client = make_client(odp_server.url, logger=log[0])
    client.send_odp_event("a", {"fs_user_id": "u1"})
    manager = manager_of(client)
    assert manager is not None
    assert optimizely_odp_ext.uninstall() is True
    assert manager.closed is True
    assert [e["identifiers"] for e in odp_server.events] == [{"fs_user_id": "u1"}]
    assert manager_of(client) is None


# ----------------------------------------------------------------- instance level


def test_instance_install_sets_instance_attributes_only(pristine: Dict[str, Any], make_client: MakeClient,
                                                        log: Log) -> None:
    client = make_client("https://odp.example", logger=log[0])
    own_before = dict(client.__dict__)
    assert optimizely_odp_ext.install(client) is True
    _same_dict(pristine, _class_snapshot())
    for name in PATCHED:
        assert name in client.__dict__, name
        assert getattr(client.__dict__[name], TAG) is True, name
    other = make_client("https://odp.example", logger=log[0])
    assert not any(name in other.__dict__ for name in PATCHED)
    assert optimizely_odp_ext.uninstall(client) is True
    assert sorted(client.__dict__) == sorted(own_before)
    assert manager_of(client) is None
    assert optimizely_odp_ext.uninstall(client) is False
    assert _errors(log) == []


def test_instance_install_twice_returns_false(pristine: Dict[str, Any], make_client: MakeClient, log: Log) -> None:
    client = make_client("https://odp.example", logger=log[0])
    assert optimizely_odp_ext.install(client) is True
    method = client.__dict__["send_odp_event"]
    assert optimizely_odp_ext.install(client, batch_size=3) is False
    assert client.__dict__["send_odp_event"] is method
    assert log[1].lines(logging.WARNING) == [
        "optimizely_odp_ext.install(client) was already called for this client; nothing changed."]


def test_instance_install_then_close(pristine: Dict[str, Any], make_client: MakeClient,
                                     odp_server: FakeOdpServer, log: Log) -> None:
    client = make_client(odp_server.url, logger=log[0])
    optimizely_odp_ext.install(client, flush_interval=60.0)
    client.send_odp_event("a", {"fs_user_id": "u1"})
    manager = manager_of(client)
    assert manager is not None
    client.close()
    assert manager.closed is True
    assert [e["identifiers"] for e in odp_server.events] == [{"fs_user_id": "u1"}]


def test_install_refuses_what_is_not_a_client(pristine: Dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as info:
        optimizely_odp_ext.install(object())
    assert str(info.value) == "install() needs an Optimizely client, got object."
    _same_dict(pristine, _class_snapshot())


@pytest.mark.parametrize("target", ["class", "client"])
def test_unknown_option_raises(pristine: Dict[str, Any], make_client: MakeClient, target: str) -> None:
    client = make_client("https://odp.example")
    own_before = dict(client.__dict__)
    with pytest.raises(ConfigurationError) as info:
        optimizely_odp_ext.install(None if target == "class" else client, batch_sise=5)  # type: ignore[call-arg]
    assert str(info.value) == "unknown option(s): batch_sise (did you mean batch_size?)."
    with pytest.raises(ConfigurationError):
        optimizely_odp_ext.install(None if target == "class" else client, batch_size=-1)
    _same_dict(pristine, _class_snapshot())
    assert sorted(client.__dict__) == sorted(own_before)


def test_configuration_error_is_public_and_a_value_error() -> None:
    assert optimizely_odp_ext.ConfigurationError is ConfigurationError
    assert issubclass(ConfigurationError, ValueError)


# ----------------------------------------------------------------- the contract through a real client


@pytest.mark.parametrize("how", ["class", "client"])
def test_invalid_client_logs_once_and_queues_nothing(pristine: Dict[str, Any], make_client: MakeClient,
                                                     how: str) -> None:
    """A client the SDK itself calls invalid (is_valid False): here, a dispatcher without dispatch_event."""
    client = make_client("https://odp.example", event_dispatcher=object())
    assert client.is_valid is False
    handler = RecordingHandler()
    client.logger.addHandler(handler)  # the SDK replaced our logger with its own stderr logger
    try:
        if how == "class":
            optimizely_odp_ext.install()
        else:
            optimizely_odp_ext.install(client)
        client.send_odp_event("a", {"fs_user_id": "u"})
        client.send_odp_event("", None)
    finally:
        client.logger.removeHandler(handler)
    install_line = ['Optimizely instance is not valid. Failing "install".'] if how == "client" else []
    assert handler.errors() == [*install_line, INVALID, INVALID]
    manager = manager_of(client)
    assert manager is None or manager.stats()["accepted"] == 0


@pytest.mark.parametrize("how", ["class", "client"])
def test_unparsable_datafile_logs_once_and_queues_nothing(pristine: Dict[str, Any], make_client: MakeClient,
                                                          log: Log, how: str) -> None:
    client = make_client(datafile_json="not json", logger=log[0])
    # The SDK keeps such a client "valid" with no config; its own methods log INVALID_CONFIG for it.
    assert client.is_valid is True
    assert client.config_manager.get_config() is None
    expected = INVALID_CONFIG
    if how == "class":
        optimizely_odp_ext.install()
    else:
        optimizely_odp_ext.install(client)
    before = len(_errors(log))
    client.send_odp_event("a", {"fs_user_id": "u"})
    assert [line for line in _errors(log)[before:] if "not valid" in line] == [expected]
    manager = manager_of(client)
    assert manager is None or manager.stats()["accepted"] == 0


@requires_sdk5
def test_odp_disabled_in_sdk_settings(pristine: Dict[str, Any], make_client: MakeClient, odp_server: FakeOdpServer,
                                      log: Log) -> None:
    from optimizely.helpers.sdk_settings import OptimizelySdkSettings

    client = make_client(odp_server.url, logger=log[0], settings=OptimizelySdkSettings(odp_disabled=True))
    optimizely_odp_ext.install(client)
    before = len(_errors(log))
    client.send_odp_event("a", {"fs_user_id": "u"})
    assert _errors(log)[before:] == ["ODP is not enabled."]
    assert client.flush_odp_events(WAIT) is True
    assert odp_server.requests == []


def test_odp_disabled_option(pristine: Dict[str, Any], make_client: MakeClient, odp_server: FakeOdpServer,
                             log: Log) -> None:
    client = make_client(odp_server.url, logger=log[0])
    optimizely_odp_ext.install(client, odp_disabled=True)
    client.send_odp_event("a", {"fs_user_id": "u"})
    assert _errors(log) == ["ODP is not enabled."]
    assert client.flush_odp_events(WAIT) is True
    assert odp_server.requests == []


def test_odp_disabled_still_reports_bad_input_first(pristine: Dict[str, Any], make_client: MakeClient,
                                                    log: Log) -> None:
    client = make_client("https://odp.example", logger=log[0])
    optimizely_odp_ext.install(client, odp_disabled=True)
    client.send_odp_event("", {"fs_user_id": "u"})
    assert _errors(log) == ["ODP action is not valid (cannot be empty)."]


def test_not_integrated_datafile(pristine: Dict[str, Any], make_client: MakeClient, log: Log) -> None:
    client = make_client(None, logger=log[0])
    optimizely_odp_ext.install(client)
    client.send_odp_event("a", {"fs_user_id": "u"})
    assert _errors(log) == ["ODP is not integrated."]
    assert client.odp_event_stats()["accepted"] == 0


BAD_CALLS = [
    (("", {"fs_user_id": "u"}), {}, "ODP action is not valid (cannot be empty)."),
    ((None, {"fs_user_id": "u"}), {}, "ODP action is not valid (cannot be empty)."),
    (("a", {}), {}, "ODP events must have at least one key-value pair in identifiers."),
    (("a", None), {}, "ODP events must have at least one key-value pair in identifiers."),
    (("a", {"fs_user_id": 5}), {},
     'ODP identifiers are not valid (value of "fs_user_id" must be a string, got int).'),
    (("a", {"fs_user_id": "u"}), {"data": {"k": [1]}}, "ODP data is not valid."),
    (("a", {"fs_user_id": "u"}), {"data": {"k": float("nan")}},
     'ODP data is not valid (value of "k" is not a finite number).'),
    (("a", {"fs_user_id": "u"}), {"type": 3}, "ODP type is not valid (must be a string, got int)."),
]


@pytest.mark.usefixtures("pristine")
@pytest.mark.parametrize(("call", "line"), [((args, kwargs), line) for args, kwargs, line in BAD_CALLS])
def test_bad_input_logs_one_line_and_raises_nothing(
    make_client: MakeClient, odp_server: FakeOdpServer, log: Log, call: Tuple[Tuple[Any, ...], Dict[str, Any]],
    line: str,
) -> None:
    args, kwargs = call
    client = make_client(odp_server.url, logger=log[0])
    optimizely_odp_ext.install(client, flush_interval=0.01)
    assert client.send_odp_event(*args, **kwargs) is None
    assert _errors(log) == [line]
    client.send_odp_event("good", {"fs_user_id": "u2"})
    assert client.flush_odp_events(WAIT) is True
    assert [(e["action"], e["identifiers"]) for e in odp_server.events] == [("good", {"fs_user_id": "u2"})]
    assert _errors(log) == [line]
    stats = client.odp_event_stats()
    assert (stats["refused"]["invalid_input"], stats["accepted"], stats["delivered"]) == (1, 1, 1)


def test_delivered_event_through_a_real_client(pristine: Dict[str, Any], make_client: MakeClient,
                                               odp_server: FakeOdpServer, log: Log) -> None:
    client = make_client(odp_server.url, logger=log[0])
    optimizely_odp_ext.install(client, flush_interval=0.01)
    identifiers = {"FS-USER-ID": "user123", "email": "a@b.com"}
    data: Dict[str, Any] = {"item": "shirt", "price": 50.0, "vip": True, "note": None, "qty": 2}
    ids_before, data_before = copy.deepcopy(identifiers), copy.deepcopy(data)
    client.send_odp_event("purchased", identifiers, "fullstack", data)
    assert identifiers == ids_before
    assert data == data_before
    identifiers["email"] = "changed@b.com"
    data["price"] = 0.0
    assert client.flush_odp_events(WAIT) is True
    [event] = odp_server.events
    assert event["type"] == "fullstack"
    assert event["action"] == "purchased"
    assert event["identifiers"] == {"fs_user_id": "user123", "email": "a@b.com"}
    sent = dict(event["data"])
    assert sent.pop("idempotence_id")
    assert sent == {"data_source_type": "sdk", "data_source": "python-sdk",
                    "data_source_version": _compat.sdk_version(), **data_before}
    assert odp_server.requests[0].headers["x-api-key"] == TEST_KEY
    assert _errors(log) == []


def test_default_type_and_positional_signature(pristine: Dict[str, Any], make_client: MakeClient,
                                               odp_server: FakeOdpServer) -> None:
    client = make_client(odp_server.url)
    optimizely_odp_ext.install(client, flush_interval=0.01)
    client.send_odp_event("a1", {"fs_user_id": "u"})
    client.send_odp_event("a2", {"fs_user_id": "u"}, "")
    client.send_odp_event("a3", {"fs_user_id": "u"}, None, {"x": 1})
    client.send_odp_event(action="a4", identifiers={"fs_user_id": "u"}, type="custom", data={"y": "z"})
    assert client.flush_odp_events(WAIT) is True
    assert [(e["action"], e["type"]) for e in odp_server.events] == [
        ("a1", "fullstack"), ("a2", "fullstack"), ("a3", "fullstack"), ("a4", "custom")]


def test_flush_and_stats_before_any_event(pristine: Dict[str, Any], make_client: MakeClient) -> None:
    client = make_client("https://odp.example")
    optimizely_odp_ext.install()
    assert client.flush_odp_events(0.1) is True
    stats = client.odp_event_stats()
    assert (stats["accepted"], stats["state"], sum(stats["refused"].values())) == (0, "undetermined", 0)


@pytest.mark.parametrize("version", ["4.1.0", "6.0.0", "3.10.0"])
def test_unsupported_sdk_is_reported_and_nothing_is_installed(
    pristine: Dict[str, Any], make_client: MakeClient, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, version: str,
) -> None:
    client = make_client("https://odp.example")
    own_before = dict(client.__dict__)
    monkeypatch.setattr(_compat, "sdk_version", lambda: version)
    with caplog.at_level(logging.ERROR, logger="optimizely_odp_ext"):
        assert optimizely_odp_ext.install() is False
        assert optimizely_odp_ext.install(client) is False
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"optimizely-odp-ext supports optimizely-sdk >=4.1.1, <6; found {version}. Not installed."] * 2
    _same_dict(pristine, _class_snapshot())
    assert sorted(client.__dict__) == sorted(own_before)


def test_instance_install_over_a_class_install(pristine: Dict[str, Any], make_client: MakeClient,
                                               odp_server: FakeOdpServer, log: Log) -> None:
    optimizely_odp_ext.install(flush_interval=60.0)
    client = make_client(odp_server.url, logger=log[0])
    client.send_odp_event("a", {"fs_user_id": "class-level"})
    class_manager = manager_of(client)
    assert class_manager is not None
    assert optimizely_odp_ext.install(client, batch_size=7, flush_interval=0.01) is True
    # The class-level manager delivered what it held and stopped; the client has its own now.
    assert class_manager.closed is True
    instance_manager = manager_of(client)
    assert instance_manager is not None
    assert instance_manager is not class_manager
    assert instance_manager.options.batch_size == 7
    client.send_odp_event("a", {"fs_user_id": "instance-level"})
    assert client.flush_odp_events(WAIT) is True
    assert optimizely_odp_ext.uninstall(client) is True
    assert not any(name in client.__dict__ for name in PATCHED)
    # Back to the class-level install.
    client.send_odp_event("a", {"fs_user_id": "class-again"})
    assert client.flush_odp_events(WAIT) is True
    assert [e["identifiers"]["fs_user_id"] for e in odp_server.events] == ["class-level", "instance-level",
                                                                         "class-again"]
    assert _errors(log) == []
