"""Every install() option is checked at install: a wrong one raises ConfigurationError naming the
option, the value and what is expected, before anything is installed (issue 9, item 13), and the
options are typed for editors and mypy (issue 10)."""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import textwrap
from typing import Any, Dict, Iterator

import pytest
from optimizely import logger as sdk_logger
from optimizely import optimizely

import optimizely_odp_ext
from optimizely_odp_ext.settings import OPTION_NAMES, ConfigurationError, InstallOptions, Options, make_options
from tests.conftest import TEST_KEY

FLOATS = ("request_timeout", "connect_timeout", "flush_interval", "retry_window", "backoff_base", "backoff_max",
          "retry_after_max", "close_timeout")
BOOLS = ("flush_at_exit", "allow_insecure_http", "gzip", "spool_fsync", "flush_on_sigterm")
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def untouched() -> Iterator[None]:
    """The Optimizely class is the same after the test as before it (nothing half-installed)."""
    before = dict(optimizely.Optimizely.__dict__)
    yield
    optimizely_odp_ext.uninstall()
    assert dict(optimizely.Optimizely.__dict__) == before


def _error(**options: Any) -> str:
    with pytest.raises(ConfigurationError) as info:
        make_options(**options)
    return str(info.value)


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_float_options_must_be_finite(name: str, value: float) -> None:
    message = _error(**{name: value})
    assert message.startswith(f"{name} must be ")
    assert "finite" in message
    assert message.endswith(f", got {value!r}.")


def test_install_refuses_an_infinite_close_timeout_before_changing_anything(untouched: None) -> None:
    expected = r"^close_timeout must be a finite number >= 0 \(seconds\), got inf\.$"
    with pytest.raises(ConfigurationError, match=expected):
        optimizely_odp_ext.install(close_timeout=math.inf)


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, "", [True]])
def test_bool_options_are_strict(name: str, value: Any) -> None:
    assert _error(**{name: value}) == f"{name} must be True or False, got {value!r}."


@pytest.mark.parametrize("name", BOOLS)
def test_bool_options_take_bools(name: str) -> None:
    assert getattr(make_options(**{name: True}), name) is True
    assert getattr(make_options(**{name: False}), name) is False


@pytest.mark.parametrize("value", ["false", "False", 0, 1, "yes"])
def test_odp_disabled_is_strict(value: Any) -> None:
    """odp_disabled="false" used to disable ODP (a non-empty str is true)."""
    assert _error(odp_disabled=value) == f"odp_disabled must be True, False or None, got {value!r}."


@pytest.mark.parametrize("value", ["x", 5, object(), logging.Handler()])
def test_logger_needs_the_logging_methods(value: Any, untouched: None) -> None:
    with pytest.raises(ConfigurationError) as info:
        optimizely_odp_ext.install(logger=value)
    assert str(info.value) == (f"logger must be a logger with debug, info, warning, error methods, or None, "
                               f"got {value!r}.")


@pytest.mark.parametrize("value", [logging.getLogger("tests.any"), sdk_logger.NoOpLogger(),
                                   sdk_logger.SimpleLogger(), None])
def test_logger_accepts_loggers(value: Any) -> None:
    logger = make_options(logger=value).logger
    # optimizely-sdk 4.x's own logger objects have only log(): they become the SDK's logging.Logger.
    assert logger is value or logger is sdk_logger.adapt_logger(value)
    assert logger is None or all(callable(getattr(logger, m)) for m in ("debug", "info", "warning", "error"))


@pytest.mark.parametrize("host", [123, b"https://h", "not-a-url", "ftp://odp.example", "https://", "https://h:port",
                                  "//odp.example", ""])
def test_api_host_must_be_an_http_url(host: Any) -> None:
    assert _error(api_host=host, api_key=TEST_KEY) == (
        f'api_host must be an http(s) URL such as "https://api.zaius.com", or None, got {host!r}.')


@pytest.mark.parametrize("host", ["https://api.zaius.com", "http://127.0.0.1:8080", "https://h.example:8443/odp/"])
def test_api_host_accepts_urls(host: str) -> None:
    assert make_options(api_host=host, api_key=TEST_KEY).api_host == host


@pytest.mark.parametrize("key", ["", 5])
def test_api_key_must_be_a_non_empty_str(key: Any) -> None:
    assert _error(api_host="https://h", api_key=key).startswith("api_key must be a non-empty str")


@pytest.mark.parametrize("value", [123, b"/tmp/spool", pathlib.PurePath, 1.5])
def test_spool_dir_must_be_a_path(value: Any) -> None:
    assert _error(spool_dir=value) == (
        f"spool_dir must be a directory path (str or os.PathLike) or None, got {value!r}.")


def test_spool_dir_accepts_a_pathlike_and_keeps_a_str(tmp_path: pathlib.Path) -> None:
    options = make_options(spool_dir=tmp_path / "spool")
    assert options.spool_dir == str(tmp_path / "spool")
    assert isinstance(options.spool_dir, str)


def test_max_in_flight_has_an_upper_bound() -> None:
    assert make_options(max_in_flight=64).max_in_flight == 64
    assert _error(max_in_flight=65) == "max_in_flight must be a whole number from 1 to 64, got 65."
    assert _error(max_in_flight=2000) == "max_in_flight must be a whole number from 1 to 64, got 2000."


@pytest.mark.parametrize(("typo", "meant"), [("flush_intervall", "flush_interval"), ("close_timout", "close_timeout"),
                                             ("spooldir", "spool_dir"), ("on_outcom", "on_outcome")])
def test_unknown_option_says_did_you_mean(typo: str, meant: str, untouched: None) -> None:
    with pytest.raises(ConfigurationError) as info:
        optimizely_odp_ext.install(**{typo: 1})  # type: ignore[misc]
    assert str(info.value) == f"unknown option(s): {typo} (did you mean {meant}?)."


def test_unknown_option_without_a_close_name() -> None:
    assert _error(zzzzzz=1) == "unknown option(s): zzzzzz."


def test_repr_masks_the_api_key() -> None:
    options = make_options(api_host="https://api.zaius.com", api_key=TEST_KEY)
    for text in (repr(options), str(options), f"{options!r}", repr([options])):
        assert TEST_KEY not in text
        assert f"api_key='****{TEST_KEY[-4:]}'" in text
    assert "api_host='https://api.zaius.com'" in repr(options)
    assert "api_key=None" in repr(Options())


def test_new_options_defaults_and_checks() -> None:
    options = Options()
    assert options.flush_on_sigterm is False
    assert options.on_outcome is None

    def on_outcome(outcome: str, events: Any, detail: str) -> None:
        """A callback."""

    assert make_options(on_outcome=on_outcome).on_outcome is on_outcome
    assert _error(on_outcome="print") == (
        "on_outcome must be a callable fn(outcome, events, detail), or None, got 'print'.")


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_unusable_sdk_settings_numbers_are_ignored(value: float) -> None:
    """An infinite odp_event_timeout in the client's sdk_settings must not reach the manager."""
    from optimizely_odp_ext.settings import from_client

    class _Settings:
        odp_event_timeout = value
        odp_flush_interval = value
        odp_disabled = None

    class _Client:
        sdk_settings = _Settings()

    resolved = from_client(_Client(), Options(), frozenset())
    assert (resolved.request_timeout, resolved.flush_interval) == (5.0, 1.0)


def test_install_options_typed_dict_lists_every_option() -> None:
    """install()'s typed keywords and Options stay one list (a new option must be added to both)."""
    assert set(InstallOptions.__annotations__) == OPTION_NAMES
    assert {f.name for f in dataclasses.fields(Options)} == OPTION_NAMES


def test_mypy_rejects_a_wrong_option_type(tmp_path: pathlib.Path) -> None:
    """install(batch_size="5") and a misspelt keyword fail type checking; right types pass."""
    api = pytest.importorskip("mypy.api")
    source = tmp_path / "user_code.py"
    source.write_text(textwrap.dedent("""\
        import optimizely_odp_ext

        optimizely_odp_ext.install(batch_size=50, close_timeout=2.5, gzip=True, api_host=None, logger=None)
        optimizely_odp_ext.install(batch_size="50")
        optimizely_odp_ext.install(flush_intervall=1.0)
        optimizely_odp_ext.install(gzip="false")
    """))
    out, _err, status = api.run([str(source), "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                                 "--follow-imports", "silent", "--ignore-missing-imports"])
    errors: Dict[int, str] = {}
    for line in out.splitlines():
        parts = line.split(":", 3)
        if len(parts) == 4 and parts[2].strip() == "error":
            errors[int(parts[1])] = parts[3]
    assert status == 1, out
    assert sorted(errors) == [4, 5, 6], out
    assert "batch_size" in errors[4]
    assert "flush_intervall" in errors[5]
    assert "gzip" in errors[6]

