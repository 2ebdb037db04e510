"""Options, their defaults, and how they are resolved from an Optimizely client.

Precedence, highest first: a keyword given to ``install()``; the client's own ``sdk_settings``
(``odp_event_request_timeout``, ``odp_event_flush_interval``, ``odp_disabled``, optimizely-sdk 5.x);
the defaults below.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Dict, Optional, Tuple

from typing_extensions import Literal

OverflowPolicy = Literal["drop_newest", "drop_oldest", "block"]


class ConfigurationError(ValueError):
    """An ``install()`` option that cannot work (a negative size, an unknown policy, ...)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything ``install()`` accepts as keywords. See the README for each one's purpose.

    Attributes:
        batch_size: Events per request at most (ODP's own clients cap requests at 100 events).
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
        max_in_flight: Requests in flight at once.
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
        logger: Overrides the client's logger for this plugin's lines.
    """

    batch_size: int = 100
    max_batch_bytes: int = 500_000
    flush_interval: float = 1.0
    queue_capacity: int = 10_000
    overflow: OverflowPolicy = "drop_newest"
    block_timeout: float = 10.0
    request_timeout: float = 5.0
    connect_timeout: float = 3.0
    max_in_flight: int = 4
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

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_batch_bytes", "queue_capacity", "max_in_flight", "spool_max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(f"{name} must be a positive whole number, got {value!r}.")
        positive = ("request_timeout", "connect_timeout")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}.")
        non_negative = ("flush_interval", "retry_window", "backoff_base", "backoff_max",
                        "retry_after_max", "close_timeout", "block_timeout")
        for name in non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigurationError(f"{name} must be a number >= 0, got {value!r}.")
        if not math.isfinite(self.block_timeout):
            raise ConfigurationError(f"block_timeout must be a finite number, got {self.block_timeout!r}.")
        if self.overflow not in ("drop_newest", "drop_oldest", "block"):
            raise ConfigurationError(
                f'overflow must be "drop_newest", "drop_oldest" or "block", got {self.overflow!r}.')
        if (self.api_host is None) != (self.api_key is None):
            raise ConfigurationError("api_host and api_key go together: give both or neither.")

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` applied (validated the same way)."""
        return dataclasses.replace(self, **changes)


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Options))


def make_options(base: Optional[Options] = None, **overrides: Any) -> Options:
    """Builds :class:`Options` from keywords, rejecting unknown names with a clear error."""
    unknown = sorted(set(overrides) - OPTION_NAMES)
    if unknown:
        raise ConfigurationError(f"unknown option(s): {', '.join(unknown)}.")
    return (base or Options()).replace(**overrides) if overrides else (base or Options())


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
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


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
