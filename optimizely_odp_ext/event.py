"""Building one ODP event: validation, identifier normalization and default data.

Validation runs on the caller's thread, so it is written to be cheap: one pass over the identifiers
and one over the data, no I/O, no UUID, no JSON. What can wait (the ``idempotence_id``, the default
data, the JSON encoding) is done by the worker in :func:`encode`.
"""

from __future__ import annotations

import json
import math
import os
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from . import _compat

FS_USER_ID = "fs_user_id"
DEFAULT_TYPE = "fullstack"

DataValue = Union[str, int, float, bool, None]
OdpData = Dict[str, DataValue]

# A validated event waiting in the queue: (type, action, identifiers, data or None). Plain tuples:
# they are the cheapest thing the caller can build.
Pending = Tuple[str, str, Dict[str, str], Optional[OdpData]]

_VALID_TYPES = (str, int, float, bool, type(None))


def validate(
    action: object, identifiers: object, type: object, data: object
) -> Union[Pending, str]:
    """Validates and normalizes one ``send_odp_event`` call.

    Never mutates the caller's dicts; the returned event holds copies.

    Args:
        action: The event action; a non-empty str.
        identifiers: A non-empty dict of str to str.
        type: The event type; empty or None means "fullstack".
        data: None, or a dict of str to str, int, float (finite), bool or None.

    Returns:
        The validated event, or the error line to log when the call must be discarded.
    """
    if action is None or action == "":
        return _compat.ODP_INVALID_ACTION
    if not isinstance(action, str):
        return f"ODP action is not valid (must be a string, got {_type_name(action)})."

    if not identifiers or not isinstance(identifiers, dict):
        return _compat.ODP_INVALID_IDENTIFIERS
    # Copied first (in C), then the copy checked: what is checked is what is sent, whatever the
    # caller's other threads do to their dict meanwhile.
    ids: Dict[Any, Any] = dict(identifiers)
    for key, value in ids.items():
        if not isinstance(key, str):
            return f"ODP identifiers are not valid (keys must be strings, got {_type_name(key)})."
        if not isinstance(value, str):
            # The value may be personal data (an email): name the key and the type, never the value.
            return f'ODP identifiers are not valid (value of "{key}" must be a string, got {_type_name(value)}).'
    if FS_USER_ID not in ids:
        for key in ids:
            if len(key) == 10 and _is_fs_user_id_variant(key):
                # Rebuild rather than pop+insert so the normalized key keeps the caller's position.
                ids = {(FS_USER_ID if k == key else k): v for k, v in ids.items()}
                break

    if type is None or type == "":
        type = DEFAULT_TYPE
    elif not isinstance(type, str):
        return f"ODP type is not valid (must be a string, got {_type_name(type)})."

    if data is None:
        return (type, action, ids, None)
    if not isinstance(data, dict):
        return _compat.ODP_INVALID_DATA
    if not data:
        return (type, action, ids, None)
    values: Dict[Any, Any] = dict(data)  # copied first, as the identifiers
    for name, item in values.items():
        if not isinstance(name, str):
            return f"ODP data is not valid (keys must be strings, got {_type_name(name)})."
        if not isinstance(item, _VALID_TYPES):
            return _compat.ODP_INVALID_DATA
        if isinstance(item, float) and not math.isfinite(item):
            return f'ODP data is not valid (value of "{name}" is not a finite number).'
    return (type, action, ids, values)


def _is_fs_user_id_variant(key: str) -> bool:
    return key.lower().replace("-", "_") == FS_USER_ID


def _type_name(value: object) -> str:
    return value.__class__.__name__


class Encoded:
    """One event, encoded once, ready to join batches (and retried with the same bytes).

    Attributes:
        body: The event's JSON object as UTF-8 bytes.
        idempotence_id: The id in its data (the caller's, when given).
        seq: The order in which the worker took it from the queue.
        spool_id: Where the spool keeps it, when the spool is on.
    """

    __slots__ = ("body", "idempotence_id", "seq", "spool_id")

    def __init__(self, body: bytes, idempotence_id: str, seq: int = 0,
                 spool_id: Optional[Tuple[int, int]] = None) -> None:
        self.body = body
        self.idempotence_id = idempotence_id
        # The order in which the worker took the event from the queue (flush uses it as a barrier).
        self.seq = seq
        self.spool_id = spool_id

    def __len__(self) -> int:
        return len(self.body)

    def __repr__(self) -> str:
        return f"Encoded(idempotence_id={self.idempotence_id!r}, size={len(self.body)})"


def default_data(sdk_version: str) -> OdpData:
    """The data every event carries unless the caller overrides it (minus ``idempotence_id``)."""
    return {"data_source_type": "sdk", "data_source": "python-sdk", "data_source_version": sdk_version}


# ensure_ascii: any str (even a lone surrogate) encodes, and CPython's ASCII encoder is the fast one.
_encoder = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))
_dumps = _encoder.encode


def _chunker() -> Callable[[Any, int], Sequence[str]]:
    """What ``_dumps`` calls, made once: the C encoder, without the two Python frames around it.

    ``JSONEncoder.encode`` builds a new C encoder for every call (through ``iterencode``); that is a
    third of the worker's encoding time for one small event. Its arguments here are the ones
    ``iterencode`` passes for ``_encoder`` (the same since Python 3.6), except the circular-reference
    markers: a validated event is three levels of str keys and scalars, so it cannot hold a cycle.
    Without the C accelerator (PyPy, or a build without ``_json``), or if a later Python's private C
    encoder takes other arguments or encodes a probe differently from ``_dumps``, ``_dumps`` itself.
    """
    def fallback(obj: Any, _level: int) -> Sequence[str]:
        return (_dumps(obj),)

    make = getattr(json.encoder, "c_make_encoder", None)
    escape = getattr(json.encoder, "c_encode_basestring_ascii", None)
    if make is None or escape is None:
        return fallback
    probe = {"t": "\u00e9\ud800\"", "d": {"i": -(2**70), "f": 0.1, "b": True, "n": None}}
    try:
        chunks: Callable[[Any, int], Sequence[str]] = make(
            None, _encoder.default, escape, None, _encoder.key_separator, _encoder.item_separator,
            _encoder.sort_keys, _encoder.skipkeys, _encoder.allow_nan)
        same = "".join(chunks(probe, 0)) == _dumps(probe)
    except (TypeError, ValueError):
        return fallback
    return chunks if same else fallback


_chunks = _chunker()


def encode(pending: Pending, defaults: Mapping[str, DataValue], seq: int = 0) -> Encoded:
    """Adds the default data and encodes the event. Runs on the worker.

    Args:
        pending: The validated event.
        defaults: The default data from :func:`default_data`.
        seq: The order in which the worker took it from the queue.

    Returns:
        The encoded event.
    """
    type_, action, identifiers, data = pending
    if data:
        # The caller's id wins and stays first; the caller's data override the defaults in place.
        idempotence_id = data["idempotence_id"] if "idempotence_id" in data else _ids.next()
        merged: Dict[str, Any] = {"idempotence_id": idempotence_id, **defaults, **data}
    else:
        idempotence_id = _ids.next()
        merged = {"idempotence_id": idempotence_id, **defaults}
    body = "".join(_chunks({"type": type_, "action": action, "identifiers": identifiers, "data": merged}, 0))
    return Encoded(body.encode("ascii"), str(idempotence_id), seq)


class _IdPool(threading.local):
    """Random UUID4 strings, drawn from the OS a few hundred at a time.

    ``str(uuid.uuid4())`` per event costs a system call and a hand-over of the interpreter lock
    each time; one ``os.urandom`` for a block is far cheaper on the worker. The pool is
    thread-local: every manager's worker draws from its own block, so several clients in one
    process never race on a shared position and nothing needs a lock. Refilled after a fork, so a
    child never repeats its parent's ids.
    """

    def __init__(self, block: int = 256) -> None:
        self._block = block
        self._hex = ""
        self._pos = 0
        self._pid = -1

    def next(self) -> str:
        if self._pos >= len(self._hex) or self._pid != os.getpid():
            self._hex = os.urandom(16 * self._block).hex()
            self._pos = 0
            self._pid = os.getpid()
        h = self._hex[self._pos:self._pos + 32]
        self._pos += 32
        # Version 4, variant 10xx (RFC 4122), as uuid.uuid4() makes them.
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}
_ids = _IdPool()


def join(events: list[Encoded]) -> bytes:
    """The JSON array body of a batch, from already encoded events (no re-encoding)."""
    return b"[" + b",".join(e.body for e in events) + b"]"


def batch_size_bytes(count: int, body_bytes: int) -> int:
    """Size of the joined array for ``count`` events whose bodies add up to ``body_bytes``."""
    return body_bytes + max(count - 1, 0) + 2
