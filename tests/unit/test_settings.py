"""Unit tests for optimizely_odp_ext.settings: option validation and resolution from a client."""

from __future__ import annotations

import configparser
import dataclasses
import json
import logging
import pathlib
import re
import types
from typing import Any, Optional

import pytest

from optimizely_odp_ext import _compat
from optimizely_odp_ext._datafile import datafile
from optimizely_odp_ext.settings import (
    OPTION_NAMES,
    ConfigurationError,
    Options,
    client_logger,
    from_client,
    make_options,
    odp_integration,
)
from tests.conftest import TEST_KEY, requires_sdk5

ROOT = pathlib.Path(__file__).resolve().parents[2]

POSITIVE = ("batch_size", "max_batch_bytes", "queue_capacity", "max_in_flight", "request_timeout",
            "connect_timeout", "spool_max_bytes")
NON_NEGATIVE = ("flush_interval", "retry_window", "backoff_base", "backoff_max", "retry_after_max", "close_timeout")


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


def test_defaults() -> None:
    options = Options()
    assert options.batch_size == 100
    assert options.max_batch_bytes == 500_000
    assert options.flush_interval == 1.0
    assert options.queue_capacity == 10_000
    assert options.overflow == "drop_newest"
    assert options.request_timeout == 5.0
    assert options.api_host is None
    assert options.api_key is None
    assert options.odp_disabled is None
    assert options.allow_insecure_http is False
    assert options.gzip is False


WHOLE = ("batch_size", "max_batch_bytes", "queue_capacity", "max_in_flight", "spool_max_bytes")


@pytest.mark.parametrize("name", POSITIVE)
@pytest.mark.parametrize("value", [0, -1, -0.5, True, False, "5", None, float("nan")])
def test_positive_options_refuse_bad_values(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Options(**{name: value})
    kind = "a positive whole number" if name in WHOLE else "a positive finite number (seconds)"
    assert str(info.value) == f"{name} must be {kind}, got {value!r}."


@pytest.mark.parametrize("name", WHOLE)
def test_count_options_refuse_fractions(name: str) -> None:
    with pytest.raises(ConfigurationError, match="positive whole number"):
        Options(**{name: 1.5})


@pytest.mark.parametrize("name", NON_NEGATIVE)
@pytest.mark.parametrize("value", [-1, -0.001, True, "1", None, float("nan")])
def test_non_negative_options_refuse_bad_values(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Options(**{name: value})
    assert str(info.value) == f"{name} must be a finite number >= 0 (seconds), got {value!r}."


@pytest.mark.parametrize("name", NON_NEGATIVE)
def test_non_negative_options_accept_zero(name: str) -> None:
    assert getattr(Options(**{name: 0}), name) == 0


@pytest.mark.parametrize("name", POSITIVE)
def test_positive_options_accept_positive(name: str) -> None:
    assert getattr(Options(**{name: 3}), name) == 3


def test_unknown_overflow_policy() -> None:
    with pytest.raises(ConfigurationError) as info:
        Options(overflow="drop_all")  # type: ignore[arg-type]
    assert str(info.value) == "overflow must be \"drop_newest\", \"drop_oldest\" or \"block\", got 'drop_all'."


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest", "block"])
def test_known_overflow_policies(policy: Any) -> None:
    assert Options(overflow=policy).overflow == policy


@pytest.mark.parametrize("kwargs", [{"api_host": "https://x"}, {"api_key": "k"}])
def test_api_host_and_key_go_together(kwargs: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Options(**kwargs)
    assert str(info.value) == "api_host and api_key go together: give both or neither."


def test_api_host_and_key_both() -> None:
    options = Options(api_host="https://x", api_key="k")
    assert (options.api_host, options.api_key) == ("https://x", "k")


def test_options_are_frozen_and_replace_validates() -> None:
    options = Options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 5  # type: ignore[misc]
    assert options.replace(batch_size=5).batch_size == 5
    assert options.batch_size == 100
    with pytest.raises(ConfigurationError):
        options.replace(batch_size=0)


def test_make_options() -> None:
    assert make_options() == Options()
    assert make_options(batch_size=7, gzip=True) == Options(batch_size=7, gzip=True)
    base = Options(batch_size=3)
    assert make_options(base) is base
    assert make_options(base, flush_interval=0) == Options(batch_size=3, flush_interval=0)


def test_make_options_rejects_unknown_names() -> None:
    with pytest.raises(ConfigurationError) as info:
        make_options(batch_size=5, bacth_size=5, zzz=1)
    assert str(info.value) == "unknown option(s): bacth_size (did you mean batch_size?), zzz."


def test_make_options_validates_values() -> None:
    with pytest.raises(ConfigurationError):
        make_options(queue_capacity=-1)


def test_option_names() -> None:
    assert {f.name for f in dataclasses.fields(Options)} == OPTION_NAMES
    assert "batch_size" in OPTION_NAMES
    assert "logger" in OPTION_NAMES


# ----------------------------------------------------------------- from_client


def _sdk_settings(timeout: Any = None, interval: Any = None, disabled: Any = False) -> Any:
    """An object shaped like optimizely-sdk 5.x's OptimizelySdkSettings (its attribute names)."""
    return types.SimpleNamespace(odp_event_timeout=timeout, odp_flush_interval=interval, odp_disabled=disabled)


def test_from_client_without_sdk_settings_keeps_options() -> None:
    options = Options(batch_size=9)
    assert from_client(types.SimpleNamespace(), options, frozenset()) is options
    assert from_client(types.SimpleNamespace(sdk_settings=None), options, frozenset()) is options


def test_from_client_reads_sdk_settings() -> None:
    client = types.SimpleNamespace(sdk_settings=_sdk_settings(timeout=7, interval=2, disabled=True))
    resolved = from_client(client, Options(), frozenset())
    assert resolved.request_timeout == 7.0
    assert resolved.flush_interval == 2.0
    assert resolved.odp_disabled is True


def test_from_client_explicit_options_win() -> None:
    client = types.SimpleNamespace(sdk_settings=_sdk_settings(timeout=7, interval=2, disabled=True))
    options = Options(request_timeout=1.5, flush_interval=0.25, odp_disabled=False)
    resolved = from_client(client, options, frozenset({"request_timeout", "flush_interval", "odp_disabled"}))
    assert resolved == options


def test_from_client_unset_sdk_values_keep_defaults() -> None:
    client = types.SimpleNamespace(sdk_settings=_sdk_settings(timeout=None, interval=None, disabled=None))
    assert from_client(client, Options(), frozenset()) == Options()


@pytest.mark.parametrize(("timeout", "interval"), [(0, -1), (-5, -0.1), (True, True), ("3", "3")])
def test_from_client_ignores_unusable_sdk_values(timeout: Any, interval: Any) -> None:
    client = types.SimpleNamespace(sdk_settings=_sdk_settings(timeout=timeout, interval=interval))
    resolved = from_client(client, Options(), frozenset())
    assert resolved.request_timeout == 5.0
    assert resolved.flush_interval == 1.0


def test_from_client_flush_interval_zero_is_used() -> None:
    client = types.SimpleNamespace(sdk_settings=_sdk_settings(interval=0))
    assert from_client(client, Options(), frozenset()).flush_interval == 0.0


@requires_sdk5
def test_from_client_real_sdk5_client_precedence() -> None:
    from optimizely import optimizely
    from optimizely.helpers.sdk_settings import OptimizelySdkSettings

    settings = OptimizelySdkSettings(odp_event_request_timeout=9, odp_event_flush_interval=3, odp_disabled=True)
    client = optimizely.Optimizely(datafile(None, None), settings=settings)
    try:
        from_sdk = from_client(client, Options(), frozenset())
        assert (from_sdk.request_timeout, from_sdk.flush_interval, from_sdk.odp_disabled) == (9.0, 3.0, True)

        explicit = Options(request_timeout=2.0, odp_disabled=False)
        mixed = from_client(client, explicit, frozenset({"request_timeout", "odp_disabled"}))
        assert (mixed.request_timeout, mixed.flush_interval, mixed.odp_disabled) == (2.0, 3.0, False)
    finally:
        client.close()


@requires_sdk5
def test_from_client_real_sdk5_default_settings_give_defaults() -> None:
    from optimizely import optimizely

    client = optimizely.Optimizely(datafile(None, None))
    try:
        resolved = from_client(client, Options(), frozenset())
        assert (resolved.request_timeout, resolved.flush_interval, resolved.odp_disabled) == (5.0, 1.0, False)
    finally:
        client.close()


def test_client_logger() -> None:
    mine = logging.getLogger("tests.mine")
    theirs = logging.getLogger("tests.theirs")
    assert client_logger(types.SimpleNamespace(logger=theirs), Options(logger=mine)) is mine
    assert client_logger(types.SimpleNamespace(logger=theirs), Options()) is theirs
    assert client_logger(types.SimpleNamespace(), Options()) is logging.getLogger("optimizely_odp_ext")


# ----------------------------------------------------------------- odp_integration


class _Sdk4LikeConfig:
    """A project config as optimizely-sdk 4.x has it: no ODP attributes, only to_datafile()."""

    def __init__(self, raw: Optional[str]) -> None:
        self._raw = raw

    def to_datafile(self) -> Optional[str]:
        return self._raw


def test_odp_integration_no_config_is_undetermined() -> None:
    assert odp_integration(None) == (None, None, False)


def test_odp_integration_sdk4_like_config() -> None:
    config = _Sdk4LikeConfig(datafile("https://odp.example", "pk-1"))
    assert odp_integration(config) == ("https://odp.example", "pk-1", True)


def test_odp_integration_sdk4_like_config_not_integrated() -> None:
    assert odp_integration(_Sdk4LikeConfig(datafile(None, None))) == (None, None, True)


def test_odp_integration_sdk4_like_config_other_integrations_only() -> None:
    raw = json.loads(datafile(None, None))
    raw["integrations"] = [{"key": "segment", "host": "https://s", "publicKey": "x"}]
    assert odp_integration(_Sdk4LikeConfig(json.dumps(raw))) == (None, None, True)


@pytest.mark.parametrize("raw", ["not json", "", None, "[1, 2]"])
def test_odp_integration_sdk4_like_config_unreadable_datafile(raw: Optional[str]) -> None:
    assert odp_integration(_Sdk4LikeConfig(raw)) == (None, None, True)


def test_odp_integration_sdk5_like_attributes() -> None:
    config = types.SimpleNamespace(host_for_odp="https://h", public_key_for_odp="k")
    assert odp_integration(config) == ("https://h", "k", True)
    config = types.SimpleNamespace(host_for_odp=None, public_key_for_odp=None)
    assert odp_integration(config) == (None, None, True)
    config = types.SimpleNamespace(host_for_odp="", public_key_for_odp="")
    assert odp_integration(config) == (None, None, True)


def test_odp_integration_integrations_attribute() -> None:
    config = types.SimpleNamespace(integrations=[{"key": "odp", "host": "https://h2", "publicKey": "k2"}])
    assert odp_integration(config) == ("https://h2", "k2", True)
    config = types.SimpleNamespace(integrations=[{"key": "odp", "host": "", "publicKey": 5}])
    assert odp_integration(config) == (None, None, True)
    config = types.SimpleNamespace(integrations=[])
    assert odp_integration(config) == (None, None, True)


def test_odp_integration_real_project_config() -> None:
    """The installed SDK's own ProjectConfig (5.x attributes, or 4.x to_datafile)."""
    from optimizely import optimizely

    integrated = optimizely.Optimizely(datafile("https://api.zaius.com", TEST_KEY))
    plain = optimizely.Optimizely(datafile(None, None))
    try:
        assert odp_integration(integrated.config_manager.get_config()) == ("https://api.zaius.com", TEST_KEY, True)
        assert odp_integration(plain.config_manager.get_config()) == (None, None, True)
    finally:
        for client in (integrated, plain):
            close = getattr(client, "close", None)
            if callable(close):
                close()


# ----------------------------------------------------------------- the supported range, stated once


def test_setup_cfg_sdk_bounds_match_compat() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    requires = [line.strip() for line in parser["options"]["install_requires"].splitlines() if line.strip()]
    sdk_lines = [line for line in requires if re.match(r"optimizely-sdk\b", line)]
    assert len(sdk_lines) == 1, requires
    line = sdk_lines[0]
    lower = re.search(r">=\s*([0-9][0-9.]*)", line)
    upper = re.search(r"<\s*([0-9][0-9.]*)", line)
    assert lower is not None
    assert upper is not None
    assert _compat._parse_version(lower.group(1)) == _compat.SUPPORTED_SDK_MIN
    assert _compat._parse_version(upper.group(1)) == _compat.SUPPORTED_SDK_BELOW
    assert not re.search(r"(?<![<>])=|~|!", line.replace(">=", "")), line  # no other specifier hidden in it


def test_compat_range_string_matches_tuples() -> None:
    text = _compat.SUPPORTED_SDK.replace(" ", "")
    assert text == ">={}.{}.{},<{}".format(*_compat.SUPPORTED_SDK_MIN, _compat.SUPPORTED_SDK_BELOW[0])
    assert _compat.SUPPORTED_SDK_BELOW[1:] == (0, 0)


@pytest.mark.parametrize(
    ("version", "supported"),
    [((4, 1, 1), True), ((4, 1, 0), False), ((5, 7, 0), True), ((5, 99, 9), True), ((6, 0, 0), False),
     ((3, 9, 9), False)],
)
def test_is_supported_sdk(version: Any, supported: bool) -> None:
    assert _compat.is_supported_sdk(version) is supported


@pytest.mark.parametrize(
    ("text", "parsed"), [("5.7.0", (5, 7, 0)), ("4.1.1", (4, 1, 1)), ("6", (6, 0, 0)), ("5.0.0b1", (5, 0, 0)),
                         ("5.1.0rc2", (5, 1, 0))],
)
def test_parse_version(text: str, parsed: Any) -> None:
    assert _compat._parse_version(text) == parsed


def test_installed_sdk_is_supported() -> None:
    assert _compat.is_supported_sdk(_compat.sdk_version_tuple())
