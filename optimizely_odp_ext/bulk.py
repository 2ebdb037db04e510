"""Backfills from Spark (or any batch job): send one partition of events, safely re-sendable.

A Spark job calls :func:`send_partition` once per partition, on the executors::

    sender = bulk.PartitionSender(host=host, api_key=key, dataset="orders-2026")
    df.foreachPartition(sender)                                   # or, to see each partition's summary:
    summaries = df.rdd.mapPartitions(lambda rows: [sender(rows)]).collect()

Each row is one event in the import's line shape: ``action`` (required), ``identifiers`` (a mapping,
required), ``type`` (default ``"fullstack"``), ``data`` (a mapping, optional). A ``pyspark.sql.Row`` is
taken with ``asDict(recursive=True)``; pyspark itself is never imported here.

Why it is safe under Spark's task retries and speculative execution: an event without
``data.idempotence_id`` gets a deterministic one, the UUID5 of the dataset name and the event's
canonical JSON (:func:`event_id`), so a re-sent partition sends the same ids and ODP de-duplicates
them. Two identical rows are therefore one event: to keep real repeats apart, give each row
something of its own in ``data`` (an order id, a timestamp) or your own ``idempotence_id``.

Why it never drops silently: the rows are read as the events go out (``overflow="block"``: the
reader waits, memory stays bounded whatever the partition's size), :func:`send_partition` returns
only when every event was delivered or given up, and raises :class:`PartitionNotDelivered` when any
valid event was given up for another reason than ODP refusing that very event (an outage longer
than ``retry_window``, say): Spark's task retry then re-sends the partition, with the same ids.
Invalid rows are counted and logged (the first few, with their position), never raised.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

from typing_extensions import TypedDict

from ._sending import NAMESPACE_URL, bulk_manager, settle_timeout, uuid5_namer
from .event import Pending, validate
from .settings import ConfigurationError
from .transport import check_host, mask_key

__all__ = ["REFUSED_BY_ODP", "PartitionNotDelivered", "PartitionSender", "Summary", "event_id", "send_partition"]

_log = logging.getLogger(__name__)

# Drop reasons that are ODP's answer about one event (a 4xx for it alone, or an event too large or
# impossible to encode): sending it again cannot help, so they are counted, not raised.
REFUSED_BY_ODP = frozenset(("rejected", "too_large", "unencodable"))
_FIELDS = frozenset(("action", "identifiers", "type", "data"))
_LOGGED_INVALID = 3  # invalid rows logged one by one per partition; the rest are counted
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class Summary(TypedDict):
    """What one partition did.

    Attributes:
        read: Rows read.
        delivered: Events ODP accepted (202).
        invalid: Rows discarded as not a valid event (logged).
        dropped: Valid events given up, by reason (only reasons that occurred): a drop reason of
            ``odp_event_stats()``, or ``refused`` for events the event manager would not take.
        seconds: Time spent, from the first row to the last answer.
        peak_rss_bytes: The peak resident memory of this process so far (the executor's Python worker);
            0 where the platform cannot tell.
    """

    read: int
    delivered: int
    invalid: int
    dropped: Dict[str, int]
    seconds: float
    peak_rss_bytes: int


class PartitionNotDelivered(Exception):
    """Some valid events of the partition were not delivered (an outage past ``retry_window``...).

    Raised so that Spark retries the task; the retry sends the same ids, which ODP de-duplicates.

    Attributes:
        summary: What the partition did before giving up.
    """

    def __init__(self, message: str, summary: Summary) -> None:
        super().__init__(message)
        self.summary = summary

    def __reduce__(self) -> Tuple[Any, Tuple[str, Summary]]:
        return self.__class__, (str(self), self.summary)  # picklable, for multiprocessing and Spark


def event_id(dataset: str) -> Callable[[Pending], str]:
    """Returns ``id_of(event)``, the deterministic ``idempotence_id`` of a validated event:
    ``uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "odp-bulk:" + dataset), canonical)``, where
    ``canonical`` is the JSON of ``{"action", "data", "identifiers", "type"}`` (normalized as
    ``send_odp_event`` does, ``data`` without ``idempotence_id``, keys sorted, no spaces, non-ASCII
    kept as is).
    """
    namespace = bytes.fromhex(uuid5_namer(NAMESPACE_URL)("odp-bulk:" + dataset).replace("-", ""))
    name_to_id = uuid5_namer(namespace)

    def id_of(event: Pending) -> str:
        type_, action, identifiers, data = event
        return name_to_id(_canonical({"action": action, "data": data or {}, "identifiers": identifiers,
                                      "type": type_}))

    return id_of


def send_partition(rows: Iterable[Any], *, host: str, api_key: str, dataset: str, batch_size: int = 500,
                   max_in_flight: int = 4, retry_window: float = 60.0, request_timeout: float = 10.0,
                   allow_insecure_http: bool = False, logger: Optional[Any] = None) -> Summary:
    """Sends one partition's events to ODP; returns when each was delivered or given up.

    Args:
        rows: The events: mappings or ``pyspark.sql.Row`` objects (see the module docstring).
        host: The ODP host, e.g. ``"https://api.zaius.com"``.
        api_key: The ODP public key (never logged in full).
        dataset: Names this backfill; with each event's content it makes the event's id.
        batch_size: Events per request (ODP takes 500 at most).
        max_in_flight: Requests in flight at once.
        retry_window: Seconds a failing batch is retried before it is given up.
        request_timeout: Seconds to wait for ODP's answer to one request.
        allow_insecure_http: Allow a plain http host that is not loopback.
        logger: Where lines go; default the ``optimizely_odp_ext.bulk`` logger.

    Returns:
        The partition's :class:`Summary`.

    Raises:
        PartitionNotDelivered: When a valid event was given up for a reason other than ODP refusing
            it (see :data:`REFUSED_BY_ODP`), or delivery did not end in time.
        ConfigurationError: When an argument cannot work (no dataset, a bad host, a batch too large).
    """
    if not isinstance(dataset, str) or not dataset:
        raise ConfigurationError(f"dataset must be a non-empty str, got {dataset!r}.")
    if isinstance(batch_size, int) and batch_size > 500:
        raise ConfigurationError(f"batch_size must be at most 500 (ODP's limit per request), got {batch_size}.")
    refusal = check_host(host, allow_insecure_http) if isinstance(host, str) else None
    if refusal is not None:  # the manager would refuse every event: say so before reading anything
        raise ConfigurationError(refusal.replace("to install()", "to send_partition()"))
    log = logger if logger is not None else _log
    started = time.monotonic()
    manager, transports = bulk_manager(
        host, api_key, log, batch_size=batch_size, max_in_flight=max_in_flight, retry_window=retry_window,
        request_timeout=request_timeout, allow_insecure_http=allow_insecure_http, flush_interval=0.2,
        # Bounded memory: the reader waits once this many events are waiting to be sent.
        queue_capacity=batch_size * (max_in_flight + 2))
    reader = _Reader(event_id(dataset), log, _partition_name())
    stopped = done = False
    refused = 0  # events the manager would not take (it logged why): lost like any other
    try:
        enqueue = manager.enqueue
        check_every = batch_size
        for event in reader.events(rows):
            if not enqueue(event):
                refused += 1
            if reader.valid % check_every == 0 and (refused or _lost(manager.stats()["dropped"])):
                stopped = True  # the rest would be lost too: let Spark retry the partition instead
                break
        reader.close()
        done = manager.flush(settle_timeout(retry_window, request_timeout))
    finally:
        manager.close(1.0 if done or stopped else request_timeout + 5.0)
    stats = manager.stats()
    summary = Summary(read=reader.read, delivered=stats["delivered"], invalid=reader.invalid,
                      dropped={reason: n for reason, n in stats["dropped"].items() if n},
                      seconds=round(time.monotonic() - started, 3), peak_rss_bytes=_peak_rss())
    if refused:
        summary["dropped"]["refused"] = refused
    lost = _lost(summary["dropped"])
    if lost or stopped or not done:
        last = transports[0].last_failure if transports else None
        why = f"; last failure: HTTP {last.status}" if last is not None and last.status else (
            f"; last failure: {last.detail}" if last is not None else "")
        raise PartitionNotDelivered(
            f"ODP bulk: {reader.where}: {lost:,} of {reader.valid:,} valid event(s) not delivered "
            f"({_reasons(summary['dropped']) or 'delivery did not finish in time'}), "
            f"{summary['delivered']:,} delivered, {reader.invalid:,} invalid"
            + (f", stopped after reading {reader.read:,} row(s)" if stopped else "") + why
            + "; a retry re-sends the partition with the same ids", summary)
    return summary


class PartitionSender:
    """:func:`send_partition` with its arguments bound, for ``df.foreachPartition(sender)``.

    Unlike ``functools.partial``, its ``repr`` (in a traceback, a log line, Spark's UI) shows only
    the key's last four characters. Pickled with the task: keep the key out of Spark's conf and job
    descriptions, and this object is the only place it travels.

    Args:
        host: The ODP host.
        api_key: The ODP public key.
        dataset: Names this backfill (see :func:`event_id`).
        options: Any other keyword of :func:`send_partition`.
    """

    def __init__(self, *, host: str, api_key: str, dataset: str, **options: Any) -> None:
        unknown = set(options) - {"batch_size", "max_in_flight", "retry_window", "request_timeout",
                                  "allow_insecure_http", "logger"}
        if unknown:
            raise ConfigurationError(f"unknown option(s) for send_partition: {', '.join(sorted(unknown))}.")
        self.host = host
        self.api_key = api_key
        self.dataset = dataset
        self.options = options

    @classmethod
    def from_datafile(cls, datafile: Union[str, bytes, Mapping[str, Any]], *, dataset: str,
                      **options: Any) -> PartitionSender:
        """A sender for the ODP host and public key of an Optimizely datafile (its ``odp`` integration).

        Args:
            datafile: The datafile, as JSON text or parsed; the driver reads it (a file, the CDN).
            dataset: Names this backfill.
            options: Any other keyword of :func:`send_partition`.

        Raises:
            ConfigurationError: When the datafile is not JSON or has no ODP integration.
        """
        host, key = odp_from_datafile(datafile)
        return cls(host=host, api_key=key, dataset=dataset, **options)

    def __call__(self, rows: Iterable[Any]) -> Summary:
        return send_partition(rows, host=self.host, api_key=self.api_key, dataset=self.dataset, **self.options)

    def __repr__(self) -> str:
        return (f"PartitionSender(host={self.host!r}, api_key={mask_key(self.api_key)!r}, "
                f"dataset={self.dataset!r}, options={self.options!r})")


def odp_from_datafile(datafile: Union[str, bytes, Mapping[str, Any]]) -> Tuple[str, str]:
    """``(host, public key)`` of the datafile's ``odp`` integration.

    Raises:
        ConfigurationError: When the datafile is not JSON or has no ODP integration.
    """
    try:
        parsed = json.loads(datafile) if isinstance(datafile, (str, bytes)) else datafile
    except ValueError as exc:
        raise ConfigurationError(f"the datafile is not valid JSON ({exc}).") from None
    integrations = parsed.get("integrations") if isinstance(parsed, Mapping) else None
    for entry in integrations if isinstance(integrations, list) else []:
        if isinstance(entry, Mapping) and entry.get("key") == "odp":
            host, key = entry.get("host"), entry.get("publicKey")
            if isinstance(host, str) and host and isinstance(key, str) and key:
                return host, key
    raise ConfigurationError("the datafile has no ODP integration (no \"odp\" entry with a host and publicKey).")


class _Reader:
    """Rows in, validated events with their ids out; counts what it read and logs the first invalid rows."""

    def __init__(self, id_of: Callable[[Pending], str], logger: Any, where: str) -> None:
        self._id_of = id_of
        self._logger = logger
        self.where = where
        self.read = self.valid = self.invalid = 0

    def events(self, rows: Iterable[Any]) -> Iterable[Pending]:
        for row in rows:
            self.read += 1
            try:
                event = self._event(row)
            except Exception as exc:  # a Row whose asDict fails, a mapping that raises: bad input
                event = f"could not be read ({exc.__class__.__name__})"
            if isinstance(event, str):
                self.invalid += 1
                if self.invalid <= _LOGGED_INVALID:
                    self._logger.error(f"ODP bulk: {self.where}, row {self.read:,}: event discarded: {event}")
                continue
            self.valid += 1
            yield event

    def close(self) -> None:
        if self.invalid > _LOGGED_INVALID:
            self._logger.error(f"ODP bulk: {self.where}: {self.invalid:,} invalid row(s) discarded in all, "
                               f"{self.invalid - _LOGGED_INVALID:,} not logged one by one.")

    def _event(self, row: Any) -> Union[Pending, str]:
        if not isinstance(row, Mapping) and callable(getattr(row, "asDict", None)):
            row = row.asDict(recursive=True)
        if not isinstance(row, Mapping):
            return f"expected a mapping or a Row, got {type(row).__name__}"
        if not _FIELDS.issuperset(row):
            extra = sorted(str(k) for k in row if k not in _FIELDS)
            return f"unknown field(s) {', '.join(map(json.dumps, extra))} (expected action, identifiers, type, data)"
        # A missing value is absent: a struct column holds null where a row has no email, no price.
        identifiers = row.get("identifiers")
        if isinstance(identifiers, Mapping):
            identifiers = {k: v for k, v in identifiers.items() if v is not None}
        data = row.get("data")
        if data is not None and not isinstance(data, Mapping):
            return f'"data" must be a mapping, got {type(data).__name__}'
        values = {k: v for k, v in data.items() if v is not None} if data else {}
        given = values.pop("idempotence_id", None)
        if given is not None and not isinstance(given, str):
            return "idempotence_id must be a string"
        event = validate(row.get("action"), identifiers, row.get("type"), values or None)
        if isinstance(event, str):
            return event
        type_, action, ids, checked = event
        checked = checked or {}
        checked["idempotence_id"] = given if given is not None else self._id_of(event)
        return type_, action, ids, checked


def _lost(dropped: Mapping[str, int]) -> int:
    return sum(n for reason, n in dropped.items() if reason not in REFUSED_BY_ODP)


def _reasons(dropped: Mapping[str, int]) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in dropped.items() if n)


def _partition_name() -> str:
    """``partition 3`` inside a Spark task (pyspark already imported by the worker), else ``partition``."""
    pyspark = sys.modules.get("pyspark")
    context = getattr(pyspark, "TaskContext", None)
    try:
        task = context.get() if context is not None else None
        return f"partition {task.partitionId()} (attempt {task.attemptNumber()})" if task is not None else "partition"
    except Exception:  # an unexpected pyspark: the position within the partition still says enough
        return "partition"


def _peak_rss() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
