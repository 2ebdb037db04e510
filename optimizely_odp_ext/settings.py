"""Options, their defaults, and how they are resolved from an Optimizely client.

Precedence, highest first: a keyword given to ``install()``; the client's own ``sdk_settings``
(``odp_event_request_timeout``, ``odp_event_flush_interval``, ``odp_disabled``, optimizely-sdk 5.x);
the defaults below.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union
from urllib.parse import urlsplit

from typing_extensions import Literal, TypedDict, get_args

from .transport import mask_key

OverflowPolicy = Literal["drop_newest", "drop_oldest", "block"]
# on_outcome(outcome, events, detail): see Options.on_outcome.
OutcomeCallback = Callable[[str, List[Dict[str, Any]], str], None]
# What spool_dir accepts; it is stored as a str.
PathType = Union[str, "os.PathLike[str]"]

MAX_IN_FLIGHT = 64  # each request in flight is a thread and a connection of its own
# What a logger given as an option must offer: the calls this plugin makes on it.
LOGGER_METHODS = ("debug", "info", "warning", "error")


class ConfigurationError(ValueError):
    """An ``install()`` option that cannot work (a negative size, an unknown policy, ...)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything ``install()`` accepts as keywords. See docs/options.md for each one's purpose.

    Attributes:
        batch_size: Events per request while the senders keep up (ODP's own clients send 100).
        max_batch_size: Events per request at most when a backlog waits: batches grow from
            ``batch_size`` toward this (ODP's limit, 500) to spread the backlog over the requests
            that may be in flight. Set it to ``batch_size`` to keep every request at ``batch_size``.
        max_batch_bytes: Bytes per request body at most.
        flush_interval: Seconds an incomplete batch waits for more events. 0 sends at once.
        queue_capacity: Events held in memory (waiting, or during an outage) before the overflow
            policy applies.
        overflow: ``"drop_newest"`` (default) refuses new events while full; ``"drop_oldest"``
            makes room by dropping the oldest waiting event; ``"block"`` makes the caller wait up
            to ``block_timeout`` for room (for batch jobs), then drops the new event.
        block_timeout: With ``overflow="block"``, seconds a caller waits for room at most.
        request_timeout: Seconds to wait for ODP's reply to one request.
        connect_timeout: Seconds to wait for a connection.
        max_in_flight: Requests in flight at once at most: the ceiling of the adaptive limit, which
            starts at 4 and grows while round trips stay flat (a sender thread and a connection each).
        retry_window: Seconds after a batch's first attempt during which it is retried.
        backoff_base: The first retry's backoff, in seconds.
        backoff_max: The largest backoff, in seconds.
        retry_after_max: The longest ``Retry-After`` honoured, in seconds.
        close_timeout: Seconds ``close()`` (and the exit hook) may spend delivering what is queued.
        flush_at_exit: Deliver what is queued when the interpreter exits without ``close()``.
        api_host: Overrides the ODP host from the datafile.
        api_key: Overrides the ODP public key from the datafile.
        odp_disabled: Overrides the client's ``sdk_settings.odp_disabled``.
        allow_insecure_http: Allow plain http to a host that is not loopback.
        gzip: Compress request bodies (ODP does not document it; off by default).
        spool_dir: A directory for the durable spool (crash-safe delivery); None keeps events in
            memory only.
        spool_fsync: fsync each group of spooled events (slower; survives power loss too).
        spool_max_bytes: The spool's size cap; the overflow policy applies past it.
        logger: Overrides the client's logger for this plugin's lines: anything with ``debug``,
            ``info``, ``warning`` and ``error`` methods (a ``logging.Logger``, the SDK's loggers).
        flush_on_sigterm: On SIGTERM with Python's default handling, deliver what is queued
            (within ``close_timeout``) before the process ends; off by default.
        on_outcome: ``fn(outcome, events, detail)``, called on the worker thread once per batch
            outcome (``"delivered"`` or a drop reason) with the events' dicts; None calls nothing.
    """

    batch_size: int = 100
    max_batch_size: int = 500
    max_batch_bytes: int = 500_000
    flush_interval: float = 1.0
    queue_capacity: int = 10_000
    overflow: OverflowPolicy = "drop_newest"
    block_timeout: float = 10.0
    request_timeout: float = 5.0
    connect_timeout: float = 3.0
    max_in_flight: int = 16
    retry_window: float = 300.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 60.0
    close_timeout: float = 15.0
    flush_at_exit: bool = True
    api_host: Optional[str] = None
    api_key: Optional[str] = None
    odp_disabled: Optional[bool] = None
    allow_insecure_http: bool = False
    gzip: bool = False
    spool_dir: Optional[str] = None
    spool_fsync: bool = False
    spool_max_bytes: int = 256 * 1024 * 1024
    logger: Optional[Any] = None
    flush_on_sigterm: bool = False
    on_outcome: Optional[OutcomeCallback] = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_batch_size", "max_batch_bytes", "queue_capacity", "max_in_flight",
                     "spool_max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _invalid(name, value, "a positive whole number")
        if self.max_in_flight > MAX_IN_FLIGHT:
            raise _invalid("max_in_flight", self.max_in_flight, f"a whole number from 1 to {MAX_IN_FLIGHT}")
        for name in ("request_timeout", "connect_timeout"):
            if not _finite(getattr(self, name)) or not getattr(self, name) > 0:
                raise _invalid(name, getattr(self, name), "a positive finite number (seconds)")
        for name in ("flush_interval", "retry_window", "backoff_base", "backoff_max", "retry_after_max",
                     "close_timeout", "block_timeout"):
            if not _finite(getattr(self, name)) or not getattr(self, name) >= 0:
                raise _invalid(name, getattr(self, name), "a finite number >= 0 (seconds)")
        policies = get_args(OverflowPolicy)
        if self.overflow not in policies:
            quoted = [f'"{p}"' for p in policies]
            raise _invalid("overflow", self.overflow, ", ".join(quoted[:-1]) + " or " + quoted[-1])
        # Strict: "false" or 0 must not pass for False (odp_disabled="false" would disable ODP).
        for name in ("flush_at_exit", "allow_insecure_http", "gzip", "spool_fsync", "flush_on_sigterm"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "True or False")
        if self.odp_disabled is not None and not isinstance(self.odp_disabled, bool):
            raise _invalid("odp_disabled", self.odp_disabled, "True, False or None")
        self._check_api()
        if self.spool_dir is not None:
            if not isinstance(self.spool_dir, (str, os.PathLike)) or not isinstance(os.fspath(self.spool_dir), str):
                raise _invalid("spool_dir", self.spool_dir, "a directory path (str or os.PathLike) or None")
            object.__setattr__(self, "spool_dir", os.fspath(self.spool_dir))  # frozen: set once, here
        if self.logger is not None and not _is_logger(self.logger):
            adapted = _adapt_sdk_logger(self.logger)
            if adapted is None:
                expected = f"a logger with {', '.join(LOGGER_METHODS)} methods, or None"
                raise _invalid("logger", self.logger, expected)
            object.__setattr__(self, "logger", adapted)  # frozen: set once, here
        if self.on_outcome is not None and not callable(self.on_outcome):
            raise _invalid("on_outcome", self.on_outcome, "a callable fn(outcome, events, detail), or None")

    def _check_api(self) -> None:
        if self.api_host is not None:
            host = self.api_host
            parts = urlsplit(host) if isinstance(host, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not _hostname(parts):
                raise _invalid("api_host", host, "an http(s) URL such as \"https://api.zaius.com\", or None")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigurationError(f"api_key must be a non-empty str, got a {type(self.api_key).__name__}.")
        if (self.api_host is None) != (self.api_key is None):
            raise ConfigurationError("api_host and api_key go together: give both or neither.")

    def __repr__(self) -> str:
        # The API key is a credential: logs and tracebacks show only its last characters.
        fields = ", ".join(
            f"{f.name}={repr(mask_key(v)) if f.name == 'api_key' and isinstance(v, str) else repr(v)}"
            for f in dataclasses.fields(self) for v in (getattr(self, f.name),))
        return f"Options({fields})"

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` applied (validated the same way)."""
        return dataclasses.replace(self, **changes)


def _invalid(name: str, value: Any, expected: str) -> ConfigurationError:
    return ConfigurationError(f"{name} must be {expected}, got {value!r}.")


def _finite(value: Any) -> bool:
    """A real number (not a bool) that is neither infinite nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_logger(logger: Any) -> bool:
    return all(callable(getattr(logger, method, None)) for method in LOGGER_METHODS)


def _adapt_sdk_logger(logger: Any) -> Any:
    """The SDK's own logger objects (optimizely-sdk 4.x ``NoOpLogger``/``SimpleLogger`` have only
    ``log()``) as the ``logging.Logger`` the SDK itself would use; None when not one of them."""
    try:
        from optimizely.logger import adapt_logger
    except ImportError:
        return None
    adapted = adapt_logger(logger)
    return adapted if adapted is not logger and _is_logger(adapted) else None


def _hostname(parts: Any) -> bool:
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return bool(parts.hostname)


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Options))


class InstallOptions(TypedDict, total=False):
    """The keyword options of ``install()``, typed (see :class:`Options` for each one)."""

    batch_size: int
    max_batch_size: int
    max_batch_bytes: int
    flush_interval: float
    queue_capacity: int
    overflow: OverflowPolicy
    block_timeout: float
    request_timeout: float
    connect_timeout: float
    max_in_flight: int
    retry_window: float
    backoff_base: float
    backoff_max: float
    retry_after_max: float
    close_timeout: float
    flush_at_exit: bool
    api_host: Optional[str]
    api_key: Optional[str]
    odp_disabled: Optional[bool]
    allow_insecure_http: bool
    gzip: bool
    spool_dir: Optional[PathType]
    spool_fsync: bool
    spool_max_bytes: int
    logger: Optional[Any]
    flush_on_sigterm: bool
    on_outcome: Optional[OutcomeCallback]


def make_options(base: Optional[Options] = None, **overrides: Any) -> Options:
    """Builds :class:`Options` from keywords, rejecting unknown names with a clear error."""
    unknown = sorted(set(overrides) - OPTION_NAMES)
    if unknown:
        raise ConfigurationError("unknown option(s): " + ", ".join(_did_you_mean(name) for name in unknown) + ".")
    return (base or Options()).replace(**overrides) if overrides else (base or Options())


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(OPTION_NAMES), n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def from_client(client: Any, options: Options, explicit: frozenset) -> Options:  # type: ignore[type-arg]
    """Fills in what the client's ``sdk_settings`` say, unless the option was given explicitly.

    Args:
        client: The Optimizely client.
        options: The options so far.
        explicit: Names given explicitly to ``install()``; these win over the client.

    Returns:
        The resolved options.
    """
    sdk_settings = getattr(client, "sdk_settings", None)
    if sdk_settings is None:
        return options
    changes: Dict[str, Any] = {}
    timeout = _number(getattr(sdk_settings, "odp_event_timeout", None))
    if "request_timeout" not in explicit and timeout is not None and timeout > 0:
        changes["request_timeout"] = timeout
    interval = _number(getattr(sdk_settings, "odp_flush_interval", None))
    if "flush_interval" not in explicit and interval is not None and interval >= 0:
        changes["flush_interval"] = interval
    disabled = getattr(sdk_settings, "odp_disabled", None)
    if "odp_disabled" not in explicit and isinstance(disabled, bool):
        changes["odp_disabled"] = disabled
    return options.replace(**changes) if changes else options


def _number(value: object) -> Optional[float]:
    # An infinite or NaN sdk_settings value is ignored like any other unusable one.
    return float(value) if _finite(value) else None  # type: ignore[arg-type]


# Where configuration problems and lost events also go when the client's logger shows nothing.
MIRROR_LOGGER = "optimizely_odp_ext"


class VisibleLogger:
    """The user-facing logger, made visible by default.

    The SDK's default logger is a no-op (a ``NullHandler``), so without this a refused host, a
    full queue or a dropped batch would print nothing. Warning and error lines go to the wrapped
    logger as always and, only while that logger shows nothing (every handler it reaches is a
    ``NullHandler``), also to the ``optimizely_odp_ext`` Python logger, which Python's last-resort
    handler prints when the application configured no logging. A logger that shows lines gets
    each line once. Checked at each line: logging configured later is honoured.

    Args:
        inner: The client's logger (or the ``logger`` option).
    """

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.inner.debug(msg, *args, **self._where(kwargs))

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.inner.info(msg, *args, **self._where(kwargs))

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.inner.warning(msg, *args, **self._where(kwargs))
        self._mirror(logging.WARNING, msg, args)

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.inner.error(msg, *args, **self._where(kwargs))
        self._mirror(logging.ERROR, msg, args)

    def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.inner.exception(msg, *args, **self._where(kwargs))
        self._mirror(logging.ERROR, msg, args)

    def _where(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        # A record's file and line are the caller's, not this wrapper's (logging.Logger only).
        if isinstance(self.inner, logging.Logger):
            kwargs.setdefault("stacklevel", 2)
        return kwargs

    def __getattr__(self, name: str) -> Any:
        # Anything else the caller may use (log, isEnabledFor, handlers, ...) is the wrapped logger's.
        return getattr(self.inner, name)

    def _mirror(self, level: int, msg: Any, args: Any) -> None:
        if _shows_nothing(self.inner):
            logging.getLogger(MIRROR_LOGGER).log(level, msg, *args, stacklevel=3)


def _shows_nothing(logger: Any) -> bool:
    """Whether every handler ``logger`` reaches is a ``NullHandler`` (the SDK's ``NoOpLogger``).

    A logger that reaches no handler at all is not silent: Python's last-resort handler prints its
    warnings and errors already, so mirroring them would print them twice.
    """
    if not isinstance(logger, logging.Logger):
        # The SDK's NoOpLogger object given as the logger option: it drops every line.
        return type(logger).__name__ == "NoOpLogger"
    if logger.name == MIRROR_LOGGER:
        return False
    found = False
    current: Optional[logging.Logger] = logger
    while current is not None:
        for handler in current.handlers:
            if not isinstance(handler, logging.NullHandler):
                return False
            found = True
        if not current.propagate:
            break
        current = current.parent
    return found


def visible(logger: Any) -> VisibleLogger:
    """``logger`` wrapped in a :class:`VisibleLogger` (once)."""
    return logger if isinstance(logger, VisibleLogger) else VisibleLogger(logger)


def client_logger(client: Any, options: Options) -> Any:
    """The logger for user-facing lines: the option, else the client's, else this module's."""
    if options.logger is not None:
        return options.logger
    logger = getattr(client, "logger", None)
    return logger if logger is not None else logging.getLogger("optimizely_odp_ext")


def odp_integration(config: Any) -> Tuple[Optional[str], Optional[str], bool]:
    """Reads the ODP host and public key from a project config.

    Works on optimizely-sdk 5.x (``host_for_odp`` / ``public_key_for_odp``) and 4.x (no ODP code:
    the datafile's ``integrations`` list is read directly).

    Args:
        config: A ``ProjectConfig``, or None while the datafile has not arrived.

    Returns:
        ``(host, key, determined)``: ``determined`` is False while there is no datafile yet.
    """
    if config is None:
        return None, None, False
    if hasattr(config, "host_for_odp"):
        return (getattr(config, "host_for_odp", None) or None,
                getattr(config, "public_key_for_odp", None) or None, True)
    integrations = getattr(config, "integrations", None)
    if integrations is None:
        to_datafile = getattr(config, "to_datafile", None)
        try:
            raw = to_datafile() if callable(to_datafile) else None
            integrations = json.loads(raw).get("integrations", []) if raw else []
        except (ValueError, TypeError, AttributeError):
            integrations = []
    for entry in integrations or []:
        if isinstance(entry, dict) and entry.get("key") == "odp":
            host, key = entry.get("host"), entry.get("publicKey")
            return (host if isinstance(host, str) and host else None,
                    key if isinstance(key, str) and key else None, True)
        if getattr(entry, "key", None) == "odp":
            return getattr(entry, "host", None) or None, getattr(entry, "publicKey", None) or None, True
    return None, None, True
